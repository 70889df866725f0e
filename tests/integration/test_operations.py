"""What an operator sees: /metrics, /status, /readyz, the Kafka Connect status endpoints, JSON logs,
and `kafka-s3-archiver check`, each compared with what really landed in the bucket and in Kafka."""
import json
import os
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import oracle
import testbed
from load import v3_message
from test_archive import Bucket, produce_raw

REPO = Path(__file__).resolve().parents[2]
PREFIX = "kafka_s3_archiver_"


def get(port, path):
    """(HTTP status, body) of a GET on the archiver's REST port."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def ready(port):
    try:
        return get(port, "/readyz")[0] == 200
    except OSError:
        return False


def get_json(port, path):
    code, body = get(port, path)
    return code, json.loads(body)


def wait_for(what, predicate, timeout=60, show=lambda: ""):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"not within {timeout}s: {what} {show()}")


def metric_names_in_source():
    src = (REPO / "src" / "metrics.rs").read_text()
    return set(re.findall(r'pub const [A-Z_]+: &str = "(kafka_s3_archiver_[a-z_]+)";', src))


def test_metrics_status_and_connect_endpoints_agree_with_the_archive(broker, garage, run_archiver, tmp_path):
    run = uuid.uuid4().hex[:8]
    topic, group = f"ops.{run}", f"ops-{run}"
    broker.create_topic(topic, 2)
    bucket = Bucket("garage", server=garage, name=f"ops-{run}")
    garage.create_bucket(bucket.name)
    items = [(i % 2, v3_message(1650250000123456 + i, os.urandom(100 + 37 * i)), 1795545116000 + i) for i in range(40)]
    items += [(0, b'{"no": "envelope"}', 1795545117000 + i) for i in range(3)]
    items += [(1, None, 1795545118000)]
    produce_raw(broker.bootstrap, topic, items)
    records = oracle.read_topic(broker.bootstrap, topic, len(items))
    ends = oracle.end_offsets(records)

    a = run_archiver(BROKER_HOSTNAME=broker.bootstrap, KAFKA_TOPIC=topic, GROUP_ID=group, SPOOL_DIR=tmp_path / "spool",
                     LOG_FORMAT="json", **bucket.env())
    port = a.rest_port
    wait_for("/readyz answers 200", lambda: ready(port))
    wait_for("all offsets committed", lambda: oracle.committed(broker.bootstrap, group, topic, [0, 1]) == ends)
    # The commit acknowledgement and the next statistics reach /status within a few seconds.
    wait_for("/status shows every partition caught up", lambda: all(
        p["lag"] == 0 and p["committed"] == ends[p["partition"]] for p in get_json(port, "/status")[1]["partitions"]),
        timeout=20, show=lambda: get_json(port, "/status"))

    # /metrics against the bucket, read with boto3.
    objects = bucket.read_all()
    text = get(port, "/metrics")[1]
    print("\n/metrics (kafka_s3_archiver_*):\n" + "\n".join(
        line for line in text.splitlines() if line.startswith(PREFIX) and "_bucket{" not in line))
    m = testbed.scrape(port)
    kinds = {"payload": r"^topics/.*\.bin$", "timestamp": r"^topics/.*-timestamp\.txt$",
             "dead_letter": r"^errors/.*\.raw$", "dead_letter_reason": r"^errors/.*-reason\.txt$"}
    for kind, pattern in kinds.items():
        assert m[f'{PREFIX}objects_uploaded_total{{kind="{kind}"}}'] == sum(
            1 for k in objects if re.match(pattern, k)), kind
    assert m[PREFIX + 'objects_uploaded_total{kind="payload"}'] == 40
    assert m[PREFIX + 'objects_uploaded_total{kind="dead_letter"}'] == 3
    assert m[PREFIX + "uploaded_bytes_total"] == sum(len(v) for v in objects.values())
    assert m[PREFIX + "upload_duration_seconds_count"] == len(objects) == 86
    assert m[PREFIX + "records_consumed_total"] == len(items)
    assert m[PREFIX + "records_archived_total"] == 43
    assert m[PREFIX + "tombstones_total"] == 1
    assert m[PREFIX + 'undecodable_records_total{reason="no_envelope"}'] == 3
    assert sum(v for k, v in m.items() if k.startswith(PREFIX + "upload_errors_total")) == 0
    assert m[PREFIX + "upload_retries_total"] == 0
    assert m[PREFIX + "commits_total"] >= 1 and m[PREFIX + "commit_errors_total"] == 0
    # Every record, the tombstone too, has its latency measured once, when its offset is committed.
    assert m[PREFIX + "end_to_end_latency_seconds_count"] == len(items)
    for p, end in ends.items():
        labels = f'{{topic="{topic}",partition="{p}"}}'
        assert m[PREFIX + "committed_offset" + labels] == end
        assert m[PREFIX + "consumer_lag" + labels] == 0
    assert m[PREFIX + "assigned_partitions"] == 2
    assert m[PREFIX + "spool_records"] == 0 and m[PREFIX + "spool_bytes"] == 0
    assert m[PREFIX + "consumer_paused"] == 0 and m[PREFIX + "failed"] == 0 and m[PREFIX + "store_reachable"] == 1
    exported = {re.sub(r"(_bucket|_sum|_count)$", "", k.split("{")[0]) for k in m}
    assert metric_names_in_source() <= exported, metric_names_in_source() - exported

    # /status
    code, status = get_json(port, "/status")
    print("\n/status:\n" + json.dumps(status, indent=2))
    assert code == 200 and status["state"] == "RUNNING" and status["ready"] is True
    assert status["consumer"] == {"topics": [topic], "assigned_partitions": 2, "missing_topics": [],
                                  "paused": False, "pause_reason": None}
    spool = status["spool"]
    assert (spool["records"], spool["bytes"], spool["max_records"], spool["max_bytes"]) == (0, 0, 10000, 1 << 30), spool
    assert 0 < spool["disk_free_bytes"] <= spool["disk_total_bytes"] and spool["min_free_bytes"] == 256 << 20, spool
    assert status["not_ready"] == [] and status["setup"]["group_id"] == group and status["setup"]["format"] == "connect"
    assert status["setup"]["store"].startswith(f"s3://{bucket.name} at {garage.endpoint}"), status["setup"]
    assert status["store"]["reachable"] is True and status["failure"] is None
    by_partition = {p["partition"]: p for p in status["partitions"]}
    assert sorted(by_partition) == [0, 1] and all(p["topic"] == topic for p in status["partitions"])
    for p, end in ends.items():
        assert (by_partition[p]["committed"], by_partition[p]["end"], by_partition[p]["lag"],
                by_partition[p]["spool_records"]) == (end, end, 0, 0)
    # The undecodable records are partition 0's last error, with the offset of one of them.
    bad_offsets = {o for p, o, _, v, _ in records if p == 0 and v == b'{"no": "envelope"}'}
    error = by_partition[0]["last_error"]
    assert error and "undecodable" in error["message"], error
    assert int(re.search(r"offset (\d+)", error["message"]).group(1)) in bad_offsets
    assert by_partition[1]["last_error"] is None
    # The three undecodable records are one entry of the last errors: they differ only in offsets.
    assert [(e["source"], e["count"]) for e in status["errors"]] == [(f"{topic}/0", 3)], status["errors"]

    # The Kafka Connect REST API the old deployment's scripts call.
    assert get_json(port, "/connectors") == (200, ["s3-sink-timestamp", "s3-sink-data"])
    for name in ["s3-sink-timestamp", "s3-sink-data"]:
        code, s = get_json(port, f"/connectors/{name}/status")
        assert code == 200 and s["name"] == name and s["type"] == "sink", s
        assert s["connector"]["state"] == "RUNNING" and [t["state"] for t in s["tasks"]] == ["RUNNING"], s
        assert s["tasks"][0]["id"] == 0 and s["tasks"][0]["worker_id"].endswith(f":{port}"), s
        code, t = get_json(port, f"/connectors/{name}/tasks/0/status")
        assert code == 200 and t["state"] == "RUNNING" and t["id"] == 0, t
    code, body = get_json(port, "/connectors/s3-sink-nope/status")
    assert code == 404 and body["error_code"] == 404, body
    assert get(port, "/connectors/s3-sink-data/tasks/1/status")[0] == 404
    assert get(port, "/healthz") == (200, "ok\n")
    assert get(port, "/readyz") == (200, "ready\n")

    assert a.stop() == 0, a.logs()
    # LOG_FORMAT=json: every line is one JSON object; the start-up line has the configuration,
    # its secret masked.
    lines = [json.loads(line) for line in a.log_path.read_text().splitlines() if line.strip()]
    starting = [e for e in lines if e.get("fields", {}).get("message") == "starting"]
    assert len(starting) == 1, lines[:3]
    config = starting[0]["fields"]["config"]
    assert f"topics={topic}" in config and "secret_key=***" in config, config
    assert testbed.SECRET_KEY not in a.log_path.read_text()
    assert {e["level"] for e in lines} <= {"INFO", "WARN", "ERROR", "DEBUG", "TRACE"}


def check(archiver_bin, tmp_path, **env):
    """Runs `kafka-s3-archiver check` as a user would; returns (exit code, output)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "S3_", "AWS_"))}
    clean.update({k: str(v) for k, v in env.items()})
    clean.setdefault("REST_PORT", str(testbed.free_port()))
    clean.setdefault("REST_BIND_ADDRESS", "127.0.0.1")
    r = subprocess.run([str(archiver_bin), "check"], cwd=tmp_path, env=clean, capture_output=True, text=True,
                       timeout=120)
    print(f"\n$ kafka-s3-archiver check   # exit {r.returncode}\n{r.stdout}{r.stderr}")
    return r.returncode, r.stdout


