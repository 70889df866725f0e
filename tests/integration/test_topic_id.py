"""A topic deleted and created again between two runs: its offsets start again, and the new records
land beside the old ones in the archive. The archiver records each topic's id (Kafka's, as
kafka-topics.sh prints it) in SPOOL_DIR, and says so at start-up when the id changed."""
import base64
import json
import re
import struct
import subprocess
import time
import urllib.request
import uuid

from confluent_kafka import TopicCollection
from confluent_kafka.admin import AdminClient

import oracle
import testbed
from load import v3_message
from test_archive import Bucket, produce_raw

PARTITIONS = 2
# Kafka timestamps of the records of the first topic and of the topic created again: other hours,
# so both stay in the archive.
FIRST_MS, AGAIN_MS = 1650250000123, 1650350000456
CHANGED = "a topic was deleted and created again since the archiver last ran"
ERROR = "ERROR kafka_s3_archiver::pipeline::topic_id:"


def kafka_topic_id(bootstrap, topic):
    """The topic's id as Kafka's own tools print it: URL-safe base64 of its 16 bytes, no padding."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    desc = admin.describe_topics(TopicCollection([topic]), request_timeout=10)[topic].result(15)
    raw = struct.pack(">qq", desc.topic_id.get_most_significant_bits(), desc.topic_id.get_least_significant_bits())
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def produce(bootstrap, topic, tag, per_partition, ts_ms):
    """SINETStream records, `per_partition` in each partition; [(partition, offset, ts, value, key)]."""
    items = [(p, v3_message(ts_ms * 1000 + i, f"{tag} p{p} #{i}".encode()), ts_ms)
             for p in range(PARTITIONS) for i in range(per_partition)]
    produce_raw(bootstrap, topic, items)
    return oracle.read_topic(bootstrap, topic, len(items))


def tansu_topic(broker, *args):
    subprocess.run([str(testbed.tansu_path()), "topic", *args, "--broker", f"tcp://127.0.0.1:{broker.port}"],
                   check=True, capture_output=True, timeout=30)


def status(port):
    """/status as JSON; {} while the endpoint is not up yet."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as r:
            return json.loads(r.read())
    except OSError:
        return {}


def log(a):
    """The archiver's whole log (Archiver.logs() keeps only its end)."""
    return a.log_path.read_text(errors="replace")


def wait_for(what, predicate, timeout=60, show=lambda: ""):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"not within {timeout}s: {what} {show()}")


def archive_until_committed(run_archiver, broker, env, topic, group, ends):
    a = run_archiver(**env)
    wait_for("every offset committed", lambda: oracle.committed(broker.bootstrap, group, topic,
                                                                range(PARTITIONS)) == ends, show=a.logs)
    wait_for("/status shows every partition caught up", lambda: sorted(
        (p["partition"], p["committed"], p["end"]) for p in status(a.rest_port).get("partitions", []))
        == [(p, ends[p], ends[p]) for p in range(PARTITIONS)], timeout=20, show=lambda: status(a.rest_port))
    return a


def test_a_topic_deleted_and_created_again_is_reported_and_its_new_records_archived(broker, run_archiver, tmp_path):
    topic, group = f"reborn-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    bucket = Bucket("local", root=tmp_path / "data")
    env = dict(BROKER_HOSTNAME=broker.bootstrap, KAFKA_TOPIC=topic, GROUP_ID=group, SPOOL_DIR=tmp_path / "spool",
               **bucket.env())
    # Kept in SPOOL_DIR: the bucket holds the archive and nothing else.
    id_file = tmp_path / "spool" / "topic-ids" / topic

    # A first start records the topic's id, and that is all.
    broker.create_topic(topic, PARTITIONS)
    first_id = kafka_topic_id(broker.bootstrap, topic)
    first = produce(broker.bootstrap, topic, "first", 3, FIRST_MS)
    a = archive_until_committed(run_archiver, broker, env, topic, group, oracle.end_offsets(first))
    assert status(a.rest_port)["last_error"] is None, status(a.rest_port)
    assert a.stop() == 0, a.logs()
    assert id_file.read_bytes() == f"{first_id}\n".encode()
    assert ERROR not in log(a) and "recorded the topic's id" in log(a), log(a)

    # Deleted (with the archiver stopped: librdkafka 2.16 crashed in a consumer whose topic went
    # away) and created again: a new id, offsets from 0 again, and tansu drops the group's offsets.
    tansu_topic(broker, "delete", topic)
    broker.create_topic(topic, PARTITIONS)
    again_id = kafka_topic_id(broker.bootstrap, topic)
    assert again_id != first_id
    again = produce(broker.bootstrap, topic, "again", 2, AGAIN_MS)
    assert [o for _, o, *_ in again] == [0, 1, 0, 1], "the offsets start again"

    a = archive_until_committed(run_archiver, broker, env, topic, group, oracle.end_offsets(again))
    error = next((line for line in log(a).splitlines() if CHANGED in line), None)
    assert error and ERROR in error, log(a)
    assert f"topic={topic}" in error and f"recorded_topic_id={first_id}" in error and f"topic_id={again_id}" in error, error
    reported = status(a.rest_port)["last_error"]
    assert reported and reported["message"].startswith(
        f"topic {topic} was deleted and created again (topic id {first_id}, now {again_id})"), reported
    print(f"\nlog: {error}\n/status last_error: {reported['message']}")
    assert a.stop() == 0, a.logs()

    # Both topics' records are in the archive, and the new id is recorded.
    got = bucket.read_all()
    for records in (first, again):
        expected, reasons = oracle.expected_objects(topic, records)
        assert not reasons
        wrong = {k: got.get(k) for k, body in expected.items() if got.get(k) != body}
        assert not wrong, wrong
    assert id_file.read_bytes() == f"{again_id}\n".encode()

    # Said once: the next start finds the recorded id current. A topic that does not exist has no
    # id to compare, and that is no error either.
    missing = f"missing-{uuid.uuid4().hex[:8]}"
    a = run_archiver(**{**env, "KAFKA_TOPIC": f"{topic},{missing}",
                        "RUST_LOG": "info,object_store=warn,kafka_s3_archiver::pipeline::topic_id=debug"})
    wait_for("partitions assigned", lambda: status(a.rest_port).get("partitions"), timeout=30, show=a.logs)
    assert a.stop() == 0, a.logs()
    assert CHANGED not in log(a) and ERROR not in log(a), log(a)
    assert re.search(rf"the topic's id is the one recorded topic={topic} topic_id={again_id}", log(a)), log(a)
    assert re.search(rf"Kafka gave no topic id.* topic={missing}", log(a)), log(a)


def test_a_broker_that_is_down_delays_the_start_by_seconds_only(run_archiver, tmp_path):
    down = f"127.0.0.1:{testbed.free_port()}"
    a = run_archiver(BROKER_HOSTNAME=down, KAFKA_TOPIC="t", SPOOL_DIR=tmp_path / "spool",
                     RUST_LOG="info,object_store=warn,kafka_s3_archiver::pipeline::topic_id=debug",
                     **Bucket("local", root=tmp_path / "data").env())
    started = time.time()
    wait_for("the consumer subscribed", lambda: "subscribed" in a.logs(), timeout=20, show=a.logs)
    took = time.time() - started
    assert a.stop() == 0, a.logs()
    print(f"\nbroker down: subscribed {took:.1f}s after the start")
    assert took < 10, a.logs()
    assert re.search(r"cannot ask Kafka for the topics' ids.*(timed out|did not answer)", log(a), re.I), log(a)
