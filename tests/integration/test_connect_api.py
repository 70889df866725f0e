"""The Kafka Connect REST API on REST_PORT, as the old deployment's scripts and Kafka Connect tools
use it: every path in the shape the Kafka Connect documentation gives (field order included), the
write calls answered with what to do instead, pause and resume keeping the group membership, and
two Kafka Connect REST clients from PyPI (kafka-connect-cli, kafka-connect-py) driving it."""
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
import uuid

from confluent_kafka.admin import AdminClient

import oracle
import testbed
from load import v3_message
from test_archive import Bucket, produce_raw
from test_operations import get_json as get, ready, wait_for

CONNECTORS = ["s3-sink-timestamp", "s3-sink-data"]
CLIENTS = testbed.TESTBED_HOME / "clients"
KAFKA_CONNECT_CLI = CLIENTS / "kafka-connect-cli" / "bin" / "kafka_connect"
KC = CLIENTS / "kafka-connect-py" / "bin" / "kc"


def call(port, method, path, body=None):
    """(HTTP status, body as text) of one request to the archiver's REST port."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def is_error(code, body, message=None):
    """Kafka Connect's error shape: {"error_code": <the status>, "message": ...}."""
    doc = json.loads(body)
    assert list(doc) == ["error_code", "message"] and doc["error_code"] == code, body
    assert message is None or doc["message"] == message, body
    return doc["message"]


def archiving(broker, garage, run_archiver, tmp_path, partitions=2, records=20, **env):
    """An archiver on garage that has archived and committed `records` records of a new topic."""
    run = uuid.uuid4().hex[:8]
    topic, group = f"connect.{run}", f"connect-{run}"
    broker.create_topic(topic, partitions)
    bucket = Bucket("garage", server=garage, name=f"connect-{run}")
    garage.create_bucket(bucket.name)
    items = [(i % partitions, v3_message(1650250000123456 + i, os.urandom(50)), 1795545116000 + i)
             for i in range(records)]
    produce_raw(broker.bootstrap, topic, items)
    ends = oracle.end_offsets(oracle.read_topic(broker.bootstrap, topic, len(items)))
    a = run_archiver(BROKER_HOSTNAME=broker.bootstrap, KAFKA_TOPIC=topic, GROUP_ID=group,
                     SPOOL_DIR=tmp_path / f"spool-{run}", **bucket.env(), **env)
    wait_for("/readyz answers 200", lambda: ready(a.rest_port))
    wait_for("all offsets committed",
             lambda: oracle.committed(broker.bootstrap, group, topic, list(range(partitions))) == ends)
    return a, topic, group, ends


