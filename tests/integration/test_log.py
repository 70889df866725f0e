"""What the log says while something is down: a broker that refuses connections and a store that
does not answer are said once with what to check, then at most every 10 s, then once more when
they answer; a topic created after the start is said to be missing, then archived within seconds."""
import re
import time
import uuid

import oracle
import testbed
from load import v3_message
from test_archive import Bucket, produce_raw
from test_operations import get_json, wait_for

DOWN_SECONDS = 30


def lines(archiver):
    return [line for line in archiver.log_path.read_text(errors="replace").splitlines() if line.strip()]


def count(archiver, text):
    return sum(text in line for line in lines(archiver))


def test_a_broker_down_then_a_topic_created_late_are_said_briefly_and_archived(run_archiver, tmp_path):
    run = uuid.uuid4().hex[:8]
    topic, never, group = f"late.{run}", f"never.{run}", f"late-{run}"
    port = testbed.free_port()
    bucket = Bucket("local", root=tmp_path / "archive")
    a = run_archiver(BROKER_HOSTNAME=f"127.0.0.1:{port}", KAFKA_TOPIC=f"{topic},{never}", GROUP_ID=group,
                     SPOOL_DIR=tmp_path / "spool", **bucket.env())
    time.sleep(DOWN_SECONDS)
    said = lines(a)
    print(f"\n{len(said)} log lines in {DOWN_SECONDS} s with no broker:\n" + "\n".join(l[:200] for l in said))
    assert count(a, "cannot reach the Kafka broker: check BROKER_HOSTNAME") == 1
    assert 1 <= count(a, "still cannot reach the Kafka broker") <= DOWN_SECONDS // 10
    # Start-up, subscription, the cause, librdkafka's own first lines and the reminders.
    assert len(said) <= 12, said

    broker = testbed.Tansu(port=port)
    try:
        wait_for("the log says the broker answers", lambda: count(a, "the Kafka broker answers again") == 1,
                 timeout=20, show=lambda: lines(a)[-5:])
        # The topics do not exist yet: each said once, and shown on /status.
        wait_for("the log says both topics are missing",
                 lambda: count(a, "a topic to archive does not exist") == 2, timeout=30, show=lambda: lines(a)[-5:])
        assert get_json(a.rest_port, "/status")[1]["consumer"]["missing_topics"] == sorted([topic, never])

        created = time.time()
        broker.create_topic(topic, 2)
        items = [(i % 2, v3_message(1650250000123456 + i, b"late %d" % i), 1795545116000 + i) for i in range(20)]
        produce_raw(broker.bootstrap, topic, items)
        ends = oracle.end_offsets(oracle.read_topic(broker.bootstrap, topic, len(items)))
        wait_for("the records of the new topic committed",
                 lambda: oracle.committed(broker.bootstrap, group, topic, [0, 1]) == ends, timeout=60)
        took = time.time() - created
        print(f"LATE TOPIC: created {DOWN_SECONDS}+ s after the start, all {len(items)} records committed "
              f"{took:.1f} s after its creation")
        wait_for("/status lists only the topic never created as missing",
                 lambda: get_json(a.rest_port, "/status")[1]["consumer"]["missing_topics"] == [never], timeout=10)
        assert count(a, "a topic to archive does not exist") == 2, "each said once"
        assert a.archived() == len(items)
        assert a.stop() == 0, a.logs()
    finally:
        broker.stop()


def test_a_store_down_is_said_once_then_every_few_seconds_then_when_it_answers(broker, garage, run_archiver,
                                                                                 tmp_path):
    run = uuid.uuid4().hex[:8]
    topic, group, name = f"storedown.{run}", f"storedown-{run}", f"storedown-{run}"
    broker.create_topic(topic, 2)
    proxy = testbed.TcpProxy(garage.s3_port)
    proxy.down()
    items = [(i % 2, v3_message(1650250000123456 + i, b"x" * 100), 1795545116000 + i) for i in range(200)]
    produce_raw(broker.bootstrap, topic, items)
    a = run_archiver(BROKER_HOSTNAME=broker.bootstrap, KAFKA_TOPIC=topic, GROUP_ID=group, SPOOL_DIR=tmp_path / "spool",
                     S3_BUCKET_NAME=name, S3_ENDPOINT_URL=proxy.endpoint, AWS_ACCESS_KEY_ID=testbed.ACCESS_KEY,
                     AWS_SECRET_KEY=testbed.SECRET_KEY)
    wait_for("uploads start failing", lambda: count(a, "upload failed; retrying") >= 1, timeout=30)
    time.sleep(DOWN_SECONDS)
    said = lines(a)
    print(f"\n{len(said)} log lines with the store down for {DOWN_SECONDS}+ s and 32 uploads in flight:\n"
          + "\n".join(l[:200] for l in said))
    assert count(a, "upload failed; retrying") == 1
    assert 1 <= count(a, "uploads still failing") <= DOWN_SECONDS // 10 + 2
    assert len(said) <= 16, said

    # The store answers again, but the bucket is missing: another trouble, said at once with its fix.
    proxy.up()
    wait_for("the missing bucket is said", lambda: count(a, "upload refused: the bucket was not found") == 1,
             timeout=30, show=lambda: lines(a)[-3:])
    time.sleep(5)
    garage.create_bucket(name)
    ends = oracle.end_offsets(oracle.read_topic(broker.bootstrap, topic, len(items)))
    wait_for("everything committed", lambda: oracle.committed(broker.bootstrap, group, topic, [0, 1]) == ends,
             timeout=60)
    # Each trouble is said to be over once no upload failed for 10 s: the outage, the missing bucket
    # (and garage may refuse a moment while it grants the new bucket to the key: a third reason).
    over = lambda: [l for l in lines(a) if "the store takes uploads again" in l]  # noqa: E731
    wait_for("both troubles said to be over", lambda: any('reason="other"' in l for l in over())
             and any('reason="not_found"' in l for l in over()), timeout=30, show=lambda: lines(a)[-5:])
    reasons = [re.search(r'reason="(\w+)"', l).group(1) for l in over()]
    assert len(reasons) == len(set(reasons)), f"each said to be over once: {reasons}"
    assert count(a, "upload refused: the bucket was not found") == 1 and count(a, "upload failed; retrying") == 1
    assert a.archived() == len(items)
    assert a.stop() == 0, a.logs()