def test_check_passes_a_good_configuration_and_names_each_problem(broker, garage, archiver_bin, tmp_path):
    run = uuid.uuid4().hex[:8]
    topic, name = f"check.{run}", f"check-{run}"
    broker.create_topic(topic, 3)
    garage.create_bucket(name)
    bucket = Bucket("garage", server=garage, name=name)
    good = dict(BROKER_HOSTNAME=broker.bootstrap, KAFKA_TOPIC=topic, GROUP_ID=f"g-{run}",
                SPOOL_DIR=tmp_path / "spool", **bucket.env())
    code, out = check(archiver_bin, tmp_path, **good)
    assert code == 0, out
    lines = out.splitlines()
    assert all(line.startswith("OK ") for line in lines[1:-1]), out
    for what in ["configuration", "spool directory", "REST port", "Kafka brokers", f"topic {topic}: 3 partition",
                 f"bucket {name}: wrote, read back and deleted"]:
        assert any(what in line for line in lines), (what, out)
    assert bucket.read_all() == {}, "the probe object is deleted"
    assert (tmp_path / "spool").is_dir()

    # A wrong broker port and a wrong secret key: each named, with what to change.
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    code, out = check(archiver_bin, tmp_path, **{**good, "BROKER_HOSTNAME": f"127.0.0.1:{testbed.free_port()}",
                                                 "AWS_SECRET_KEY": "not-the-secret",
                                                 "REST_PORT": busy.getsockname()[1]})
    busy.close()
    assert code == 1, out
    fails = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 3, out
    assert re.search(r"FAIL +REST port .*: cannot listen .*REST_PORT", out), out
    assert re.search(r"FAIL +Kafka brokers .*BROKER_HOSTNAME", out), out
    assert re.search(rf"FAIL +bucket {name}: cannot write a probe object: .*AWS_SECRET_KEY", out), out
    assert "not-the-secret" not in out
    assert out.splitlines()[-1].startswith("3 problem(s)")

    # A missing topic and a missing bucket; write-once asked of garage, which has no If-None-Match.
    code, out = check(archiver_bin, tmp_path, **{**good, "KAFKA_TOPIC": f"{topic},missing.{run}",
                                                 "S3_BUCKET_NAME": f"missing-{run}"})
    assert code == 1, out
    assert re.search(rf"FAIL +topic missing\.{run}: does not exist: create it, or correct KAFKA_TOPIC", out), out
    assert re.search(rf"OK +topic {re.escape(topic)}", out), out
    assert re.search(rf"FAIL +bucket missing-{run}: .*S3_BUCKET_NAME", out), out
    code, out = check(archiver_bin, tmp_path, **{**good, "S3_CONDITIONAL_PUT": "true"})
    assert code == 1 and re.search(r"FAIL +write-once .*S3_CONDITIONAL_PUT=false", out), out
    assert bucket.read_all() == {}, "the probe object is deleted"

    # A configuration that does not parse: exit 2, as for the archiver and the other tools.
    code, out = check(archiver_bin, tmp_path, **{**good, "UPLOAD_WORKERS": "many"})
    assert code == 2 and out.startswith("FAIL  configuration: UPLOAD_WORKERS"), out