def test_every_path_answers_in_kafka_connects_shape(broker, garage, run_archiver, tmp_path):
    a, topic, group, _ = archiving(broker, garage, run_archiver, tmp_path)
    port = a.rest_port
    bodies = []

    def get_logged(path):
        code, body = call(port, "GET", path)
        print(f"GET {path} -> {code} {body}")
        bodies.append(body)
        return code, json.loads(body)

    # GET /: the worker info, with the cluster id Kafka gives.
    code, info = get_logged("/")
    cluster_id = AdminClient({"bootstrap.servers": broker.bootstrap}).list_topics(timeout=10).cluster_id
    assert code == 200 and list(info) == ["version", "commit", "kafka_cluster_id"], info
    assert info["kafka_cluster_id"] == cluster_id and cluster_id, (info, cluster_id)
    assert info["version"] == get(port, "/status")[1]["version"] and info["commit"], info

    assert get_logged("/connectors") == (200, CONNECTORS)
    code, plugins = get_logged("/connector-plugins")
    assert code == 200 and [list(p) for p in plugins] == [["class", "type", "version"]], plugins
    assert plugins[0]["class"] == "io.confluent.connect.s3.S3SinkConnector" and plugins[0]["type"] == "sink"

    for name, extension in zip(CONNECTORS, ["-timestamp.txt", ".bin"]):
        code, c = get_logged(f"/connectors/{name}")
        assert code == 200 and list(c) == ["name", "config", "tasks", "type"], c
        assert c["name"] == name and c["type"] == "sink" and c["tasks"] == [{"connector": name, "task": 0}], c
        config = c["config"]
        # What register.sh registered, from the archiver's settings.
        assert config["name"] == name and config["topics"] == topic and config["group.id"] == group, config
        assert config["connector.class"] == "io.confluent.connect.s3.S3SinkConnector", config
        assert config["s3.bucket.name"].startswith("connect-") and config["store.url"] == garage.endpoint, config
        assert config["format.bytearray.extension"] == extension and config["flush.size"] == "1", config
        assert config["timezone"] == "Asia/Tokyo" and config["tasks.max"] == "1", config
        assert all(isinstance(v, str) for v in config.values()), config
        assert get_logged(f"/connectors/{name}/config") == (200, config)

        code, tasks = get_logged(f"/connectors/{name}/tasks")
        assert code == 200 and [list(t) for t in tasks] == [["id", "config"]], tasks
        assert tasks[0]["id"] == {"connector": name, "task": 0}, tasks
        assert tasks[0]["config"] == {**config, "task.class": "io.confluent.connect.s3.S3SinkTask"}, tasks

        code, s = get_logged(f"/connectors/{name}/status")
        assert code == 200 and list(s) == ["name", "connector", "tasks", "type"], s
        assert list(s["connector"]) == ["state", "worker_id"] and s["connector"]["state"] == "RUNNING", s
        assert [list(t) for t in s["tasks"]] == [["id", "state", "worker_id"]] and s["tasks"][0]["id"] == 0, s
        assert s["connector"]["worker_id"].endswith(f":{port}"), s
        code, t = get_logged(f"/connectors/{name}/tasks/0/status")
        assert code == 200 and t == s["tasks"][0], t
        assert get_logged(f"/connectors/{name}/topics") == (200, {name: {"topics": [topic]}})

    # ?expand: the parts asked for, in the order asked.
    code, expanded = get_logged("/connectors?expand=status&expand=info")
    assert code == 200 and list(expanded) == CONNECTORS, expanded
    for name in CONNECTORS:
        assert list(expanded[name]) == ["status", "info"], expanded
        assert expanded[name]["status"] == get(port, f"/connectors/{name}/status")[1]
        assert expanded[name]["info"] == get(port, f"/connectors/{name}")[1]
    assert [list(v) for v in get_logged("/connectors?expand=info&expand=status")[1].values()] == [["info", "status"]] * 2
    assert get_logged("/connectors?expand=status")[1]["s3-sink-data"].keys() == {"status"}
    assert get_logged("/connectors?expand=nothing")[1] == {name: {} for name in CONNECTORS}

    # Not found, in the error shape, with Kafka Connect's messages.
    for path, message in [("/connectors/nosuch", "Connector nosuch not found"),
                          ("/connectors/nosuch/config", "Connector nosuch not found"),
                          ("/connectors/nosuch/tasks", "Connector nosuch not found"),
                          ("/connectors/nosuch/status", "No status found for connector nosuch"),
                          ("/connectors/s3-sink-data/tasks/1/status", "No status found for task s3-sink-data-1"),
                          ("/connectors/s3-sink-data/tasks/x/status", "HTTP 404 Not Found"),
                          ("/connectors/s3-sink-data/nosuch", "HTTP 404 Not Found"),
                          ("/nosuch", "HTTP 404 Not Found")]:
        code, body = call(port, "GET", path)
        print(f"GET {path} -> {code} {body}")
        assert code == 404 and is_error(404, body, message), (path, body)
    assert get_logged("/connectors/nosuch/topics") == (200, {"nosuch": {"topics": []}})
    # A trailing slash is the same path, as for Kafka Connect.
    assert get_logged("/connectors/s3-sink-data/") == get(port, "/connectors/s3-sink-data")
    assert get_logged("/connectors/") == (200, CONNECTORS)

    # Calls that would change a connector: what to do instead.
    for method, path, body, code, says in [
        ("DELETE", "/connectors/s3-sink-data", None, 405, "stop the service"),
        ("PUT", "/connectors/s3-sink-data/config", {"topics": "other"}, 405, ".env"),
        ("PUT", "/connectors/new-one/config", {"topics": "other"}, 405, "KAFKA_TOPIC"),
        ("POST", "/connectors", {"name": "s3-sink-data", "config": {}}, 409, "already exists"),
        ("POST", "/connectors", {"name": "other", "config": {}}, 405, "KAFKA_TOPIC"),
        ("POST", "/connectors/s3-sink-data/restart?includeTasks=False&onlyFailed=False", None, 405, "restart the service"),
        ("POST", "/connectors/s3-sink-data/tasks/0/restart", None, 405, "restart the service"),
        ("PUT", "/connectors/s3-sink-data/stop", None, 405, "pause"),
        ("PUT", "/connectors/s3-sink-data/topics/reset", None, 405, "KAFKA_TOPIC"),
        ("DELETE", "/connectors/nosuch", None, 404, "Connector nosuch not found"),
        ("PUT", "/connectors/nosuch/pause", None, 404, "Unknown connector nosuch"),
        ("POST", "/connectors/nosuch/restart", None, 404, "Unknown connector: nosuch"),
        ("POST", "/connectors/s3-sink-data/status", None, 405, "HTTP 405 Method Not Allowed"),
        ("POST", "/connectors/s3-sink-data/tasks/3/restart", None, 404, "Unknown task: s3-sink-data-3"),
        ("POST", "/connectors/s3-sink-data/tasks/x/restart", None, 404, "HTTP 404 Not Found"),
    ]:
        got, text = call(port, method, path, body)
        print(f"{method} {path} -> {got} {text}")
        assert got == code and says in is_error(code, text), (method, path, got, text)
    assert get(port, "/connectors/s3-sink-data/status")[1]["connector"]["state"] == "RUNNING"

    for body in bodies:
        assert testbed.SECRET_KEY not in body and testbed.ACCESS_KEY not in body
    assert a.stop() == 0, a.logs()


