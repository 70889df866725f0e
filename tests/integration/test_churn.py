"""Committed implies stored, under churn (design invariants 1, 5, 6 and 8).

Three instances in one group archive a 12-partition topic that has a backlog and a producer that
keeps writing; the spool is small, so the consumers pace and pause, and the store answers through
a proxy that delays every request, so uploads lag behind the fetches. Every few seconds one
instance is stopped (SIGKILL, or SIGTERM, which must exit 0, once the group is stable: see
wait_stable) and started again on its own spool.

A checker samples the group's committed offsets every 150 ms, the whole time: for each partition,
every offset below the committed one must have all its objects in the bucket (payload and
timestamp, or the dead letter and its reason). The store is s3s-fs, which writes each object as a
file before it answers the PUT, so "stored" is a file that exists. Objects are only ever added, so
an object missing when it is looked at after the committed offsets were read was missing when they
were read: any such offset is a violation, never a race of the test. Each sample checks only the
offsets committed since the last one (those below were already found).

After the churn the producer stops and all three instances keep running: every partition's
committed offset must reach its end offset within CHURN_SETTLE_SECONDS, and while some are below
it, one of them must advance at least every CHURN_STALL_SECONDS (a partition left paused or
unfetched never gets there, and once the others are done nothing advances). Then the archive holds
every offset exactly once, nothing else.

CHURN_SECONDS (default 60, the CI length; the full local run uses 300) sets the length of the
churn, CHURN_SEED the seed of the stops and their signals.
"""
import datetime
import json
import os
import random
import re
import signal
import threading
import time
import urllib.request
import uuid
from collections import defaultdict

import confluent_kafka as ck

import oracle
import testbed
from load import Producer
from test_archive import check_archive, summary

CHURN_SECONDS = float(os.environ.get("CHURN_SECONDS", "60"))
SETTLE_SECONDS = float(os.environ.get("CHURN_SETTLE_SECONDS", "300"))
# Well above a rebalance that waits for a killed member (session 6 s, max.poll.interval 10 s).
STALL_SECONDS = float(os.environ.get("CHURN_STALL_SECONDS", "60"))
SEED = int(os.environ.get("CHURN_SEED", "11"))
PARTITIONS = 12
INSTANCES = 3
BACKLOG = 3000  # records written before the first instance starts
RATE = 200  # records per second while the instances churn: modest, the machine has 2 CPUs
STORE_DELAY = 0.02  # seconds added to every request to the store
SAMPLE_PERIOD = 0.15


class FsBucket:
    """The bucket as s3s-fs keeps it: one file per object under its directory."""

    def __init__(self, directory):
        self.dir = directory

    def read_all(self, digests=False):
        return {str(f.relative_to(self.dir)): f.read_bytes() for f in self.dir.rglob("*") if f.is_file()}

    def get(self, key):
        return (self.dir / key).read_bytes()


