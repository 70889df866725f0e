"""ARCHIVE_FORMAT=parquet end to end: the real SINETStream producer and the fixture records go
through the archiver into garage and a local directory; two independent Parquet readers (pyarrow
and DuckDB) read the objects back, and every row is compared with the record read from Kafka and
decoded by SINETStream itself."""
import datetime
import io
import json
import os
import random
import re
import signal
import time
import urllib.request
import uuid
from collections import defaultdict
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

import oracle
import testbed
from load import Producer
from test_archive import VARIANTS, produce_sinetstream, sinetstream_messages, wait_committed
from test_faults import store_down
from test_verify_restore import produce, read_raw, sinetstream_reader, tool

EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
NAME = re.compile(r"^topics/([^/]+)/(year=\d{4}/month=\d\d/day=\d\d/hour=\d\d)/\1\+(\d+)\+(\d{10})\.zstd\.parquet$")


def download(bucket, into):
    """The archive's objects as files under `into`, keys as paths (the local store is one already)."""
    if bucket.kind == "local":
        return bucket.root / "archive"
    for key, body in bucket.read_all().items():
        path = into / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
    return into


def expected_rows(records, sinetstream=True, fixtures=None):
    """{(partition, offset): row} as the format defines it, from the records read from Kafka and
    SINETStream's own decoder (or the fixture's recorded decoding)."""
    rows = {}
    for p, o, ts, value, key, *headers in records:
        fields = None
        if sinetstream and value is not None:
            fx = (fixtures or {}).get(value)
            if fx is not None:
                fields = None if fx["avro_msg_hex"] is None else (fx["tstamp_us"], bytes.fromhex(fx["avro_msg_hex"]))
            else:
                fields = oracle.sinetstream_fields(value)
        rows[(p, o)] = {
            "offset": o,
            "kafka_timestamp": ts,
            "key": key,
            "tstamp": fields[0] if fields else None,
            "payload": fields[1] if fields else value,
            "undecodable": sinetstream and value is not None and fields is None,
            "hour": oracle.hour_path(ts),
        }
        if headers:
            rows[(p, o)]["headers"] = headers[0]
    return rows


def rows_by_pyarrow(root, topic):
    """{(partition, offset): row} from every object of the topic, with the objects' checks: each is
    named after its first offset, holds one partition's records of its hour folder in offset order,
    and no offset is in two objects."""
    rows, objects = {}, 0
    for f in sorted((root / "topics" / topic).rglob("*")):
        if not f.is_file():
            continue
        m = NAME.match(str(f.relative_to(root)))
        assert m, f"not a Parquet object name of the format: {f.relative_to(root)}"
        _, hour, partition, first = m.groups()
        table = pq.read_table(f)
        assert table.schema.names == ["offset", "kafka_timestamp", "key", "headers", "tstamp", "payload", "undecodable"]
        assert str(table.schema.field("kafka_timestamp").type) == "timestamp[ms, tz=UTC]"
        assert str(table.schema.field("tstamp").type) == "timestamp[us, tz=UTC]"
        offsets = table.column("offset").to_pylist()
        assert offsets == sorted(offsets) and offsets[0] == int(first), f"{f.name}: {offsets}"
        objects += 1
        for r in table.to_pylist():
            k = (int(partition), r["offset"])
            assert k not in rows, f"offset {k} in two objects"
            ts = r["kafka_timestamp"]
            rows[k] = {
                "offset": r["offset"],
                "kafka_timestamp": None if ts is None else (ts - EPOCH) // datetime.timedelta(milliseconds=1),
                "key": r["key"],
                "tstamp": None if r["tstamp"] is None else (r["tstamp"] - EPOCH) // datetime.timedelta(microseconds=1),
                "payload": r["payload"],
                "undecodable": r["undecodable"] is not None,
                "hour": hour,
                "headers": [(h["name"], h["value"]) for h in r["headers"]],
            }
    return rows, objects


