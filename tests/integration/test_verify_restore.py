"""verify and restore on the test bed: archive a topic to garage, verify it clean, damage it and see
verify name each problem; restore into a new topic and read it back through SINETStream's own
reader (payload, key and tstamp to the microsecond), and restore an archive without metadata (as
the Kafka Connect deployment wrote it) to the millisecond."""
import os
import random
import re
import subprocess
import time
import uuid
from collections import defaultdict
from urllib.parse import quote

import confluent_kafka as ck
from confluent_kafka.admin import AdminClient
import pytest
import yaml

import testbed
from load import v3_message
from test_archive import wait_committed

PARTITIONS = 3


def HEADERS(i):
    """Kafka headers as producers set them: text, a repeated name, no value, binary bytes."""
    return [("site", f"tokyo-{i}".encode()), ("trace", None), ("site", "日本".encode()), ("raw", bytes([0, 255, 37, 38]))]


def headers_text(headers):
    """The kafka-headers metadata of docs/archive.md, written independently: name=value&..., each
    percent-encoded but A-Z a-z 0-9 - . _ ~, a header without value as its name alone."""
    return "&".join(quote(n.encode(), safe="") + ("" if v is None else "=" + quote(v, safe="")) for n, v in headers)


def produce(bootstrap, topic, items):
    """items: [(partition, key, value, timestamp_ms[, headers])], headers [(name, value or None)]."""
    p = ck.Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "log_level": 2})
    errors = []
    for partition, key, value, ts, *headers in items:
        p.produce(topic, key=key, value=value, partition=partition, timestamp=ts, headers=headers[0] if headers else None,
                  on_delivery=lambda err, msg: err and errors.append(err))
    assert p.flush(60) == 0 and not errors, errors


def read_raw(bootstrap, topic, count, timeout=60, headers=False):
    """Every record of `topic` (assign, from the start): [(partition, offset, key, value, timestamp_ms)],
    with `headers` each record's [(name, value)] after them."""
    md = AdminClient({"bootstrap.servers": bootstrap}).list_topics(topic, timeout=10)
    parts = list(md.topics[topic].partitions)
    c = ck.Consumer({"bootstrap.servers": bootstrap, "group.id": f"read-{uuid.uuid4().hex[:6]}",
                     "enable.auto.commit": False, "log_level": 2})
    c.assign([ck.TopicPartition(topic, p, ck.OFFSET_BEGINNING) for p in parts])
    out = []
    deadline = time.time() + timeout
    while len(out) < count and time.time() < deadline:
        m = c.poll(0.5)
        if m is None or m.error():
            continue
        out.append((m.partition(), m.offset(), m.key(), m.value(), m.timestamp()[1]) + ((m.headers() or [],) if headers else ()))
    time.sleep(1)  # anything beyond `count` would be a duplicate: read it too
    while (m := c.poll(1.0)) is not None:
        if not m.error():
            out.append((m.partition(), m.offset(), m.key(), m.value(), m.timestamp()[1]) + ((m.headers() or [],) if headers else ()))
    c.close()
    return out


def sinetstream_reader(tmp_path, monkeypatch, bootstrap, topic):
    """SINETStream's MessageReader decode path (the reader is not opened: tansu cannot serve its group)."""
    from sinetstream import MessageReader
    d = tmp_path / "sinetstream"
    d.mkdir(exist_ok=True)
    (d / ".sinetstream_config.yml").write_text(yaml.safe_dump({"header": {"version": 2}, "config": {"svc": dict(
        type="kafka", brokers=bootstrap, topic=topic, value_type="byte_array", consistency="AT_LEAST_ONCE")}}))
    monkeypatch.chdir(d)
    reader = MessageReader(service="svc")
    return lambda value: reader._make_message(value, topic, None)