class Checker(threading.Thread):
    """Samples the group's committed offsets and checks that every offset below them is stored.

    The keys of an offset come from the producer's delivery reports (partition, offset, Kafka
    timestamp, value) through the oracle, so the checker never reads the topic."""

    def __init__(self, bootstrap, group, topic, delivered, bucket_dir):
        super().__init__(daemon=True)
        self.topic, self.delivered, self.dir = topic, delivered, bucket_dir
        # A member of no group generation: it never subscribes, it only reads the group's offsets.
        self.consumer = ck.Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                                     "enable.auto.commit": False, "log_level": 2})
        self.tps = [ck.TopicPartition(topic, p) for p in range(PARTITIONS)]
        self.keys = defaultdict(dict)  # partition -> offset -> object keys
        self.learned = 0  # records of `delivered` whose keys are known
        self.verified = [0] * PARTITIONS  # per partition, every offset below it was found stored
        self.committed = [0] * PARTITIONS  # as of the last sample
        self.samples = self.checked = self.read_errors = self.regressions = self.deferred = 0
        self.violations = []  # {"partition", "offset", "committed", "at", "missing", "appeared"}
        self.pending = []  # violations whose objects have not appeared yet
        self.stop_event = threading.Event()
        self.error = None

    def run(self):
        try:
            while not self.stop_event.is_set():
                self.sample()
                self.stop_event.wait(SAMPLE_PERIOD)
        except Exception as e:  # reported by stop()
            self.error = e

    def stop(self):
        """Stops after a last sample."""
        self.stop_event.set()
        self.join()
        assert self.error is None, self.error
        self.sample()
        self.consumer.close()

    def learn(self):
        while self.learned < len(self.delivered):
            p, o, ts, value = self.delivered[self.learned]
            objects, reasons = oracle.expected_objects(self.topic, [(p, o, ts, value, None)])
            self.keys[p][o] = (*objects, *reasons)
            self.learned += 1

    def sample(self):
        self.learn()
        try:
            got = self.consumer.committed(self.tps, timeout=5)
        except ck.KafkaException:
            self.read_errors += 1
            return
        # Read before any file is looked at: a file missing from here on was missing then.
        read_at = time.time()
        for tp in got:
            if tp.error is not None:
                self.read_errors += 1
                continue
            p, c = tp.partition, max(tp.offset, 0)  # OFFSET_INVALID (-1001): nothing committed yet
            if c < self.committed[p]:
                self.regressions += 1
            self.committed[p] = c
            o = self.verified[p]
            while o < c:
                keys = self.keys[p].get(o)
                if keys is None:
                    # Consumed before its delivery report reached the producer: checked next time.
                    self.deferred += 1
                    break
                missing = [k for k in keys if not (self.dir / k).exists()]
                if missing:
                    v = {"partition": p, "offset": o, "committed": c, "at": read_at, "missing": missing,
                         "appeared": None}
                    self.violations.append(v)
                    self.pending.append(v)
                self.checked += 1
                o += 1
            self.verified[p] = o
        now = time.time()
        for v in list(self.pending):
            if all((self.dir / k).exists() for k in v["missing"]):
                v["appeared"] = now - v["at"]
                self.pending.remove(v)
        self.samples += 1


def log_lines(archivers, needle):
    """(time, instance log) of each log line containing `needle`, over every run's log."""
    out = []
    for a in archivers:
        for line in a.log_path.read_text(errors="replace").splitlines():
            if needle in line:
                stamp = line.split(" ", 1)[0]
                try:
                    t = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
                except ValueError:
                    t = a.started
                out.append((t, str(a.log_path)))
    return sorted(out)


def rebalances(archivers):
    """Assignments logged by the instances, grouped into rebalances: assignments less than a second
    apart are one rebalance of the group."""
    times = [t for t, _ in log_lines(archivers, "partitions assigned")]
    groups = sum(1 for i, t in enumerate(times) if i == 0 or t - times[i - 1] > 1.0)
    return groups, len(times), len(log_lines(archivers, "partitions revoked"))


def status(a):
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{a.rest_port}/status", timeout=3).read().decode()
    except OSError as e:
        return f"(no /status: {e})"


def assigned(a):
    """Partitions the instance holds, per its /status (0 while it is not up)."""
    try:
        return json.loads(status(a))["consumer"]["assigned_partitions"]
    except ValueError:
        return 0


def wait_stable(instances, timeout=30.0, hold=4.0):
    """Waits until the instances hold all the partitions between them and have for `hold` seconds
    (longer than a heartbeat, 3 s, after which a member learns of a rebalance and gives its
    partitions up). Returns whether they did within `timeout`.

    Why: tansu 0.6.0 never completes a rebalance in which a member leaves (LeaveGroup, as a
    SIGTERM'd instance does) while its JoinGroup is pending: the group stays without assignment
    for good (two plain librdkafka consumers and a third joining do it too, in 2 trials of 4). So
    SIGTERM waits for a stable group; SIGKILL, which sends nothing, does not."""
    deadline, since = time.time() + timeout, None
    while time.time() < deadline:
        held = [assigned(a) for a in instances]
        if sum(held) == PARTITIONS and all(held):
            since = since or time.time()
            if time.time() - since >= hold:
                return True
        else:
            since = None
        time.sleep(0.5)
    return False


