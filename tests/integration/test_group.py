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
    got = check_archive(bucket, expected, reasons)
    summary("scale-out 3 instances, 1 killed", producer.count, got, expected, reasons, members + [victim], recover_s)
    print(f"\nGROUP: 3 instances on {partitions} partitions, archived {shares} each before one was killed; "
          f"the 2 survivors went from {before} to {after}; {producer.count} records, archive exact, "
          f"committed == end offsets")
    assert sum(a - b for a, b in zip(after, before)) > 0