def test_pause_keeps_the_group_membership_and_resume_archives_what_came_meanwhile(broker, garage, run_archiver,
                                                                                    tmp_path):
    # A member that did not poll for max.poll.interval.ms would leave the group: paused this long,
    # the archiver keeps polling.
    a, topic, group, ends = archiving(broker, garage, run_archiver, tmp_path,
                                      KAFKA_PROPERTY_MAX_POLL_INTERVAL_MS="7000")
    port = a.rest_port
    assert call(port, "PUT", "/connectors/s3-sink-data/pause") == (202, "")
    assert call(port, "PUT", "/connectors/s3-sink-data/pause") == (202, ""), "idempotent"
    for name in CONNECTORS:
        s = get(port, f"/connectors/{name}/status")[1]
        assert s["connector"]["state"] == "PAUSED" and s["tasks"][0]["state"] == "PAUSED", s
    status = get(port, "/status")[1]
    assert status["consumer"]["paused"] and "on request" in status["consumer"]["pause_reason"], status
    assert a.metric("kafka_s3_archiver_consumer_paused") == 1
    time.sleep(2)
    archived = a.archived()
    more = [(i % 2, v3_message(1650250100000000 + i, b"while paused %d" % i), 1795545126000 + i) for i in range(10)]
    produce_raw(broker.bootstrap, topic, more)
    # Longer than twice max.poll.interval.ms.
    time.sleep(16)
    assert a.archived() == archived, "nothing is archived while paused"
    assert oracle.committed(broker.bootstrap, group, topic, [0, 1]) == ends
    assert get(port, "/status")[1]["consumer"]["assigned_partitions"] == 2
    logs = a.log_path.read_text()
    assert logs.count("partitions assigned") == 1 and "revoked" not in logs, "the membership stayed:\n" + logs[-3000:]
    assert call(port, "PUT", "/connectors/s3-sink-timestamp/resume") == (202, "")
    new_ends = {p: ends[p] + 5 for p in ends}
    wait_for("the records produced while paused committed",
             lambda: oracle.committed(broker.bootstrap, group, topic, [0, 1]) == new_ends, timeout=30)
    assert a.archived() == archived + 10
    s = get(port, "/connectors/s3-sink-data/status")[1]
    assert s["connector"]["state"] == "RUNNING", s
    assert not get(port, "/status")[1]["consumer"]["paused"]
    assert a.stop() == 0, a.logs()


