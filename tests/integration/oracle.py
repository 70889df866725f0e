"""What the Kafka Connect deployment would have written, computed independently of the archiver.

Records are read back from the broker with librdkafka (confluent-kafka); payload and tstamp come
from SINETStream's own decoding (sinetstream.packet / sinetstream.marshal), keys and bodies from
docs/compat.md.
"""
import datetime
import json
import os
import time
from pathlib import Path
from zoneinfo import ZoneInfo

import confluent_kafka as ck
from confluent_kafka.admin import AdminClient
from sinetstream.marshal import Unmarshaller
from sinetstream.packet import Packet

TOKYO = ZoneInfo("Asia/Tokyo")
SHARED_FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures"
REPO_FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def fixture_records():
    """Every record of the fixture files: the repository's copy, the shared ones if present, and
    those in the directory named by EXTRA_FIXTURES (made with gen_sinetstream_vectors.py)."""
    records, seen = [], set()
    extra = [Path(os.environ["EXTRA_FIXTURES"])] if os.environ.get("EXTRA_FIXTURES") else []
    for d in (SHARED_FIXTURES, REPO_FIXTURES, *extra):
        for f in sorted(d.glob("*.json")) if d.is_dir() else []:
            for r in json.loads(f.read_text())["records"]:
                ident = (r["topic"], r["partition"], r["offset"], r["record_value_hex"])
                if ident not in seen:
                    seen.add(ident)
                    records.append(r)
    assert records, "no fixture records found"
    return records


def read_topic(bootstrap, topic, count, timeout=60, headers=False):
    """All records of a topic: [(partition, offset, timestamp_ms, value, key)], value None for a tombstone;
    with `headers`, each record's [(name, value)] after them."""
    md = AdminClient({"bootstrap.servers": bootstrap}).list_topics(topic, timeout=10)
    c = ck.Consumer({"bootstrap.servers": bootstrap, "group.id": f"oracle-{time.time_ns()}",
                     "enable.auto.commit": False})
    c.assign([ck.TopicPartition(topic, p, ck.OFFSET_BEGINNING) for p in md.topics[topic].partitions])
    out, deadline = [], time.time() + timeout
    while len(out) < count and time.time() < deadline:
        m = c.poll(0.5)
        if m is None or m.error():
            continue
        out.append((m.partition(), m.offset(), m.timestamp()[1], m.value(), m.key())
                   + ((m.headers() or [],) if headers else ()))
    c.close()
    assert len(out) == count, f"read {len(out)} of {count} records of {topic}"
    return sorted(out)


def end_offsets(records):
    """Per partition, one past the last offset produced (not the broker's high watermark)."""
    ends = {}
    for p, o, *_ in records:
        ends[p] = max(ends.get(p, 0), o + 1)
    return ends


def committed(bootstrap, group, topic, partitions, **conf):
    c = ck.Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False, **conf})
    try:
        got = c.committed([ck.TopicPartition(topic, p) for p in partitions], timeout=10)
        return {tp.partition: tp.offset for tp in got}
    finally:
        c.close()


def hour_path(ms):
    t = datetime.datetime.fromtimestamp(ms // 1000, TOKYO)
    return f"year={t.year:04d}/month={t.month:02d}/day={t.day:02d}/hour={t.hour:02d}"


def ts_text(us):
    ms = int(us / 1000) if us < 0 else us // 1000  # Java truncates toward zero
    dt = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc) + datetime.timedelta(milliseconds=ms)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}"


def sinetstream_fields(value):
    """(tstamp_us, avro msg bytes) as SINETStream itself decodes them, or None if it cannot."""
    try:
        key_version, body = Packet.unpack(value)
        if key_version not in (None, Packet.KEYVER_NOENC):
            return None
        tstamp, msg = Unmarshaller().unmarshal(body)
        return tstamp, msg
    except Exception:
        return None


def stem(root, topic, partition, offset, ts_ms):
    return f"{root}/{topic}/{hour_path(ts_ms)}/{topic}+{partition}+{offset:010d}"


def expected_objects(topic, records, ext=".bin", sep=b"\n", fixtures=None):
    """{key: body} for records [(partition, offset, ts_ms, value, key)] of a topic, and the set of
    dead-letter keys whose body is the raw value (reason objects are checked separately).

    fixtures: {value bytes: fixture record}, used as the oracle for those values when given."""
    objects, reasons = {}, set()
    for p, o, ts, value, _key in records:
        if value is None:
            continue  # tombstone: skipped
        fx = (fixtures or {}).get(value)
        if fx is not None:
            fields = None if fx["avro_msg_hex"] is None else (fx["tstamp_us"], bytes.fromhex(fx["avro_msg_hex"]))
            if fields is not None:
                assert ts_text(fields[0]) == fx["timestamp_text"]
        else:
            fields = sinetstream_fields(value)
        s_topics, s_errors = stem("topics", topic, p, o, ts), stem("errors", topic, p, o, ts)
        if fields is None:
            objects[s_errors + ".raw"] = value
            reasons.add(s_errors + "-reason.txt")
        else:
            tstamp, msg = fields
            objects[s_topics + ext] = msg + sep
            objects[s_topics + "-timestamp.txt"] = ts_text(tstamp).encode() + sep
    return objects, reasons
