"""Scale-out through the consumer group: instances share the partitions; when one dies the others
take its partitions over, and the archive stays exact (no loss, no duplicate objects, committed =
end offsets)."""
import random
import signal
import time
import uuid

import oracle
import testbed
from test_archive import Bucket, check_archive, summary, wait_committed
from load import Producer


def test_three_instances_share_the_topic_and_survive_losing_one(broker, garage, run_archiver, tmp_path):
    run = uuid.uuid4().hex[:8]
    topic, group, name, partitions = f"group.{run}", f"group-{run}", f"group-{run}", 6
    broker.create_topic(topic, partitions)
    garage.create_bucket(name)
    bucket = Bucket("garage", server=garage, name=name)
    producer = Producer(broker.bootstrap, topic, partitions, rate=300)
    producer.start()

    def instance(i):
        return run_archiver(BROKER_HOSTNAME=broker.bootstrap, KAFKA_TOPIC=topic, GROUP_ID=group,
                            SPOOL_DIR=tmp_path / f"spool-{i}", S3_BUCKET_NAME=name, S3_ENDPOINT_URL=garage.endpoint,
                            AWS_ACCESS_KEY_ID=testbed.ACCESS_KEY, AWS_SECRET_KEY=testbed.SECRET_KEY)

    members = [instance(i) for i in range(3)]
    deadline = time.time() + 60
    while not all(m.archived() > 0 for m in members):
        assert time.time() < deadline, "not every instance got partitions:\n" + members[0].logs()
        time.sleep(0.5)
    shares = [m.archived() for m in members]

    victim = members.pop(random.Random(8).randrange(3))
    t_kill = time.time()
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait()
    before = [m.archived() for m in members]
    time.sleep(15)  # the victim's session (6 s) expires, the survivors take its partitions
    producer.stop()

    records = oracle.read_topic(broker.bootstrap, topic, producer.count)
    ends = oracle.end_offsets(records)
    assert wait_committed(broker.bootstrap, group, topic, ends, timeout=120) == ends, members[0].logs()
    recover_s = time.time() - t_kill
    after = [m.archived() for m in members]
    for m in members:
        assert m.stop() == 0, m.logs()
    expected, reasons = oracle.expected_objects(topic, records)
    got = check_archive(bucket, expected, reasons, digests=True)
    summary("scale-out 3 instances, 1 killed", producer.count, got, expected, reasons, members + [victim], recover_s)
    print(f"\nGROUP: 3 instances on {partitions} partitions, archived {shares} each before one was killed; "
          f"the 2 survivors went from {before} to {after}; {producer.count} records, archive exact, "
          f"committed == end offsets")
    assert sum(a - b for a, b in zip(after, before)) > 0


def test_a_partition_paused_before_a_rebalance_is_fetched_when_it_comes_back(broker, garage, run_archiver, tmp_path):
    """librdkafka keeps a partition's pause flag across revocation and a later assignment. Instance A
    pauses both partitions (its store is down); B joins and takes one; A's store comes back and A
    resumes what it has; B leaves and A gets the other partition back: it must be fetched again."""
    run = uuid.uuid4().hex[:8]
    topic, group, name = f"repause.{run}", f"repause-{run}", f"repause-{run}"
    broker.create_topic(topic, 2)
    garage.create_bucket(name)
    bucket = Bucket("garage", server=garage, name=name)
    proxy = testbed.TcpProxy(garage.s3_port)
    proxy.down()
    store = dict(S3_BUCKET_NAME=name, AWS_ACCESS_KEY_ID=testbed.ACCESS_KEY, AWS_SECRET_KEY=testbed.SECRET_KEY)
    common = dict(BROKER_HOSTNAME=broker.bootstrap, KAFKA_TOPIC=topic, GROUP_ID=group, SPOOL_MAX_RECORDS=40)
    producer = Producer(broker.bootstrap, topic, 2, rate=100)
    producer.start()
    a = run_archiver(**common, **store, SPOOL_DIR=tmp_path / "spool-a", S3_ENDPOINT_URL=proxy.endpoint)

    def wait(what, condition, timeout=60):
        deadline = time.time() + timeout
        while not condition():
            assert time.time() < deadline, f"{what} within {timeout}s:\nA:\n{a.logs()}"
            time.sleep(0.2)

    wait("A pauses with its store down", lambda: a.metric("kafka_s3_archiver_consumer_paused") == 1)
    b = run_archiver(**common, **store, SPOOL_DIR=tmp_path / "spool-b", S3_ENDPOINT_URL=garage.endpoint)
    wait("B takes a partition and archives", lambda: b.archived() > 0)
    proxy.up()
    wait("A drains and resumes", lambda: a.metric("kafka_s3_archiver_consumer_paused") == 0)
    assert b.stop() == 0, b.logs()
    t_leave = time.time()
    time.sleep(5)  # A takes B's partition over, and both get new records
    producer.stop()
    records = oracle.read_topic(broker.bootstrap, topic, producer.count)
    ends = oracle.end_offsets(records)
    got = wait_committed(broker.bootstrap, group, topic, ends, timeout=60)
    assert got == ends, f"committed {got} != ends {ends}: a partition stayed paused\nA:\n{a.logs()}"
    settle = time.time() - t_leave
    assert a.stop() == 0, a.logs()
    expected, reasons = oracle.expected_objects(topic, records)
    got = check_archive(bucket, expected, reasons, digests=True)
    summary("pause, rebalance, resume, rebalance", producer.count, got, expected, reasons, [a, b], settle)