def test_committed_offsets_are_always_stored_under_churn(broker, s3s_fs, run_archiver, tmp_path):
    rng = random.Random(SEED)
    run = uuid.uuid4().hex[:8]
    topic, group, bucket = f"churn.{run}", f"churn-{run}", f"churn-{run}"
    broker.create_topic(topic, PARTITIONS)
    s3s_fs.create_bucket(bucket)
    bucket_dir = s3s_fs.bucket_dir(bucket)
    proxy = testbed.TcpProxy(int(s3s_fs.endpoint.rsplit(":", 1)[1]), delay=STORE_DELAY)

    delivered = []
    producer_args = dict(sizes=(10, 200, 1000), undecodable_every=97, delivered=delivered)
    # About BACKLOG records (twice the rate for half a second) before any instance starts.
    backlog = Producer(broker.bootstrap, topic, PARTITIONS, rate=BACKLOG * 2, seed=4, **producer_args)
    backlog.start()
    time.sleep(0.5)
    backlog_count = backlog.stop()

    checker = Checker(broker.bootstrap, group, topic, delivered, bucket_dir)
    checker.start()
    producer = Producer(broker.bootstrap, topic, PARTITIONS, rate=RATE, seed=5, **producer_args)
    producer.start()

    env = dict(BROKER_HOSTNAME=broker.bootstrap, KAFKA_TOPIC=topic, GROUP_ID=group, S3_BUCKET_NAME=bucket,
               S3_ENDPOINT_URL=proxy.endpoint, AWS_ACCESS_KEY_ID=testbed.ACCESS_KEY,
               AWS_SECRET_KEY=testbed.SECRET_KEY, SPOOL_MAX_RECORDS=200, UPLOAD_WORKERS=8, SHUTDOWN_TIMEOUT=10)

    events = []  # (time, what): the stops and starts, to place a violation among them

    def start(i):
        # Each instance keeps its spool across its restarts: a restarted instance recovers it.
        events.append((time.time(), f"start {i}"))
        return run_archiver(**env, SPOOL_DIR=tmp_path / f"spool-{i}")

    instances = [start(i) for i in range(INSTANCES)]
    runs = list(instances)
    kills = terms = 0
    failures = []  # instances that exited on their own, SIGTERMs that did not exit 0
    t0 = time.time()
    while time.time() - t0 < CHURN_SECONDS:
        time.sleep(rng.uniform(2.0, 6.0))
        for i, a in enumerate(instances):
            if a.proc.poll() is not None:
                failures.append(f"instance {i} exited with {a.proc.returncode} on its own:\n{a.logs()}")
                instances[i] = start(i)
                runs.append(instances[i])
        i = rng.randrange(INSTANCES)
        a = instances[i]
        if rng.random() < 0.3 and wait_stable(instances):
            terms += 1
            events.append((time.time(), f"SIGTERM {i}"))
            code = a.stop(signal.SIGTERM)
            if code != 0:
                failures.append(f"instance {i} exited with {code} on SIGTERM:\n{a.logs()}")
        else:
            kills += 1
            events.append((time.time(), f"SIGKILL {i}"))
            a.stop(signal.SIGKILL)
        time.sleep(rng.uniform(0.0, 2.0))
        instances[i] = start(i)
        runs.append(instances[i])
    churn_end = time.time()
    lag_at_end = sum(len(k) for k in checker.keys.values()) - sum(checker.committed)

    # Settle: no more stops, the producer stops; every partition must reach its end offset.
    produced = backlog_count + producer.stop()
    assert not producer.delivery_errors and not backlog.delivery_errors, producer.delivery_errors[:3]
    assert len(delivered) == produced, f"{len(delivered)} delivery reports for {produced} records"
    ends = oracle.end_offsets(delivered)
    # A partition behind its neighbours may wait for them (a paced consumer takes its records
    # after theirs), so the bound on progress is the group's: while a partition is below its end,
    # one such partition must advance every STALL_SECONDS; a partition left paused or unfetched
    # stops that once the others are done.
    reached, last_progress = {}, churn_end
    seen = {p: (checker.committed[p], churn_end) for p in range(PARTITIONS)}  # (committed, since)
    waits = dict.fromkeys(range(PARTITIONS), 0.0)  # per partition, longest time without advancing
    stall = 0.0  # longest time in which no partition below its end advanced
    while True:
        now = time.time()
        for p in range(PARTITIONS):
            if p in reached:
                continue
            c = checker.committed[p]
            if c != seen[p][0]:
                seen[p], last_progress = (c, now), now
            waits[p] = max(waits[p], now - seen[p][1])
            if c >= ends.get(p, 0):
                reached[p] = now - churn_end
        stall = max(stall, now - last_progress)
        if len(reached) == PARTITIONS or now - churn_end > SETTLE_SECONDS or now - last_progress > STALL_SECONDS:
            break
        time.sleep(0.2)
    settle = max(reached.values(), default=0.0)
    stuck = [(p, checker.committed[p], ends.get(p, 0)) for p in range(PARTITIONS) if p not in reached]
    settle_by = time.time() - churn_end
    statuses = [(a, status(a)) for a in instances] if stuck else []
    held = sum(assigned(a) for a in instances) if stuck else PARTITIONS
    for i, a in enumerate(instances):
        if a.proc.poll() is not None:
            failures.append(f"instance {i} exited with {a.proc.returncode} on its own:\n{a.logs()}")
        elif (code := a.stop(signal.SIGTERM)) != 0:
            failures.append(f"instance {i} exited with {code} on SIGTERM at the end:\n{a.logs()}")
    checker.stop()
    proxy.down()

    groups, assignments, revocations = rebalances(runs)
    pauses = len(log_lines(runs, "pausing consumption"))
    poll_timeouts = len(log_lines(runs, "maximum poll interval"))
    print(f"\nCHURN: {CHURN_SECONDS:.0f} s, {INSTANCES} instances, {PARTITIONS} partitions, seed {SEED}: "
          f"records={produced} (backlog {backlog_count}) samples={checker.samples} "
          f"offsets_checked={checker.checked} violations={len(checker.violations)} "
          f"rebalances={groups} (assignments {assignments}, revocations {revocations}) pauses={pauses} "
          f"poll_interval_exceeded={poll_timeouts} "
          f"kills={kills} terms={terms} lag_at_churn_end={lag_at_end} "
          f"settle={'%.1fs' % settle if not stuck else 'never'} stuck={len(stuck)} group_stall={stall:.1f}s "
          f"partition_waits={[round(waits[p]) for p in range(PARTITIONS)]} "
          f"commit_regressions={checker.regressions} deferred={checker.deferred} read_errors={checker.read_errors}")
    for v in checker.violations[:20]:
        later = "never appeared" if v["appeared"] is None else f"appeared {v['appeared']:.2f} s later"
        before = ", ".join(f"{what} at +{t - t0:.1f}" for t, what in events if v["at"] - 10 < t <= v["at"])
        print(f"VIOLATION at +{v['at'] - t0:.2f} s: partition {v['partition']} offset {v['offset']} below committed "
              f"{v['committed']}, missing {v['missing']}; {later}; in the 10 s before: {before or 'no stop or start'}")
    for p, c, e in stuck:
        print(f"STUCK: partition {p} committed {c} of end {e} {settle_by:.0f} s after the churn, "
              f"not advanced for {settle_by + churn_end - seen[p][1]:.0f} s")
    if held == 0:
        print("GROUP: no instance holds a partition: the group has no assignment")
    for a, s in statuses:
        print(f"STATUS of {a.log_path.name}: {s}")
        lines = [line for line in a.log_path.read_text(errors="replace").splitlines()
                 if re.search("partitions (assigned|revoked)|consumption", line)]
        print("\n".join(lines[-12:]))

    # The archive, read back from the broker by an independent client.
    records = oracle.read_topic(broker.bootstrap, topic, produced)
    assert sorted((p, o, ts, v) for p, o, ts, v, _ in records) == sorted(delivered), \
        "the records read back differ from the delivery reports the checker used"
    expected, reasons = oracle.expected_objects(topic, records)
    got = FsBucket(bucket_dir)
    lost, duplicate, extra, wrong = summary(f"churn {CHURN_SECONDS:.0f}s", produced, got.read_all(), expected,
                                            reasons, runs, settle)

    assert not failures, "\n".join(failures)
    assert not checker.violations, (
        f"{len(checker.violations)} committed offsets were not stored when their commit was seen, "
        f"{len(checker.pending)} never appeared; first: {checker.violations[0]}")
    assert not stuck, (f"partitions (partition, committed, end) below their end {settle_by:.0f} s after the churn "
                       f"(no partition advanced for {stall:.0f} s): {stuck}")
    assert checker.committed == [ends.get(p, 0) for p in range(PARTITIONS)]
    assert checker.checked == produced, f"{checker.checked} of {produced} offsets checked"
    assert (lost, duplicate, extra, wrong) == (0, 0, 0, 0)
    check_archive(got, expected, reasons)
    assert oracle.committed(broker.bootstrap, group, topic, list(ends)) == ends