def rows_by_duckdb(root, topic):
    """{(partition, offset): (kafka ms, tstamp µs, payload, key, undecodable?, hour path)} as DuckDB
    reads the archive, hive partitioning on: what an analyst would query."""
    con = duckdb.connect()
    q = f"""
        SELECT filename, "offset", epoch_ms(kafka_timestamp), epoch_us(tstamp), payload, key,
               undecodable IS NOT NULL, year, month, day, hour
        FROM read_parquet('{root}/topics/{topic}/*/*/*/*/*.parquet', hive_partitioning = true, filename = true)
    """
    out = {}
    for filename, offset, kms, tus, payload, key, undecodable, year, month, day, hour in con.execute(q).fetchall():
        partition = int(NAME.match(str(Path(filename).relative_to(root))).group(3))
        out[(partition, offset)] = (kms, tus, payload, key, undecodable,
                                    f"year={int(year):04d}/month={int(month):02d}/day={int(day):02d}/hour={int(hour):02d}")
    return out


def ranges(root, topic):
    """{partition: [(first, last offset) of each object]}, by first offset."""
    out = defaultdict(list)
    for f in (root / "topics" / topic).rglob("*.parquet"):
        partition = int(NAME.match(str(f.relative_to(root))).group(3))
        offsets = pq.read_table(f, columns=["offset"]).column("offset").to_pylist()
        out[partition].append((offsets[0], offsets[-1]))
    return {p: sorted(r) for p, r in out.items()}


def check(root, topic, expected):
    for p, rs in ranges(root, topic).items():
        overlaps = [(a, b) for a, b in zip(rs, rs[1:]) if b[0] <= a[1]]
        assert not overlaps, f"partition {p}: objects overlap: {overlaps[:5]}"
    got, objects = rows_by_pyarrow(root, topic)
    assert set(got) == set(expected), (f"missing {sorted(set(expected) - set(got))[:10]}, "
                                       f"extra {sorted(set(got) - set(expected))[:10]}")
    if not any("headers" in e for e in expected.values()):
        for row in got.values():
            del row["headers"]
    wrong = [k for k in expected if got[k] != expected[k]]
    assert not wrong, f"{len(wrong)} rows differ, e.g. {wrong[0]}: {got[wrong[0]]} != {expected[wrong[0]]}"
    by_duckdb = rows_by_duckdb(root, topic)
    as_duckdb = {k: (e["kafka_timestamp"], e["tstamp"], e["payload"], e["key"], e["undecodable"], e["hour"])
                 for k, e in expected.items()}
    assert by_duckdb == as_duckdb
    return objects


@pytest.fixture(params=["garage", "local"])
def bucket(request, tmp_path):
    from test_archive import Bucket
    if request.param == "local":
        return Bucket("local", root=tmp_path / "data")
    name = f"parquet-{uuid.uuid4().hex[:12]}"
    request.getfixturevalue("garage").create_bucket(name)
    return Bucket("garage", server=request.getfixturevalue("garage"), name=name)


