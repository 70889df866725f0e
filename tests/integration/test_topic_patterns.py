"""KAFKA_TOPIC patterns: the topics a pattern matches are archived, those it does not match or
KAFKA_TOPIC_EXCLUDE names are not, a matching topic created while the archiver runs is picked up
within seconds, and `check`, `/status` and `verify` name the topics matched."""
import time
import uuid

import oracle
from load import v3_message
from test_archive import Bucket, produce_raw
from test_operations import check, get_json, wait_for
from test_verify_restore import tool

RECORDS = 12


def produce(broker, topic):
    items = [(i % 2, v3_message(1650250000123456 + i, b'{"topic": "%s", "i": %d}' % (topic.encode(), i)),
              1795545116000 + i) for i in range(RECORDS)]
    produce_raw(broker.bootstrap, topic, items)
    return oracle.end_offsets(oracle.read_topic(broker.bootstrap, topic, len(items)))


def archived_topics(bucket):
    return {key.split("/")[1] for key in bucket.read_all()}


def test_a_pattern_takes_matching_topics_and_those_created_later(broker, run_archiver, archiver_bin, tmp_path):
    run = uuid.uuid4().hex[:8]
    prefix = f"pat{run}"
    first, second, excluded, other = f"{prefix}.a", f"{prefix}.b", f"{prefix}.test", f"other{run}.a"
    for t in (first, second, excluded, other):
        broker.create_topic(t, 2)
    ends = {t: produce(broker, t) for t in (first, second, excluded, other)}
    bucket = Bucket("local", root=tmp_path / "archive")
    group = f"pat-{run}"
    env = dict(BROKER_HOSTNAME=broker.bootstrap, KAFKA_TOPIC=f"^{prefix}\\.", KAFKA_TOPIC_EXCLUDE=excluded,
               GROUP_ID=group, SPOOL_DIR=tmp_path / "spool", **bucket.env())

    code, out = check(archiver_bin, tmp_path, **env)
    assert code == 0, out
    assert f"topics matching ^{prefix}\\. excluding {excluded}: 2 topic(s): {first}, {second}" in out
    assert f"topic {first}:" in out and f"topic {second}:" in out
    assert excluded not in out.replace(f"excluding {excluded}", "") and other not in out

    a = run_archiver(**env)
    for t in (first, second):
        wait_for(f"{t} committed", lambda t=t: oracle.committed(broker.bootstrap, group, t, [0, 1]) == ends[t],
                 timeout=60)
    assert get_json(a.rest_port, "/status")[1]["consumer"]["topics"] == [first, second]

    # A matching topic created while the archiver runs.
    late = f"{prefix}.c"
    created = time.time()
    broker.create_topic(late, 2)
    ends[late] = produce(broker, late)
    wait_for(f"{late} committed", lambda: oracle.committed(broker.bootstrap, group, late, [0, 1]) == ends[late],
             timeout=60, show=lambda: a.logs()[-1500:])
    took = time.time() - created
    print(f"\nTOPIC CREATED WHILE RUNNING: all {RECORDS} records committed {took:.1f} s after its creation")
    assert get_json(a.rest_port, "/status")[1]["consumer"]["topics"] == [first, second, late]
    assert f"added={late}" in a.log_path.read_text()
    assert a.archived() == 3 * RECORDS
    assert a.stop() == 0, a.logs()

    assert archived_topics(bucket) == {first, second, late}
    for t in (excluded, other):
        assert all(o < 0 for o in oracle.committed(broker.bootstrap, group, t, [0, 1]).values()), t

    # verify takes the topics the pattern matches, in Kafka and, bucket only, in the bucket.
    for args in (["verify"], ["verify", "--bucket-only"]):
        code, out, _ = tool(archiver_bin, {k: str(v) for k, v in env.items()}, *args)
        assert code == 0, out
        sections = [line for line in out.splitlines() if line.startswith("topic ")]
        assert sections == [f"topic {first}:", f"topic {second}:", f"topic {late}:"], out


def test_a_pattern_in_dot_env_that_matches_nothing_yet(broker, run_archiver, tmp_path):
    """The pattern comes from `.env`, single-quoted as the README says (with `\\` and `$`); no topic
    matches at the start: nothing is subscribed, the log says so, and the first matching topic
    created is archived."""
    run = uuid.uuid4().hex[:8]
    topic, group = f"late{run}.x", f"late-{run}"
    (tmp_path / ".env").write_text(f"KAFKA_TOPIC='^late{run}\\..*$'\n")
    bucket = Bucket("local", root=tmp_path / "archive")
    a = run_archiver(BROKER_HOSTNAME=broker.bootstrap, GROUP_ID=group, SPOOL_DIR=tmp_path / "spool", **bucket.env())
    wait_for("the log says nothing matches", lambda: "KAFKA_TOPIC matches no topic yet" in a.log_path.read_text(),
             timeout=30, show=lambda: a.logs()[-1500:])
    assert get_json(a.rest_port, "/status")[1]["consumer"]["topics"] == []
    broker.create_topic(topic, 2)
    ends = produce(broker, topic)
    wait_for(f"{topic} committed", lambda: oracle.committed(broker.bootstrap, group, topic, [0, 1]) == ends,
             timeout=60, show=lambda: a.logs()[-1500:])
    assert get_json(a.rest_port, "/status")[1]["consumer"]["topics"] == [topic]
    assert a.stop() == 0, a.logs()
    assert archived_topics(bucket) == {topic}
