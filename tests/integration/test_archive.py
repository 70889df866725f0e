"""End to end: the real SINETStream producer writes, the archiver runs, an independent client
(boto3, or the file system for the local store) finds exactly what Kafka Connect would have written."""
import concurrent.futures
import hashlib
import json
import os
import random
import re
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

import confluent_kafka as ck
import pytest

import oracle
import testbed
from load import v3_message

HERE = Path(__file__).parent

VARIANTS = {
    "v3": {},
    "v2": {"message_format": 2},
    "zstd": {"data_compression": True, "compression": {"algorithm": "zstd"}},
    "gzip": {"data_compression": True, "compression": {"algorithm": "gzip"}},
}


def sinetstream_messages(rng, n):
    """Payloads a sensor would send: JSON, text, binary, empty, a '+' and '/', an image-sized blob."""
    kinds = [
        lambda i: json.dumps({"temperature": 20 + i / 10, "seq": i}).encode(),
        lambda i: f"センサー値 {i}℃".encode(),
        lambda i: bytes(range(256)),
        lambda i: b"",
        lambda i: b"a+b/c d%2B",
        lambda i: rng.randbytes(rng.choice([4096, 65536, 300_000])),
    ]
    tstamps = [1650250000123456, 0, 1650250799999999, 4102444800000001, 1234567, 1700000000000999]
    return [{"payload_hex": kinds[i % len(kinds)](i).hex(), "tstamp_us": tstamps[i % len(tstamps)] + i}
            for i in range(n)]


def produce_sinetstream(bootstrap, topic, params, messages):
    r = subprocess.run([str(testbed.VENV / "bin" / "python"), str(HERE / "sinet_produce.py"), bootstrap, topic,
                        json.dumps(params)], input=json.dumps(messages), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def produce_raw(bootstrap, topic, items):
    """items: [(partition, value or None, timestamp_ms)]; librdkafka producer."""
    p = ck.Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "message.max.bytes": 64 << 20, "log_level": 2})
    errors = []
    for partition, value, ts in items:
        p.produce(topic, value=value, partition=partition, timestamp=ts,
                  on_delivery=lambda err, msg: err and errors.append(err))
    assert p.flush(60) == 0 and not errors, errors


class Bucket:
    """The archive as a user sees it: through boto3, or as files for the local store."""

    def __init__(self, kind, server=None, root=None, name=None):
        self.kind, self.server, self.root, self.name = kind, server, root, name

    def env(self):
        if self.kind == "local":
            return {"ARCHIVE_DIR": str(self.root)}
        return {"S3_BUCKET_NAME": self.name, "S3_ENDPOINT_URL": self.server.endpoint,
                "AWS_ACCESS_KEY_ID": testbed.ACCESS_KEY, "AWS_SECRET_KEY": testbed.SECRET_KEY}

    def read_all(self, digests=False):
        """{key: body} of every object (every file, for the local store). With `digests`, an S3
        object written in one PUT comes as the MD5 of its body (`Md5`), taken from the listing's
        ETag: S3 defines that ETag as the body's MD5, and a listing is 20 times faster than a GET
        each (garage: about 9,000 keys/s listed against 500 objects/s read)."""
        if self.kind == "local":
            base = self.root / "archive"
            return {str(f.relative_to(base)): f.read_bytes() for f in base.rglob("*") if f.is_file()}
        s3 = self.server.client()
        listed = [(o["Key"], o["ETag"].strip('"')) for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.name) for o in page.get("Contents", [])]
        got = {k: Md5(etag) for k, etag in listed if digests and "-" not in etag}  # "-": multipart
        keys = [k for k, _ in listed if k not in got]
        # In parallel: a GET of a block garage keeps apart (values over a few KB) waits on its
        # disk and hashing, not on Python (19,140 objects took 138 s one at a time).
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            bodies = pool.map(lambda k: s3.get_object(Bucket=self.name, Key=k)["Body"].read(), keys)
            got.update(zip(keys, bodies))
        return got

    def get(self, key):
        if self.kind == "local":
            return (self.root / "archive" / key).read_bytes()
        return self.server.client().get_object(Bucket=self.name, Key=key)["Body"].read()

    def put(self, key, body):
        if self.kind == "local":
            path = self.root / "archive" / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(body)
        else:
            self.server.client().put_object(Bucket=self.name, Key=key, Body=body)

    def delete(self, key):
        if self.kind == "local":
            (self.root / "archive" / key).unlink()
        else:
            self.server.client().delete_object(Bucket=self.name, Key=key)