def test_sinetstream_records_in_parquet_read_back_by_pyarrow_and_duckdb(broker, bucket, run_archiver, tmp_path,
                                                                        archiver_bin, monkeypatch):
    rng = random.Random(23)
    run = uuid.uuid4().hex[:8]
    topic, group = f"pq.{run}", f"archiver-{run}"
    fixtures = oracle.fixture_records()
    broker.create_topic(topic, max(3, 1 + max(r["partition"] for r in fixtures)))
    # The real producer, every message format it offers.
    messages = 0
    for params in VARIANTS.values():
        batch = sinetstream_messages(rng, 12)
        produce_sinetstream(broker.bootstrap, topic, params, batch)
        messages += len(batch)
    # The fixture records as SINETStream wrote them (undecodable ones among them), some with a
    # key, an empty value, two tombstones and records two hours later.
    items = [(r["partition"], f"k{i}".encode() if i % 3 == 0 else None, bytes.fromhex(r["record_value_hex"]),
              r["kafka_timestamp_ms"]) for i, r in enumerate(fixtures)]
    items += [(0, b"empty", b"", 1795545118001), (1, None, b"\x00not sinetstream", 1795552318002),
              (2, b"deleted", None, 1795552318003), (0, None, None, 1795552318004)]
    # Headers as producers set them: a name twice, a null and an empty value, a non-ASCII name.
    headers = [("trace-id", b"\x00\x01"), ("trace-id", None), ("センサー", b"")]
    items = [item + ((headers[: 1 + i % 3],) if i % 4 == 1 else ()) for i, item in enumerate(items)]
    produce(broker.bootstrap, topic, items)
    total = messages + len(items)
    records = oracle.read_topic(broker.bootstrap, topic, total, headers=True)
    by_value = {bytes.fromhex(r["record_value_hex"]): r for r in fixtures}
    expected = expected_rows(records, fixtures=by_value)
    undecodable = sum(1 for e in expected.values() if e["undecodable"])
    assert undecodable >= 3

    a = run_archiver(BROKER_HOSTNAME=broker.bootstrap, KAFKA_TOPIC=topic, GROUP_ID=group, SPOOL_DIR=tmp_path / "spool",
                     ARCHIVE_FORMAT="parquet", BATCH_MAX_RECORDS=7, BATCH_MAX_AGE="1s", **bucket.env())
    a.wait_archived(total)
    m = a.metrics()
    assert a.stop() == 0, a.logs()
    assert sum(v for k, v in m.items() if k.startswith("kafka_s3_archiver_undecodable_records_total")) == undecodable
    assert m["kafka_s3_archiver_tombstones_total"] == 2, "counted, and kept as rows with a null payload"
    objects = check(download(bucket, tmp_path / "download"), topic, expected)
    assert m['kafka_s3_archiver_objects_uploaded_total{kind="parquet"}'] == objects
    assert m['kafka_s3_archiver_objects_uploaded_total{kind="payload"}'] == 0
    assert objects >= total // 7, f"{objects} objects for {total} records in batches of at most 7"
    ends = oracle.end_offsets(records)
    assert wait_committed(broker.bootstrap, group, topic, ends) == ends

    # A second run after a restart archives only what is new, in objects of its own.
    more = sinetstream_messages(rng, 9)
    produce_sinetstream(broker.bootstrap, topic, {}, more)
    records = oracle.read_topic(broker.bootstrap, topic, total + len(more), headers=True)
    expected = expected_rows(records, fixtures=by_value)
    a = run_archiver(BROKER_HOSTNAME=broker.bootstrap, KAFKA_TOPIC=topic, GROUP_ID=group, SPOOL_DIR=tmp_path / "spool",
                     ARCHIVE_FORMAT="parquet", BATCH_MAX_RECORDS=7, BATCH_MAX_AGE="1s", **bucket.env())
    a.wait_archived(len(more))
    time.sleep(1.5)  # anything extra would be archived by now
    assert a.metrics()["kafka_s3_archiver_records_archived_total"] == len(more)
    assert a.stop() == 0, a.logs()
    root = download(bucket, tmp_path / "download2")
    objects = check(root, topic, expected)
    env = tool_env(broker, topic, bucket)
    verify_and_restore(archiver_bin, env, broker, bucket, root, topic, records, expected, objects,
                       lambda target: sinetstream_reader(tmp_path, monkeypatch, broker.bootstrap, target))


def tool_env(broker, topic, bucket):
    """The settings a user gives `verify` and `restore` for this archive."""
    return {"BROKER_HOSTNAME": broker.bootstrap, "KAFKA_TOPIC": topic, "ARCHIVE_FORMAT": "parquet",
            **{k: str(v) for k, v in bucket.env().items()}}


