"""Crash test: a producer writes continuously while the archiver is killed with SIGKILL at random
moments (while fetching, spooling, uploading, committing) and restarted. In the end every offset
has exactly its two objects with exact bytes, nothing else is stored, and the committed offsets
equal the end offsets.

CRASH_CYCLES (default 5 in CI; the full run uses 20 or more) sets the number of kills.
"""
import os
import random
import signal
import time
import uuid

import pytest

import oracle
from load import Producer
from test_archive import Bucket, summary


@pytest.fixture(params=["garage", "local"])
def crash_bucket(request, tmp_path):
    if request.param == "local":
        return Bucket("local", root=tmp_path / "data")
    server = request.getfixturevalue("garage")
    name = f"crash-{uuid.uuid4().hex[:12]}"
    server.create_bucket(name)
    return Bucket("garage", server=server, name=name)


def test_sigkill_cycles_lose_nothing_and_duplicate_nothing(broker, crash_bucket, run_archiver, tmp_path):
    cycles = int(os.environ.get("CRASH_CYCLES", "5"))
    rng = random.Random(5)
    run = uuid.uuid4().hex[:8]
    topic, group, partitions = f"crash.{run}", f"crash-{run}", 4
    broker.create_topic(topic, partitions)
    env = dict(BROKER_HOSTNAME=broker.bootstrap, KAFKA_TOPIC=topic, GROUP_ID=group, SPOOL_DIR=tmp_path / "spool",
               UPLOAD_WORKERS=16, COMMIT_INTERVAL_MS=100, **crash_bucket.env())
    producer = Producer(broker.bootstrap, topic, partitions, rate=300, sizes=(10, 200, 1000, 20_000), undecodable_every=50)
    producer.start()
    terms, archivers = 0, []
    for cycle in range(cycles):
        a = run_archiver(**env)
        archivers.append(a)
        # Up to a little past the group join (about 3 s with a 6 s session), so kills land before,
        # during and after the join, with uploads and commits in flight.
        time.sleep(rng.uniform(0.5, 8.0))
        assert a.proc.poll() is None, a.logs()
        # Mostly SIGKILL; every fourth cycle a graceful SIGTERM under load, which must exit 0.
        if cycle % 4 == 3:
            terms += 1
            assert a.stop(signal.SIGTERM) == 0, a.logs()
        else:
            a.proc.send_signal(signal.SIGKILL)
            a.proc.wait()
    produced = producer.stop()

    records = oracle.read_topic(broker.bootstrap, topic, produced)
    ends = oracle.end_offsets(records)
    final = run_archiver(**env)
    archivers.append(final)
    deadline = time.time() + 300
    while oracle.committed(broker.bootstrap, group, topic, list(ends)) != ends:
        assert time.time() < deadline and final.proc.poll() is None, final.logs()
        time.sleep(1)
    assert final.stop() == 0, final.logs()
    recover_s = time.time() - final.started  # from the last restart to all committed

    expected, reasons = oracle.expected_objects(topic, records)
    got = crash_bucket.read_all(digests=True)
    lost, duplicate, extra, wrong = summary(
        f"crash[{crash_bucket.kind}] {cycles} cycles ({cycles - terms} SIGKILL, {terms} SIGTERM)", produced, got,
        expected, reasons, archivers, recover_s)
    assert (lost, duplicate, extra, wrong) == (0, 0, 0, 0)
    assert reasons <= set(got)
    assert oracle.committed(broker.bootstrap, group, topic, list(ends)) == ends