@pytest.fixture(params=["garage", "moto", "local"])
def bucket(request, tmp_path):
    kind = request.param
    if kind == "local":
        return Bucket("local", root=tmp_path / "data")
    server = request.getfixturevalue(kind)
    name = f"archive-{uuid.uuid4().hex[:12]}"
    server.create_bucket(name)
    return Bucket(kind, server=server, name=name)


class Md5(str):
    """An object's body by its MD5 (hex), as `Bucket.read_all(digests=True)` gives it."""


def same(got, body):
    """An object as read (its bytes, or their `Md5`) holds `body`."""
    return got == hashlib.md5(body).hexdigest() if isinstance(got, Md5) else got == body


KEY = re.compile(r"^(topics|errors)/([^/]+)/year=\d{4}/month=\d\d/day=\d\d/hour=\d\d/\2\+(\d+)\+(\d{10,})")


def audit(got, expected, reasons):
    """(lost, duplicate, extra, wrong): objects missing; offsets with more than their two objects;
    objects not expected; objects with other bytes."""
    lost = len(set(expected) - set(got))
    extra = len(set(got) - set(expected) - reasons)
    wrong = sum(1 for k in set(expected) & set(got) if not same(got[k], expected[k]))
    per_offset = Counter(KEY.match(k).group(2, 3, 4) for k in got if KEY.match(k))
    duplicate = sum(1 for n in per_offset.values() if n > 2)
    return lost, duplicate, extra, wrong


def summary(name, records, got, expected, reasons, archivers, recover_s):
    lost, duplicate, extra, wrong = audit(got, expected, reasons)
    print(f"\nSUMMARY {name}: records={records} objects={len(got)} lost={lost} duplicate={duplicate} extra={extra} "
          f"wrong={wrong} peak_rss={max(a.peak_rss for a in archivers) / 2**20:.1f}MiB "
          f"peak_spool={max(a.peak_spool for a in archivers) / 2**20:.1f}MiB recover={recover_s:.1f}s")
    return lost, duplicate, extra, wrong


def check_archive(bucket, expected, reasons, ignore=(), digests=False):
    """The bucket holds exactly `expected` (and the `reasons` objects). `ignore`: (partition, offset)
    pairs whose objects are left out of the comparison. `digests`: bodies compared by their MD5
    (`Bucket.read_all`), for the tests of faults that leave tens of thousands of objects."""
    got = {k: v for k, v in bucket.read_all(digests).items()
           if not (KEY.match(k) and (int(KEY.match(k).group(3)), int(KEY.match(k).group(4))) in ignore)}
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected) - reasons)
    assert not missing, f"{len(missing)} objects missing, e.g. {missing[:5]}"
    assert not extra, f"{len(extra)} unexpected objects, e.g. {extra[:5]}"
    wrong = [k for k, body in expected.items() if not same(got[k], body)]
    assert not wrong, f"{len(wrong)} bodies differ, e.g. {wrong[0]}: {got[wrong[0]][:80]!r} != {expected[wrong[0]][:80]!r}"
    for r in reasons:
        assert r in got, f"reason object {r} missing"
        text = bucket.get(r).decode()
        assert "reason: " in text and "offset: " in text, text
    return got


def wait_committed(bootstrap, group, topic, ends, timeout=30, enough=None):
    """The group's committed offsets once they equal `ends` (or satisfy `enough`), or at the timeout."""
    deadline = time.time() + timeout
    while True:
        got = oracle.committed(bootstrap, group, topic, list(ends))
        if got == ends or (enough and enough(got)) or time.time() > deadline:
            return got
        time.sleep(0.5)