def client(*args):
    """Runs a Kafka Connect client from PyPI; returns (exit code, output)."""
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=60)
    print(f"$ {' '.join(str(a) for a in args[1:])}   # {os.path.basename(str(args[0]))}, exit {r.returncode}\n"
          f"{r.stdout}{r.stderr}")
    return r.returncode, r.stdout


def test_kafka_connect_clients_from_pypi_list_get_and_check_health(broker, garage, run_archiver, tmp_path):
    assert KAFKA_CONNECT_CLI.exists() and KC.exists(), "run scripts/install-testbed.sh"
    a, topic, group, _ = archiving(broker, garage, run_archiver, tmp_path, UNDECODABLE="stop")
    url = f"http://127.0.0.1:{a.rest_port}"

    # kafka-connect-cli: its health check reads each connector's status, then its tasks, then each
    # task's status; 0 = all RUNNING or PAUSED, 1 = something FAILED, 3 = an answer it cannot use.
    assert client(KAFKA_CONNECT_CLI, "health-check", "--url", url, "--verbose")[0] == 0
    code, out = client(KAFKA_CONNECT_CLI, "connector", "list", "--url", url)
    assert code == 0 and sorted(c["connector"] for c in json.loads(out)) == sorted(CONNECTORS), out
    assert all(c["state"] == "RUNNING" for c in json.loads(out)), out
    code, out = client(KAFKA_CONNECT_CLI, "connector", "configuration", "--name", "s3-sink-data", "--url", url)
    assert code == 0 and json.loads(out)["topics"] == topic, out
    assert client(KAFKA_CONNECT_CLI, "task", "list", "--connector", "s3-sink-data", "--url", url)[0] == 0
    code, out = client(KAFKA_CONNECT_CLI, "connector", "delete", "--name", "s3-sink-data", "--url", url)
    assert code == 1 and "405" in out, out

    # kafka-connect-py (kc): it exits 0 even on HTTP errors, so its output is what is checked.
    code, out = client(KC, "-u", url, "info")
    assert code == 0 and json.loads(out)["kafka_cluster_id"], out
    code, out = client(KC, "-u", url, "list", "-e", "status")
    assert code == 0 and {n: v["status"]["connector"]["state"] for n, v in json.loads(out).items()} == {
        n: "RUNNING" for n in CONNECTORS}, out
    code, out = client(KC, "-u", url, "get", "s3-sink-timestamp")
    assert code == 0 and json.loads(out)["config"]["format.bytearray.extension"] == "-timestamp.txt", out
    code, out = client(KC, "-u", url, "status", "s3-sink-data")
    assert code == 0 and json.loads(out)["tasks"][0]["state"] == "RUNNING", out
    code, out = client(KC, "-u", url, "list-tasks", "s3-sink-data")
    assert code == 0 and json.loads(out)[0]["id"] == {"connector": "s3-sink-data", "task": 0}, out
    code, out = client(KC, "-u", url, "list-topics", "s3-sink-data")
    assert code == 0 and json.loads(out) == {"s3-sink-data": {"topics": [topic]}}, out
    code, out = client(KC, "-u", url, "list-plugins")
    assert code == 0 and json.loads(out)[0]["type"] == "sink", out

    # A record the contract cannot decode, with UNDECODABLE=stop: the health check says FAILED.
    produce_raw(broker.bootstrap, topic, [(0, b"not a SINETStream message", 1795545130000)])
    wait_for("the connectors report FAILED", lambda: json.loads(call(
        a.rest_port, "GET", "/connectors/s3-sink-data/status")[1])["connector"]["state"] == "FAILED")
    assert client(KAFKA_CONNECT_CLI, "health-check", "--url", url)[0] == 1
    code, out = client(KC, "-u", url, "status", "s3-sink-data")
    assert json.loads(out)["tasks"][0]["state"] == "FAILED" and "UNDECODABLE=stop" in json.loads(out)["tasks"][0]["trace"]
    a.stop()
