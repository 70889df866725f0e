#!/usr/bin/env bash
# The archiver at work on a machine with nothing else running: installs the test bed if needed
# (the Python venv of scripts/install-testbed.sh: a minute or two the first time), starts a local Kafka broker (the test bed's tansu) on a free port,
# publishes SINETStream messages with the users' own library, archives them into ./data/demo with
# the release build, and shows what landed: the tree, one record's two objects, and `verify`.
#   DEMO_MESSAGES (default 20): how many messages to publish.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/install-testbed.sh --demo)"
cargo build --release --locked --quiet
bin=$(realpath -m "${CARGO_TARGET_DIR:-target}")/release/kafka-s3-archiver
py=$VENV/bin/python
messages=${DEMO_MESSAGES:-20}
topic=sinetstream.sensor
work=$(mktemp -d)
free_port() { "$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port=$(free_port)
rest_port=$(free_port)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

echo "== a local Kafka broker (tansu) on 127.0.0.1:$port"
"$TANSU" broker --listener-url "tcp://127.0.0.1:$port" --advertised-listener-url "tcp://127.0.0.1:$port" \
  > "$work/broker.log" 2>&1 &
pids+=($!)
"$py" - "$port" <<'EOF'
import socket, sys, time
deadline = time.time() + 30
while time.time() < deadline:
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1).close()
        sys.exit(0)
    except OSError:
        time.sleep(0.2)
sys.exit("the broker did not start")
EOF
"$TANSU" topic create "$topic" --partitions 2 --broker "tcp://127.0.0.1:$port" > /dev/null

echo "== $messages SINETStream messages published to $topic (MessageWriter, the users' library)"
"$py" - "$messages" > "$work/messages.json" <<'EOF'
import json, sys, time
now_us = int(time.time() * 1_000_000)
print(json.dumps([{"payload_hex": json.dumps({"sensor": "demo", "temperature": 20 + i / 10, "seq": i}).encode().hex(),
                   "tstamp_us": now_us + i * 1000} for i in range(int(sys.argv[1]))]))
EOF
"$py" tests/integration/sinet_produce.py "127.0.0.1:$port" "$topic" '{}' < "$work/messages.json" > /dev/null

echo "== the archiver: BROKER_HOSTNAME=127.0.0.1:$port KAFKA_TOPIC=$topic ARCHIVE_DIR=./data/demo"
rm -rf data/demo
mkdir -p data/demo
# Only these settings: not the shell's S3_*/AWS_*/KAFKA_* variables, and not a .env of the working
# directory (it may name a real bucket); the archiver runs from the scratch directory.
demo_env=(env -i "PATH=$PATH" "HOME=$HOME" "BROKER_HOSTNAME=127.0.0.1:$port" "KAFKA_TOPIC=$topic"
  "ARCHIVE_DIR=$PWD/data/demo")
(cd "$work" && exec "${demo_env[@]}" SPOOL_DIR="$work/spool" REST_PORT="$rest_port" REST_BIND_ADDRESS=127.0.0.1 \
  KAFKA_PROPERTY_SESSION_TIMEOUT_MS=6000 "$bin") > "$work/archiver.log" 2>&1 &
archiver=$!
pids+=("$archiver")
# Until every message is archived and its offset committed (/status: lag 0, nothing spooled).
"$py" - "$rest_port" "$messages" <<'EOF' || { tail -20 "$work/archiver.log"; exit 1; }
import json, sys, time, urllib.request
port, want = sys.argv[1], int(sys.argv[2])
deadline = time.time() + 90
while time.time() < deadline:
    try:
        s = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=2))
        parts = s["partitions"]
        if parts and sum(p["committed"] or 0 for p in parts) >= want and all(p["lag"] == 0 for p in parts):
            done = ", ".join("partition %d: %d records" % (p["partition"], p["committed"]) for p in parts)
            print("   archived and committed: " + done)
            sys.exit(0)
    except OSError:
        pass
    time.sleep(0.5)
sys.exit("not archived within 90 s")
EOF
kill -TERM "$archiver"
wait "$archiver"

echo "== what landed in ./data/demo/archive ($(find data/demo/archive -type f | wc -l) objects)"
# sed, not head: head exits early, sort can die of SIGPIPE on its next write, and
# pipefail would make that the demo's exit status.
find data/demo/archive -type f | sort | sed -n 1,6p
echo "   …"
first=$(find data/demo/archive -type f -name '*.bin' | sort | sed -n 1p)
echo "== one record: $first"
cat "$first"
cat "${first%.bin}-timestamp.txt"

echo "== kafka-s3-archiver verify: every record in Kafka against its objects"
(cd "$work" && exec "${demo_env[@]}" "$bin" verify) 2> "$work/verify.log" || { cat "$work/verify.log"; exit 1; }
echo
echo "Next: point it at your broker: BROKER_HOSTNAME=host:9092 KAFKA_TOPIC=your.topic cargo run --release"