def test_archive_is_byte_exact_and_restart_adds_only_new_records(broker, bucket, run_archiver, tmp_path):
    rng = random.Random(7)
    run = uuid.uuid4().hex[:8]
    topic, fx_topic, group = f"sensor.{run}", f"fixtures.{run}", f"archiver-{run}"
    broker.create_topic(topic, 3)
    fixtures = oracle.fixture_records()
    broker.create_topic(fx_topic, max(4, 1 + max(r["partition"] for r in fixtures)))

    # The real producer, every message format it offers, spread over 3 partitions by its client.
    messages = 0
    for params in VARIANTS.values():
        batch = sinetstream_messages(rng, 12)
        produce_sinetstream(broker.bootstrap, topic, params, batch)
        messages += len(batch)
    # The fixture records exactly as SINETStream wrote them, with their Kafka timestamps, plus a
    # tombstone and an empty value.
    raw = [(r["partition"], bytes.fromhex(r["record_value_hex"]), r["kafka_timestamp_ms"]) for r in fixtures]
    raw += [(1, None, 1795545118000), (2, b"", 1795545118001)]
    produce_raw(broker.bootstrap, fx_topic, raw)

    records = oracle.read_topic(broker.bootstrap, topic, messages)
    fx_records = oracle.read_topic(broker.bootstrap, fx_topic, len(raw))
    by_value = {bytes.fromhex(r["record_value_hex"]): r for r in fixtures}
    expected, reasons = oracle.expected_objects(topic, records)
    fx_expected, fx_reasons = oracle.expected_objects(fx_topic, fx_records, fixtures=by_value)
    expected.update(fx_expected)
    reasons |= fx_reasons
    undecodable = sum(1 for f in fixtures if f["avro_msg_hex"] is None) + 1  # + the empty value
    assert len(fx_reasons) == undecodable
    archivable = messages + len(raw) - 1  # all but the tombstone

    env = dict(BROKER_HOSTNAME=broker.bootstrap, KAFKA_TOPIC=f"{topic},{fx_topic}", GROUP_ID=group,
               SPOOL_DIR=tmp_path / "spool", UPLOAD_WORKERS=16, **bucket.env())
    a = run_archiver(**env)
    a.wait_archived(archivable)
    m = a.metrics()
    assert a.stop() == 0, a.logs()
    assert m["kafka_s3_archiver_tombstones_total"] == 1
    assert sum(v for k, v in m.items() if k.startswith("kafka_s3_archiver_undecodable_records_total")) == undecodable
    check_archive(bucket, expected, reasons)
    assert wait_committed(broker.bootstrap, group, topic, oracle.end_offsets(records)) == oracle.end_offsets(records)
    assert wait_committed(broker.bootstrap, group, fx_topic, oracle.end_offsets(fx_records)) == oracle.end_offsets(fx_records)

    # A second run after a restart archives only what is new.
    more = sinetstream_messages(rng, 9)
    produce_sinetstream(broker.bootstrap, topic, {}, more)
    records = oracle.read_topic(broker.bootstrap, topic, messages + len(more))
    new_expected, _ = oracle.expected_objects(topic, records)
    expected.update(new_expected)
    a = run_archiver(**env)
    a.wait_archived(len(more))
    time.sleep(1.5)  # anything extra would be archived by now
    assert a.metrics()["kafka_s3_archiver_records_archived_total"] == len(more)
    assert a.stop() == 0, a.logs()
    check_archive(bucket, expected, reasons)
    assert wait_committed(broker.bootstrap, group, topic, oracle.end_offsets(records)) == oracle.end_offsets(records)


def test_throughput_on_garage(broker, garage, run_archiver, tmp_path):
    """Many small records over 8 partitions; prints records/s. Every key must be there."""
    n = int(os.environ.get("THROUGHPUT_RECORDS", "20000"))
    workers = int(os.environ.get("THROUGHPUT_WORKERS", "32"))
    run = uuid.uuid4().hex[:8]
    topic, group, name = f"load.{run}", f"archiver-{run}", f"load-{run}"
    broker.create_topic(topic, 8)
    garage.create_bucket(name)
    rng = random.Random(1)
    base_ts = 1795545116000
    produce_raw(broker.bootstrap, topic,
                [(i % 8, v3_message(1650250000123456 + i, rng.randbytes(1024)), base_ts + i) for i in range(n)])
    records = oracle.read_topic(broker.bootstrap, topic, n)
    expected, _ = oracle.expected_objects(topic, records)

    a = run_archiver(BROKER_HOSTNAME=broker.bootstrap, KAFKA_TOPIC=topic, GROUP_ID=group, SPOOL_DIR=tmp_path / "spool",
                     UPLOAD_WORKERS=workers, S3_BUCKET_NAME=name, S3_ENDPOINT_URL=garage.endpoint,
                     AWS_ACCESS_KEY_ID=testbed.ACCESS_KEY, AWS_SECRET_KEY=testbed.SECRET_KEY)
    first = None
    while first is None:
        assert a.proc.poll() is None, a.logs()
        if a.archived() > 0:
            first = time.time()
        time.sleep(0.05)
    a.wait_archived(n, timeout=600)
    elapsed = time.time() - first
    ends = oracle.end_offsets(records)
    assert wait_committed(broker.bootstrap, group, topic, ends) == ends
    assert a.stop() == 0, a.logs()
    print(f"\nTHROUGHPUT garage: {n} records ({2 * n} objects of ~1 KB) in {elapsed:.1f}s from the first upload: "
          f"{n / elapsed:.0f} records/s, {2 * n / elapsed:.0f} objects/s, UPLOAD_WORKERS={workers}")
    s3 = garage.client()
    keys = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=name):
        keys.update(o["Key"] for o in page.get("Contents", []))
    assert keys == set(expected)
    for k in random.Random(2).sample(sorted(expected), 300):
        assert s3.get_object(Bucket=name, Key=k)["Body"].read() == expected[k], k