def tool(archiver_bin, env, *args):
    """`kafka-s3-archiver ARGS` as a user runs it; prints what it printed, returns (code, stdout, stderr)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "S3_", "AWS_", "BROKER_"))}
    r = subprocess.run([str(archiver_bin), *args], env={**clean, **env}, capture_output=True, text=True, timeout=300)
    print(f"\n$ kafka-s3-archiver {' '.join(args)}   # exit {r.returncode}\n{r.stdout}{r.stderr}")
    return r.returncode, r.stdout, r.stderr


@pytest.fixture
def archived(broker, garage, run_archiver, tmp_path):
    """A topic of 3 partitions archived to garage: 36 SINETStream v3 messages with keys and
    microsecond tstamps, 12 of them with Kafka headers and one with headers too large to keep,
    2 records without envelope (dead-lettered), 1 tombstone."""
    rng = random.Random(6)
    topic, bucket, group = f"vr.{uuid.uuid4().hex[:8]}", f"vr-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    broker.create_topic(topic, PARTITIONS)
    garage.create_bucket(bucket)
    base_ms = 1_650_250_000_000
    items, originals = [], {}
    for i in range(36):
        payload = f'{{"seq": {i}, "v": {rng.random():.6f}}}'.encode() if i % 4 else rng.randbytes(2000)
        tstamp_us = (base_ms + i * 997) * 1000 + rng.randrange(1, 1000)  # microseconds that ms would lose
        key = f"sensor-{i % 5}".encode() if i % 6 else None
        headers = HEADERS(i) if i % 3 == 0 else [("image", b"x" * 3000)] if i == 7 else []
        items.append((i % PARTITIONS, key, v3_message(tstamp_us, payload), base_ms + i * 1000, headers))
        # What restore gives back: the headers that fit in S3's metadata.
        originals[(i % PARTITIONS, i // PARTITIONS)] = (payload, tstamp_us, key, headers if i != 7 else [])
    items.append((0, b"k", b"not a sinetstream message", base_ms + 50_000))
    items.append((1, None, bytes(range(7)), base_ms + 51_000))
    items.append((2, b"gone", None, base_ms + 52_000))
    produce(broker.bootstrap, topic, items)
    env = {"BROKER_HOSTNAME": broker.bootstrap, "KAFKA_TOPIC": topic, "S3_BUCKET_NAME": bucket,
           "S3_ENDPOINT_URL": garage.endpoint, "AWS_ACCESS_KEY_ID": testbed.ACCESS_KEY,
           "AWS_SECRET_KEY": testbed.SECRET_KEY}
    a = run_archiver(GROUP_ID=group, SPOOL_DIR=tmp_path / "spool", **env)
    ends = {0: 13, 1: 13, 2: 13}
    a.wait_archived(38)
    wait_committed(broker.bootstrap, group, topic, ends)
    assert a.metric("kafka_s3_archiver_headers_omitted_total") == 1
    assert a.stop() == 0, a.logs()
    return {"topic": topic, "bucket": bucket, "env": env, "originals": originals, "ends": ends}


def test_verify_is_clean_then_names_each_injected_problem(archiver_bin, archived, garage):
    env, topic = archived["env"], archived["topic"]
    code, out, err = tool(archiver_bin, env, "verify")
    assert code == 0, out + err
    assert "clean: " in out and "missing 0, mismatched 0, extra 0, offsets in gaps 0" in out, out
    assert "checked 39 offsets (39 against Kafka" in out and "2 dead-lettered, 1 tombstones" in out, out
    assert "76 bodies compared" in out, out  # 36 x 2 archive objects + 2 x 2 dead-letter objects
    assert "76 objects found (76 expected from Kafka's records)" in out, out
    assert f"verify: listing {topic}\n" in err, err  # not "listing T (0)": no count before it is known

    s3 = garage.client()
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=archived["bucket"])["Contents"])
    payloads = [k for k in keys if k.startswith("topics/") and k.endswith(".bin")]
    # The Kafka headers are the payloads' metadata, as docs/archive.md describes them.
    for (p, n), (_, _, _, headers) in archived["originals"].items():
        key = next(k for k in payloads if k.endswith(f"+{p}+{n:010d}.bin"))
        meta = s3.head_object(Bucket=archived["bucket"], Key=key)["Metadata"]
        if headers:
            assert meta["kafka-headers"] == headers_text(headers), (key, meta)
        elif (p, n) == (7 % PARTITIONS, 7 // PARTITIONS):
            assert "kafka-headers" not in meta and meta["kafka-headers-omitted"] == "1", (key, meta)
        else:
            assert "kafka-headers" not in meta and "kafka-headers-omitted" not in meta, (key, meta)
    stamps = [k for k in keys if k.endswith("-timestamp.txt")]
    deleted, altered_body, altered_size = payloads[3], stamps[5], payloads[7]
    s3.delete_object(Bucket=archived["bucket"], Key=deleted)
    body = s3.get_object(Bucket=archived["bucket"], Key=altered_body)["Body"].read()
    s3.put_object(Bucket=archived["bucket"], Key=altered_body, Body=body.replace(b"2022", b"2023"))
    s3.put_object(Bucket=archived["bucket"], Key=altered_size, Body=b"truncated\n")
    hour = deleted.rsplit("/", 1)[0]
    stray = f"{hour}/notes.txt"
    beyond = f"{hour}/{topic}+1+0000000099.bin"
    top_stray = f"topics/{topic}/README.txt"  # directly under topics/T/, above the hour folders
    s3.put_object(Bucket=archived["bucket"], Key=stray, Body=b"hello\n")
    s3.put_object(Bucket=archived["bucket"], Key=beyond, Body=b"x\n")
    s3.put_object(Bucket=archived["bucket"], Key=top_stray, Body=b"notes\n")

    code, out, err = tool(archiver_bin, env, "verify")
    assert code == 1, out + err
    lines = out.splitlines()
    def line_for(kind, key):
        return next((l for l in lines if l.split()[:2] == [kind, key]), None)
    assert line_for("MISSING", deleted), out
    assert line_for("MISMATCHED", altered_body) and "body differs" in line_for("MISMATCHED", altered_body), out
    assert line_for("MISMATCHED", altered_size) and "bytes, the record gives" in line_for("MISMATCHED", altered_size), out
    assert line_for("EXTRA", stray), out
    assert line_for("EXTRA", beyond) and "past the last offset" in line_for("EXTRA", beyond), out
    assert line_for("EXTRA", top_stray), out
    assert "missing 1, mismatched 2, extra 3" in out, out
    # What is in the bucket: one payload fewer, three keys more; what Kafka's records call for.
    assert "78 objects found (76 expected from Kafka's records)" in out, out

    # The bucket alone: the deleted payload leaves its timestamp object without a companion, and the
    # stray keys are still unexpected; the body changes need Kafka to be seen.
    code, out, err = tool(archiver_bin, {k: v for k, v in env.items() if k != "BROKER_HOSTNAME"}, "verify",
                          "--bucket-only")
    assert code == 1, out + err
    assert f"MISSING    {deleted}" in out, out
    assert f"EXTRA      {stray}" in out, out
    assert f"EXTRA      {top_stray}" in out, out
    assert "mismatched 0" in out, out


def test_restore_gives_back_the_records_to_the_microsecond(archiver_bin, archived, broker, garage, tmp_path,
                                                             monkeypatch):
    env, topic, originals = archived["env"], archived["topic"], archived["originals"]
    target = f"{topic}.restored"
    broker.create_topic(target, PARTITIONS)
    code, out, err = tool(archiver_bin, env, "restore", "--dry-run", "--to-topic", target)
    assert code == 0 and "would produce 36 records" in out and "dry run" in out, out + err
    assert read_raw(broker.bootstrap, target, 1, timeout=3) == [], "a dry run produces nothing"

    code, out, err = tool(archiver_bin, env, "restore", "--to-topic", target)
    assert code == 0, out + err
    assert "produced 36 records" in out and "36 SINETStream messages with the exact tstamp" in out, out
    assert "12 with their Kafka headers" in out, out
    assert "left out: 2 dead letters" in out, out
    decode = sinetstream_reader(tmp_path, monkeypatch, broker.bootstrap, target)
    got = read_raw(broker.bootstrap, target, 36, headers=True)
    assert len(got) == 36, got
    per_partition = defaultdict(list)
    for partition, offset, key, value, ts, headers in sorted(got):
        m = decode(value)
        per_partition[partition].append((m.value, m.timestamp_us, key, headers))
    for p in range(PARTITIONS):
        want = [originals[(p, i)] for i in range(12)]
        assert per_partition[p] == want, f"partition {p}: order, payload, tstamp (us), key and headers as produced"

    # An archive as the Kafka Connect deployment wrote it: the same objects, no metadata.
    s3 = garage.client()
    old = f"old-{uuid.uuid4().hex[:8]}"
    garage.create_bucket(old)
    for o in s3.list_objects_v2(Bucket=archived["bucket"])["Contents"]:
        body = s3.get_object(Bucket=archived["bucket"], Key=o["Key"])["Body"].read()
        s3.put_object(Bucket=old, Key=o["Key"], Body=body)
    target_old = f"{topic}.from-old"
    broker.create_topic(target_old, PARTITIONS)
    code, out, err = tool(archiver_bin, {**env, "S3_BUCKET_NAME": old}, "restore", "--to-topic", target_old,
                          "--dead-letters")
    assert code == 0, out + err
    assert "36 SINETStream messages with the tstamp to the millisecond only" in out, out
    assert "2 dead letters as their raw values" in out, out
    got = read_raw(broker.bootstrap, target_old, 38)
    assert len(got) == 38, got
    restored = defaultdict(list)
    for partition, offset, key, value, ts in sorted(got):
        if value[:2] != b"\xdf\x03":
            restored[partition].append(("raw", value))
            continue
        m = decode(value)
        restored[partition].append((m.value, m.timestamp_us))
    for p in range(PARTITIONS):
        want = [(originals[(p, i)][0], originals[(p, i)][1] // 1000 * 1000) for i in range(12)]
        assert [r for r in restored[p] if r[0] != "raw"] == want, f"partition {p}: tstamp to the millisecond"
    raws = sorted(v for p in restored for kind, v in restored[p] if kind == "raw")
    assert raws == sorted([b"not a sinetstream message", bytes(range(7))])


def test_verify_on_a_terminal_shows_the_listing_and_whole_rates(archiver_bin, archived, garage, tmp_path):
    """What a user sees in a terminal (tmux): while the hour folders are searched, what is listed
    (not an empty "0/0" bar); while bodies are compared, a bar with whole records a second. A
    distant store (200 ms a request, one request at a time) makes each stage last."""
    import shlex
    proxy = testbed.TcpProxy(garage.s3_port, delay=0.2)
    env = {**archived["env"], "S3_ENDPOINT_URL": proxy.endpoint}
    session = f"verify-{uuid.uuid4().hex[:8]}"
    done = tmp_path / "exit-code"
    command = " ".join(["env", *(shlex.quote(f"{k}={v}") for k, v in env.items()),
                        shlex.quote(str(archiver_bin)), "verify", "--parallel", "1"])
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "160", "-y", "30",
                    f"{command}; echo $? > {shlex.quote(str(done))}; sleep 30"], check=True)
    frames = []
    try:
        deadline = time.time() + 120
        while not done.exists() and time.time() < deadline:
            frames.append(subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True,
                                         text=True).stdout)
            time.sleep(0.1)
        frames.append(subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True,
                                     text=True).stdout)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    lines = [line for f in frames for line in f.splitlines() if line.strip()]
    listing = [line for line in lines if f"listing {archived['topic']}" in line]
    checking = [line for line in lines if "against Kafka [" in line]
    print(f"{len(frames)} frames; listing: {sorted(set(listing))[:4]}; checking: {sorted(set(checking))[-3:]}")
    assert done.read_text().strip() == "0", frames[-1]
    assert listing and all("0/0" not in line for line in listing), listing
    assert any("hour folders" in line for line in listing), listing
    assert checking and all(re.search(r"\(\d+/s, eta", line) for line in checking), checking
    # tansu's end offsets are below what is read: the count never runs past its total.
    counts = [tuple(map(int, m.groups())) for line in checking for m in [re.search(r"\] (\d+)/(\d+) \(", line)] if m]
    assert counts and all(done <= total for done, total in counts), counts
    assert "clean: " in frames[-1], frames[-1]