def verify_and_restore(archiver_bin, env, broker, bucket, root, topic, records, expected, objects, reader):
    """`verify` finds the archive clean; `restore` gives back every record (SINETStream's reader
    decodes the messages, to the microsecond); then a deleted, a truncated and an overlapping
    object are each named, with Kafka and from the bucket alone."""
    n = len(expected)
    code, out, err = tool(archiver_bin, env, "verify")
    assert code == 0, out + err
    assert f"checked {n} offsets ({n} against Kafka, 0 from the bucket alone), {objects} objects found" in out, out
    assert f"clean: {n} offsets, {objects} objects" in out, out

    target = f"{topic}.restored"
    broker.create_topic(target, 1 + max(p for p, _ in expected))
    code, out, err = tool(archiver_bin, env, "restore", "--to-topic", target)
    assert code == 0 and f"produced {n} records" in out and "2 tombstones" in out, out + err
    with_headers = sum(1 for e in expected.values() if e.get("headers"))
    assert with_headers >= 3 and f"{with_headers} with their Kafka headers" in out, out
    decode = reader(target)
    restored = {(p, o): (key, value, ts, h)
                for p, o, key, value, ts, h in read_raw(broker.bootstrap, target, n, headers=True)}
    assert len(restored) == n
    for p, o, ts, value, key, headers in records:
        e = expected[(p, o)]
        got_key, got_value, got_ts, got_headers = restored[(p, o)]
        assert (got_key, got_ts, got_headers) == (key, ts, headers), (p, o)
        if e["tstamp"] is None:
            assert got_value == value, f"{(p, o)}: kept as it was"
        else:
            m = decode(got_value)
            assert (m.value, m.timestamp_us) == (e["payload"], e["tstamp"]), (p, o)

    per_partition = ranges(root, topic)

    def overlap_source(q):
        """The largest object of partition q that is neither the second (deleted) nor the fourth
        (truncated) one."""
        objs = per_partition[q]
        return max([objs[2], *objs[4:]], key=lambda r: r[1] - r[0])

    # A partition of at least 5 objects, one of the others holding 2 rows or more (which the
    # age and count seals do not always leave in the partition with the most objects).
    candidates = [q for q in per_partition if len(per_partition[q]) >= 5]
    assert candidates, per_partition
    p = max(candidates, key=lambda q: (overlap_source(q)[1] - overlap_source(q)[0], len(per_partition[q])))
    name = {}
    for f in (root / "topics" / topic).rglob("*.parquet"):
        m = NAME.match(str(f.relative_to(root)))
        name[(int(m.group(3)), int(m.group(4)))] = (str(f.relative_to(root)), f)
    objs = per_partition[p]
    # Deleted: the second object, truncated: the fourth, copied but its first row: the largest of the others.
    (d_first, d_last), (t_first, t_last) = objs[1], objs[3]
    o_first, o_last = overlap_source(p)
    deleted, truncated = name[(p, d_first)][0], name[(p, t_first)][0]
    bucket.delete(deleted)
    body = name[(p, t_first)][1].read_bytes()
    bucket.put(truncated, body[: len(body) // 2])
    # Written by another writer (pyarrow): the last object's rows but its first.
    again = pq.read_table(name[(p, o_first)][1]).slice(1)
    assert again.num_rows >= 1
    sink = io.BytesIO()
    pq.write_table(again, sink, compression="zstd")
    second = again.column("offset")[0].as_py()
    overlapping = name[(p, o_first)][0].replace(f"+{o_first:010d}.", f"+{second:010d}.")
    bucket.put(overlapping, sink.getvalue())
    lost = (d_last - d_first + 1) + (t_last - t_first + 1)

    def span(first, last):
        return f"offset {first} is" if first == last else f"offsets {first}..={last} ({last - first + 1} records) are"

    code, out, err = tool(archiver_bin, env, "verify")
    assert code == 1, out + err
    lines = out.splitlines()
    def line_for(kind, key):
        return next((line for line in lines if line.split()[:2] == [kind, key]), "")
    assert f"{span(d_first, d_last)} in Kafka and in no object" in line_for("MISSING", deleted), out
    assert "not a readable Parquet object" in line_for("MISMATCHED", truncated), out
    assert f"{span(t_first, t_last)} in Kafka and in no object" in line_for("MISSING", truncated), out
    assert f"partition {p}: {span(second, o_last)} in both" in line_for("TWICE", overlapping), out
    assert f"missing {lost}, mismatched 1, extra 0, offsets in gaps 0, archived twice {o_last - second + 1}" in out

    alone = {k: v for k, v in env.items() if k != "BROKER_HOSTNAME"}
    code, out, err = tool(archiver_bin, alone, "verify", "--bucket-only")
    assert code == 1, out + err
    assert f"offsets {d_first}..={d_last} are in no object" in out, out
    assert f"offsets {t_first}..={t_last} are in no object" in out, out
    assert "not a readable Parquet object" in line_for("MISMATCHED", truncated), out
    assert f"TWICE      {overlapping}" in out, out


def test_plain_values_of_any_producer(broker, run_archiver, tmp_path):
    """VALUE_FORMAT=plain: values are kept as they are, none is taken for an undecodable message."""
    run = uuid.uuid4().hex[:8]
    topic = f"plain.{run}"
    broker.create_topic(topic, 2)
    base = 1795545116000
    items = [(i % 2, None, json.dumps({"sensor": i, "t": 20 + i / 10}).encode(), base + i * 1000) for i in range(40)]
    produce(broker.bootstrap, topic, items)
    records = oracle.read_topic(broker.bootstrap, topic, len(items))
    a = run_archiver(BROKER_HOSTNAME=broker.bootstrap, KAFKA_TOPIC=topic, GROUP_ID=f"g-{run}",
                     SPOOL_DIR=tmp_path / "spool", ARCHIVE_DIR=tmp_path / "data", ARCHIVE_FORMAT="parquet",
                     VALUE_FORMAT="plain", BATCH_MAX_AGE="500ms")
    a.wait_archived(len(items))
    m = a.metrics()
    assert a.stop() == 0, a.logs()
    objects = check(tmp_path / "data" / "archive", topic, expected_rows(records, sinetstream=False))
    assert objects == 2, "one object per partition: 20 records, one hour, sealed by age"
    assert m['kafka_s3_archiver_batches_sealed_total{reason="age"}'] == 2


@pytest.mark.parametrize("store", ["garage", "local"])
def test_sigkill_cycles_leave_every_offset_in_exactly_one_object(broker, store, run_archiver, tmp_path, request):
    """A producer writes continuously while the archiver is killed (SIGKILL, every fourth cycle
    SIGTERM) and restarted; small batches and a short BATCH_MAX_AGE seal objects all the time, so
    kills land while batches are sealed, uploaded, marked stored and committed. In the end every
    offset is in exactly one object, objects of a partition do not overlap, every row is exact and
    the committed offsets are the end offsets."""
    from test_archive import Bucket
    cycles = int(os.environ.get("PARQUET_CRASH_CYCLES", "13"))  # 10 SIGKILL, 3 SIGTERM
    rng = random.Random(23)
    run = uuid.uuid4().hex[:8]
    topic, group, partitions = f"pqcrash.{run}", f"pqcrash-{run}", 4
    broker.create_topic(topic, partitions)
    if store == "local":
        bucket = Bucket("local", root=tmp_path / "data")
    else:
        bucket = Bucket("garage", server=request.getfixturevalue("garage"), name=f"pqcrash-{run}")
        bucket.server.create_bucket(bucket.name)
    env = dict(BROKER_HOSTNAME=broker.bootstrap, KAFKA_TOPIC=topic, GROUP_ID=group, SPOOL_DIR=tmp_path / "spool",
               COMMIT_INTERVAL_MS=2000, ARCHIVE_FORMAT="parquet", BATCH_MAX_RECORDS=50, BATCH_MAX_AGE="300ms",
               **bucket.env())
    producer = Producer(broker.bootstrap, topic, partitions, rate=300, sizes=(10, 200, 1000, 20_000),
                        undecodable_every=50)
    producer.start()
    terms, kills = 0, 0
    for cycle in range(cycles):
        a = run_archiver(**env)
        time.sleep(rng.uniform(0.5, 8.0))
        assert a.proc.poll() is None, a.logs()
        if cycle % 4 == 3:
            terms += 1
            assert a.stop(signal.SIGTERM) == 0, a.logs()
        else:
            kills += 1
            a.proc.send_signal(signal.SIGKILL)
            a.proc.wait()
    produced = producer.stop()

    records = oracle.read_topic(broker.bootstrap, topic, produced)
    ends = oracle.end_offsets(records)
    final = run_archiver(**env)
    deadline = time.time() + float(os.environ.get("PARQUET_CRASH_RECOVER_S", "300"))
    while (committed := oracle.committed(broker.bootstrap, group, topic, list(ends))) != ends:
        if time.time() > deadline or final.proc.poll() is not None:
            with urllib.request.urlopen(f"http://127.0.0.1:{final.rest_port}/status", timeout=5) as r:
                status = r.read().decode()
            raise AssertionError(f"committed {committed}, end {ends}\n/status: {status}\n{final.logs()}")
        time.sleep(1)
    sealed = {k: v for k, v in final.metrics().items() if k.startswith("kafka_s3_archiver_batches_sealed_total")}
    assert final.stop() == 0, final.logs()
    objects = check(download(bucket, tmp_path / "download"), topic, expected_rows(records))
    code, out, err = tool(request.getfixturevalue("archiver_bin"), tool_env(broker, topic, bucket), "verify")
    assert code == 0 and f"clean: {produced} offsets, {objects} objects" in out, out + err
    print(f"\nSUMMARY parquet crash[{store}]: {kills} SIGKILL, {terms} SIGTERM, records={produced} "
          f"objects={objects} last run's seals={sealed}")
    assert objects >= produced // 50


def test_store_outage_loses_nothing_and_memory_stays_flat(broker, garage, run_archiver, tmp_path):
    """The store goes away under 1,000 records/s: batches keep being sealed, their uploads retry,
    the spool fills to its bound and consumption pauses, with memory flat; when the store returns
    every record is in exactly one object, exact."""
    from test_archive import Bucket
    from test_faults import drain
    outage = int(os.environ.get("OUTAGE_SECONDS", "20"))
    run = uuid.uuid4().hex[:8]
    topic, group, name = f"pqoutage.{run}", f"pqoutage-{run}", f"pqoutage-{run}"
    broker.create_topic(topic, 4)
    garage.create_bucket(name)
    proxy = testbed.TcpProxy(garage.s3_port)
    bucket = Bucket("garage", server=garage, name=name)
    max_bytes = 8 << 20
    a = run_archiver(BROKER_HOSTNAME=broker.bootstrap, KAFKA_TOPIC=topic, GROUP_ID=group, SPOOL_DIR=tmp_path / "spool",
                     SPOOL_MAX_BYTES=max_bytes, ARCHIVE_FORMAT="parquet", BATCH_MAX_AGE="1s", S3_BUCKET_NAME=name,
                     S3_ENDPOINT_URL=proxy.endpoint, AWS_ACCESS_KEY_ID=testbed.ACCESS_KEY,
                     AWS_SECRET_KEY=testbed.SECRET_KEY)
    producer = Producer(broker.bootstrap, topic, 4, rate=1000)
    producer.start()
    time.sleep(8)  # join, then archive at the produce rate
    assert a.archived() > 0, a.logs()

    samples = store_down(a, proxy, outage)
    proxy.up()
    t_up = time.time()
    records = drain(broker, group, topic, producer, a, timeout=300)
    catch_up = time.time() - t_up
    objects = check(download(bucket, tmp_path / "download"), topic, expected_rows(records))

    paused_at = next((s[0] for s in samples if s[3] == 1), None)
    assert paused_at is not None, f"the consumer never paused in {outage}s: {samples}"
    flat = [s for s in samples if s[0] >= paused_at + 2]
    rss = [s[2] for s in flat]
    print(f"\nOUTAGE parquet garage: {outage}s down under 1000 records/s of 1 KB; paused after {paused_at:.0f}s; "
          f"peak spool {max(s[1] for s in samples) / 2**20:.1f} MiB (SPOOL_MAX_BYTES 8 MiB); RSS while paused "
          f"{min(rss) / 2**20:.1f}-{max(rss) / 2**20:.1f} MiB; {producer.count} records in {objects} objects, "
          f"all committed {catch_up:.1f}s after the store returned")
    assert max(s[1] for s in samples) <= max_bytes + (16 << 20)
    assert len(flat) >= 3 and max(rss) <= min(rss) * 1.10 + (16 << 20), rss


def test_instances_joining_and_leaving_under_load_store_each_offset_once(broker, garage, run_archiver, tmp_path):
    """Rebalances in the Parquet format: under a producer, a second and a third instance join and
    the second leaves (SIGTERM), each time moving partitions between instances while their
    batches are sealed and stored. Every offset ends up in exactly one object, no two overlap."""
    from test_archive import Bucket
    run = uuid.uuid4().hex[:8]
    topic, group, name, partitions = f"pqgroup.{run}", f"pqgroup-{run}", f"pqgroup-{run}", 6
    broker.create_topic(topic, partitions)
    garage.create_bucket(name)
    bucket = Bucket("garage", server=garage, name=name)
    producer = Producer(broker.bootstrap, topic, partitions, rate=300, undecodable_every=50)
    producer.start()

    def instance(i):
        return run_archiver(BROKER_HOSTNAME=broker.bootstrap, KAFKA_TOPIC=topic, GROUP_ID=group,
                            SPOOL_DIR=tmp_path / f"spool-{i}", ARCHIVE_FORMAT="parquet", BATCH_MAX_RECORDS=50,
                            BATCH_MAX_AGE="300ms", COMMIT_INTERVAL_MS=1000, **bucket.env())

    a = instance(0)
    time.sleep(6)
    b = instance(1)
    time.sleep(8)
    c = instance(2)
    time.sleep(8)
    b_share = b.archived()
    assert b.stop() == 0, b.logs()
    time.sleep(8)
    producer.stop()
    records = oracle.read_topic(broker.bootstrap, topic, producer.count)
    ends = oracle.end_offsets(records)
    assert wait_committed(broker.bootstrap, group, topic, ends, timeout=120) == ends, a.logs()
    shares = [a.archived(), b_share, c.archived()]
    for m in (a, c):
        assert m.stop() == 0, m.logs()
    objects = check(download(bucket, tmp_path / "download"), topic, expected_rows(records))
    print(f"\nGROUP parquet: 3 instances joining and one leaving on {partitions} partitions; archived {shares} "
          f"by each; {producer.count} records in {objects} objects, each offset once, no overlap")
    assert all(n > 0 for n in shares[:2]), shares


def test_a_new_owner_without_the_spool_takes_the_stored_objects_as_they_are(broker, garage, run_archiver, tmp_path):
    """An instance stores objects and is killed before it commits them; the next owner of the
    partitions has none of its spool (another instance, or a lost disk). Kafka delivers from the
    committed offset again: the objects already stored are found and taken as they are, so no
    offset goes into a second object and no object is written over."""
    run = uuid.uuid4().hex[:8]
    topic, group, bucket = f"pqtake.{run}", f"pqtake-{run}", f"pqtake-{run}"
    broker.create_topic(topic, 2)
    garage.create_bucket(bucket)
    base = 1795545116000
    items = [(i % 2, None, json.dumps({"sensor": i}).encode(), base + i * 100) for i in range(300)]
    produce(broker.bootstrap, topic, items)
    records = oracle.read_topic(broker.bootstrap, topic, len(items))
    ends = oracle.end_offsets(records)
    store = {"S3_BUCKET_NAME": bucket, "S3_ENDPOINT_URL": garage.endpoint, "AWS_ACCESS_KEY_ID": testbed.ACCESS_KEY,
             "AWS_SECRET_KEY": testbed.SECRET_KEY}
    env = dict(BROKER_HOSTNAME=broker.bootstrap, KAFKA_TOPIC=topic, GROUP_ID=group, ARCHIVE_FORMAT="parquet",
               VALUE_FORMAT="plain", BATCH_MAX_RECORDS=40, BATCH_MAX_AGE="300ms", **store)
    # The first owner commits once an hour: killed, it leaves every object stored and uncommitted.
    first = run_archiver(SPOOL_DIR=tmp_path / "spool-1", COMMIT_INTERVAL_MS=3_600_000, **env)
    first.wait_archived(len(items))
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()
    assert oracle.committed(broker.bootstrap, group, topic, list(ends)) != ends, "the test needs uncommitted objects"
    s3 = garage.client()
    before = {o["Key"]: o["ETag"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    more = [(i % 2, None, json.dumps({"sensor": i}).encode(), base + i * 100) for i in range(300, 400)]
    produce(broker.bootstrap, topic, more)
    records = oracle.read_topic(broker.bootstrap, topic, len(items) + len(more))
    ends = oracle.end_offsets(records)

    second = run_archiver(SPOOL_DIR=tmp_path / "spool-2", **env)
    assert wait_committed(broker.bootstrap, group, topic, ends) == ends
    m = second.metrics()
    assert second.stop() == 0, second.logs()
    after = {o["Key"]: o["ETag"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    assert {k: after.get(k) for k in before} == before, "the objects stored first are neither lost nor rewritten"
    assert m.get('kafka_s3_archiver_objects_uploaded_total{kind="parquet"}', 0) == len(after) - len(before)
    assert "an object an earlier owner stored is taken as it is" in second.logs()
    from test_archive import Bucket
    check(download(Bucket("garage", server=garage, name=bucket), tmp_path / "download"), topic,
          expected_rows(records, sinetstream=False))
    assert len(after) > len(before), "the records produced after the kill are in objects of their own"
    print(f"\nSUMMARY parquet takeover: {len(before)} objects stored by the first owner, "
          f"{len(after) - len(before)} by the second, {len(records)} records, each in one object")


def test_a_multipart_upload_a_crash_leaves_open_is_aborted_at_the_next_start(broker, moto, run_archiver, tmp_path):
    """An object large enough for a multipart upload (14 MiB that zstd cannot shrink), through a
    store a second away per request; the archiver is killed while the upload is open, as the
    store's list of multipart uploads shows. The next start aborts it and stores the object again:
    no upload left open, every record in one object. moto keeps an upload until it is aborted, as
    S3 does (garage drops it once another upload of the key completes, so it cannot tell)."""
    from test_archive import Bucket
    run = uuid.uuid4().hex[:8]
    topic, group, bucket = f"pqmulti.{run}", f"pqmulti-{run}", f"pqmulti-{run}"
    broker.create_topic(topic, 1)
    moto.create_bucket(bucket)
    base = 1795545116000
    items = [(0, None, os.urandom(64 << 10), base + i) for i in range(224)]
    produce(broker.bootstrap, topic, items)
    records = oracle.read_topic(broker.bootstrap, topic, len(items))
    ends = oracle.end_offsets(records)
    proxy = testbed.TcpProxy(moto.port, delay=1.0)
    env = dict(BROKER_HOSTNAME=broker.bootstrap, KAFKA_TOPIC=topic, GROUP_ID=group, SPOOL_DIR=tmp_path / "spool",
               ARCHIVE_FORMAT="parquet", VALUE_FORMAT="plain", BATCH_MAX_AGE="1s", S3_BUCKET_NAME=bucket,
               S3_ENDPOINT_URL=proxy.endpoint, AWS_ACCESS_KEY_ID=testbed.ACCESS_KEY,
               AWS_SECRET_KEY=testbed.SECRET_KEY)
    s3 = moto.client()

    def open_uploads():
        return [(u["Key"], u["UploadId"]) for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]

    first = run_archiver(**env)
    deadline = time.time() + 90
    while not (left := open_uploads()):
        assert time.time() < deadline and first.proc.poll() is None, f"no multipart upload began\n{first.logs()}"
        time.sleep(0.05)
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()
    assert open_uploads() == left, "the kill left the upload open"

    second = run_archiver(**env)
    assert wait_committed(broker.bootstrap, group, topic, ends, timeout=90) == ends, second.logs()
    assert second.stop() == 0, second.logs()
    assert open_uploads() == [], f"left open: {open_uploads()}\n{second.logs()}"
    assert "aborted the multipart uploads an earlier run left open" in second.logs()
    objects = check(download(Bucket("moto", server=moto, name=bucket), tmp_path / "download"), topic,
                    expected_rows(records, sinetstream=False))
    print(f"\nSUMMARY parquet multipart: killed with {len(left)} upload open ({left[0][0]}); "
          f"the next start aborted it and stored {len(records)} records in {objects} objects")