def test_bad_configuration_is_reported_by_name(archiver_bin, tmp_path):
    env = {"PATH": os.environ["PATH"], "KAFKA_TOPIC": "t", "AWS_SECRET_KEY": "top-secret-value-123",
           "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "S3_BUCKET_NAME": "bucket-x"}
    r = subprocess.run([str(archiver_bin)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert "BROKER_HOSTNAME" in r.stderr and "required" in r.stderr
    assert "Traceback" not in r.stderr and "panicked" not in r.stderr
    env["BROKER_HOSTNAME"] = "localhost:notaport"
    r = subprocess.run([str(archiver_bin)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "BROKER_HOSTNAME" in r.stderr and "port" in r.stderr
    assert "top-secret-value-123" not in r.stdout + r.stderr


def test_undecodable_stop_halts_and_raw_archives_the_value(broker, run_archiver, tmp_path):
    """UNDECODABLE=stop halts at the record, as Kafka Connect did, without committing past it;
    UNDECODABLE=raw archives the value itself with the Kafka timestamp."""
    run = uuid.uuid4().hex[:8]
    topic = f"mixed.{run}"
    broker.create_topic(topic, 1)
    good = v3_message(1650250000123456, b'{"ok": 1}')
    plain = b'{"no": "envelope"}'
    produce_raw(broker.bootstrap, topic, [(0, good, 1795545116000), (0, plain, 1795545116001), (0, good, 1795545116002)])
    records = oracle.read_topic(broker.bootstrap, topic, 3)

    stop_dir, group = tmp_path / "stop", f"stop-{run}"
    a = run_archiver(BROKER_HOSTNAME=broker.bootstrap, KAFKA_TOPIC=topic, GROUP_ID=group, UNDECODABLE="stop",
                     SPOOL_DIR=stop_dir / "spool", ARCHIVE_DIR=stop_dir / "data")
    # As a Kafka Connect worker whose task failed: the process stays up and reports FAILED.
    deadline = time.time() + 60
    while a.metric("kafka_s3_archiver_failed") != 1:
        assert time.time() < deadline and a.proc.poll() is None, a.logs()
        time.sleep(0.2)
    status = json.loads(urllib.request.urlopen(
        f"http://127.0.0.1:{a.rest_port}/connectors/s3-sink-data/status", timeout=5).read())
    assert status["connector"]["state"] == "FAILED" and status["tasks"][0]["state"] == "FAILED", status
    assert f"{topic} partition 0 offset 1" in status["tasks"][0]["trace"], status
    with pytest.raises(urllib.error.HTTPError) as not_ready:
        urllib.request.urlopen(f"http://127.0.0.1:{a.rest_port}/readyz", timeout=5)
    assert not_ready.value.code == 503 and b"archiving stopped" in not_ready.value.read()
    assert a.stop() == 1, a.logs()
    assert f"{topic} partition 0 offset 1" in a.logs() and "UNDECODABLE=stop" in a.logs()
    assert oracle.committed(broker.bootstrap, group, topic, [0]) == {0: 1}, "committed past the stop"
    # Offset 0 is archived, offset 1 is not; offset 2 may have been in flight in parallel, and if
    # it was stored its objects are exact (a rerun rewrites the same bytes).
    first, _ = oracle.expected_objects(topic, records[:1])
    later, _ = oracle.expected_objects(topic, records[2:])
    got = Bucket("local", root=stop_dir / "data").read_all()
    assert all(got.get(k) == v for k, v in first.items()), got.keys()
    assert all(k in first or later.get(k) == v for k, v in got.items()), got.keys()
    assert not any("+0+0000000001" in k for k in got), got.keys()

    raw_dir = tmp_path / "raw"
    a = run_archiver(BROKER_HOSTNAME=broker.bootstrap, KAFKA_TOPIC=topic, GROUP_ID=f"raw-{run}", UNDECODABLE="raw",
                     SPOOL_DIR=raw_dir / "spool", ARCHIVE_DIR=raw_dir / "data")
    a.wait_archived(3)
    assert a.stop() == 0, a.logs()
    expected, _ = oracle.expected_objects(topic, records[:1] + records[2:])
    s = oracle.stem("topics", topic, 0, 1, 1795545116001)
    expected[s + ".bin"] = plain + b"\n"
    expected[s + "-timestamp.txt"] = oracle.ts_text(1795545116001 * 1000).encode() + b"\n"
    assert Bucket("local", root=raw_dir / "data").read_all() == expected


@pytest.mark.parametrize("store", ["garage", "local"])
def test_large_messages_arrive_exact(broker, store, run_archiver, tmp_path, request):
    """Messages of tens of MB (multipart uploads to S3) are archived byte for byte."""
    run = uuid.uuid4().hex[:8]
    topic, group = f"large.{run}", f"large-{run}"
    broker.create_topic(topic, 1)
    if store == "local":
        bucket = Bucket("local", root=tmp_path / "data")
    else:
        server = request.getfixturevalue("garage")
        bucket = Bucket("garage", server=server, name=f"large-{run}")
        server.create_bucket(bucket.name)
    rng = random.Random(4)
    sizes = [24 << 20, 17 << 20, 1 << 20]
    produce_raw(broker.bootstrap, topic, [(0, v3_message(1650250000123456 + i, rng.randbytes(n)), 1795545116000 + i)
                                          for i, n in enumerate(sizes)])
    records = oracle.read_topic(broker.bootstrap, topic, len(sizes))
    expected, reasons = oracle.expected_objects(topic, records)
    # The default settings: each record is far larger than a fetch and still comes whole.
    a = run_archiver(BROKER_HOSTNAME=broker.bootstrap, KAFKA_TOPIC=topic, GROUP_ID=group, SPOOL_DIR=tmp_path / "spool",
                     **bucket.env())
    a.wait_archived(len(sizes))
    assert a.stop() == 0, a.logs()
    check_archive(bucket, expected, reasons)
    if store != "local":
        # S3 marks a multipart object's ETag with its part count: "<md5 of md5s>-<parts>".
        etags = {k: bucket.server.client().head_object(Bucket=bucket.name, Key=k)["ETag"].strip('"')
                 for k in expected if k.endswith(".bin")}
        parts = sorted(int(e.rpartition("-")[2]) if "-" in e else 1 for e in etags.values())
        assert parts == [1, 3, 4], etags  # 1 MiB in one PUT; 17 and 24 MiB in 8 MiB parts


def test_conditional_put_is_write_once_on_moto(broker, moto, run_archiver, tmp_path):
    """S3_CONDITIONAL_PUT=true: a rerun over an archive finds its own objects (same bytes, stored);
    an object someone changed is kept, reported as a conflict, and the archiver's bytes go to errors/."""
    run = uuid.uuid4().hex[:8]
    topic = f"once.{run}"
    broker.create_topic(topic, 2)
    bucket = Bucket("moto", server=moto, name=f"once-{run}")
    moto.create_bucket(bucket.name)
    rng = random.Random(6)
    produce_raw(broker.bootstrap, topic, [(i % 2, v3_message(1650250000123456 + i, rng.randbytes(100)), 1795545116000 + i)
                                          for i in range(20)])
    records = oracle.read_topic(broker.bootstrap, topic, 20)
    expected, reasons = oracle.expected_objects(topic, records)

    def archive(group):
        a = run_archiver(BROKER_HOSTNAME=broker.bootstrap, KAFKA_TOPIC=topic, GROUP_ID=group, S3_CONDITIONAL_PUT="true",
                         SPOOL_DIR=tmp_path / group, **bucket.env())
        a.wait_archived(20)
        m = a.metrics()
        assert a.stop() == 0, a.logs()
        return m, a.logs()

    m, _ = archive(f"first-{run}")
    assert m.get("kafka_s3_archiver_objects_already_stored_total", 0) == 0
    check_archive(bucket, expected, reasons)

    # A second group reads everything again: every object is there with the same bytes.
    m, _ = archive(f"second-{run}")
    assert m["kafka_s3_archiver_objects_already_stored_total"] == 40
    assert m.get("kafka_s3_archiver_upload_conflicts_total", 0) == 0
    check_archive(bucket, expected, reasons)

    # Someone rewrites one payload: it is kept, and the conflict is reported, not overwritten.
    victim = sorted(k for k in expected if k.endswith(".bin"))[3]
    s3 = moto.client()
    s3.put_object(Bucket=bucket.name, Key=victim, Body=b"changed by someone else\n")
    m, logs = archive(f"third-{run}")
    assert m["kafka_s3_archiver_upload_conflicts_total"] == 1
    assert "conflict" in logs and victim in logs
    got = bucket.read_all()
    assert got[victim] == b"changed by someone else\n"
    copy = "errors/" + victim.removeprefix("topics/")
    assert got[copy] == expected[victim]
    assert victim in got[copy + "-conflict.txt"].decode()
