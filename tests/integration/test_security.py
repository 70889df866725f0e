"""HTTPS to the store with a private CA, and secrets that never leave the process."""
import random
import time
import urllib.error
import urllib.request
import uuid

import confluent_kafka as ck

import oracle
import testbed
from load import v3_message
from test_archive import Bucket, check_archive, produce_raw

SECRET_SASL = "sasl-password-never-shown-42"


def test_https_store_with_a_private_ca_and_no_secret_in_logs_or_http(broker, garage, run_archiver, tmp_path):
    ca, cert, key = testbed.make_ca_and_cert(tmp_path)
    proxy = testbed.TcpProxy(garage.s3_port, tls=(str(cert), str(key)))
    run = uuid.uuid4().hex[:8]
    topic, name = f"tls.{run}", f"tls-{run}"
    broker.create_topic(topic, 2)
    garage.create_bucket(name)
    bucket = Bucket("garage", server=garage, name=name)
    rng = random.Random(9)
    produce_raw(broker.bootstrap, topic, [(i % 2, v3_message(1650250000123456 + i, rng.randbytes(64)), 1795545116000 + i)
                                          for i in range(10)])
    records = oracle.read_topic(broker.bootstrap, topic, 10)
    expected, reasons = oracle.expected_objects(topic, records)
    env = dict(BROKER_HOSTNAME=broker.bootstrap, KAFKA_TOPIC=topic, S3_BUCKET_NAME=name, S3_ENDPOINT_URL=proxy.endpoint,
               AWS_ACCESS_KEY_ID=testbed.ACCESS_KEY, AWS_SECRET_KEY=testbed.SECRET_KEY,
               KAFKA_PROPERTY_SASL_USERNAME="archiver", KAFKA_PROPERTY_SASL_PASSWORD=SECRET_SASL,
               KAFKA_PROPERTY_DEBUG="conf,generic", RUST_LOG="debug")

    # Without the CA the certificate is refused: nothing is stored, and the log says why.
    a = run_archiver(GROUP_ID=f"noca-{run}", SPOOL_DIR=tmp_path / "spool-noca", **env)
    time.sleep(10)
    assert a.archived() == 0
    assert a.stop() == 0
    assert "certificate" in a.logs().lower(), a.logs()
    assert bucket.read_all() == {}

    a = run_archiver(GROUP_ID=f"ca-{run}", SPOOL_DIR=tmp_path / "spool-ca", S3_CA_FILE=ca, **env)
    a.wait_archived(10)
    responses = []
    for path in ("/metrics", "/healthz", "/nonexistent"):
        try:
            responses.append(urllib.request.urlopen(f"http://127.0.0.1:{a.rest_port}{path}", timeout=5).read().decode())
        except urllib.error.HTTPError as e:
            responses.append(e.read().decode())
    assert a.stop() == 0, a.logs()
    check_archive(bucket, expected, reasons)

    logs = a.log_path.read_text(errors="replace")
    assert "sasl.password=***" in logs and "secret_key=***" in logs  # the configuration is logged, masked...
    for secret in (testbed.SECRET_KEY, SECRET_SASL):
        assert secret not in logs, "a secret is in the log"  # ...without its secrets
        assert all(secret not in r for r in responses), "a secret is in an HTTP response"
    assert testbed.ACCESS_KEY not in logs


def test_refused_credentials_are_reported_and_nothing_is_lost(broker, garage, run_archiver, tmp_path):
    """A wrong secret key: uploads are refused (403), the log says what to check, nothing is
    committed; after a restart with the right key the spooled records are archived."""
    run = uuid.uuid4().hex[:8]
    topic, group, name = f"auth.{run}", f"auth-{run}", f"auth-{run}"
    broker.create_topic(topic, 1)
    garage.create_bucket(name)
    produce_raw(broker.bootstrap, topic, [(0, v3_message(1650250000123456 + i, b"x" * i), 1795545116000 + i)
                                          for i in range(5)])
    records = oracle.read_topic(broker.bootstrap, topic, 5)
    env = dict(BROKER_HOSTNAME=broker.bootstrap, KAFKA_TOPIC=topic, GROUP_ID=group, SPOOL_DIR=tmp_path / "spool",
               S3_BUCKET_NAME=name, S3_ENDPOINT_URL=garage.endpoint, AWS_ACCESS_KEY_ID=testbed.ACCESS_KEY)
    a = run_archiver(AWS_SECRET_KEY="0" * 64, **env)
    deadline = time.time() + 30
    while "upload refused" not in a.log_path.read_text():
        assert time.time() < deadline, a.logs()
        time.sleep(0.5)
    assert a.archived() == 0
    assert a.stop() == 0, a.logs()
    logs = a.log_path.read_text()
    assert "ERROR" in logs and "check AWS_ACCESS_KEY_ID / AWS_SECRET_KEY" in logs, logs[-3000:]
    got = oracle.committed(broker.bootstrap, group, topic, [0])
    assert got[0] < 0, f"nothing may be committed: {got}"

    a = run_archiver(AWS_SECRET_KEY=testbed.SECRET_KEY, **env)
    a.wait_archived(5)
    assert a.stop() == 0, a.logs()
    expected, reasons = oracle.expected_objects(topic, records)
    check_archive(Bucket("garage", server=garage, name=name), expected, reasons)


def test_kafka_over_tls_with_a_private_ca(run_archiver, tmp_path):
    """The broker is reached only through TLS (a TLS proxy that the broker advertises), with a
    private CA given to librdkafka through KAFKA_PROPERTY_SSL_CA_LOCATION."""
    ca, cert, key = testbed.make_ca_and_cert(tmp_path)
    tls_port = testbed.free_port()
    broker = testbed.Tansu(advertised_port=tls_port)
    proxy = testbed.TcpProxy(broker.port, tls=(str(cert), str(key)), port=tls_port)
    try:
        tls = {"security.protocol": "SSL", "ssl.ca.location": str(ca)}
        bootstrap = f"127.0.0.1:{tls_port}"
        topic, group = f"tls.{uuid.uuid4().hex[:8]}", "tls-archiver"
        broker.create_topic(topic, 2)
        delivered = []
        p = ck.Producer({"bootstrap.servers": bootstrap, **tls})
        for i in range(10):
            value = v3_message(1650250000123456 + i, f"over tls {i}".encode())
            p.produce(topic, value=value, partition=i % 2, timestamp=1795545116000 + i,
                      on_delivery=lambda err, m: delivered.append((m.partition(), m.offset(), m.timestamp()[1], m.value(), None)))
        assert p.flush(30) == 0 and len(delivered) == 10
        expected, reasons = oracle.expected_objects(topic, sorted(delivered))

        a = run_archiver(BROKER_HOSTNAME=bootstrap, KAFKA_TOPIC=topic, GROUP_ID=group, SPOOL_DIR=tmp_path / "spool",
                         ARCHIVE_DIR=tmp_path / "data", KAFKA_PROPERTY_SECURITY_PROTOCOL="SSL",
                         KAFKA_PROPERTY_SSL_CA_LOCATION=ca)
        a.wait_archived(10)
        assert a.stop() == 0, a.logs()
        check_archive(Bucket("local", root=tmp_path / "data"), expected, reasons)
        ends = oracle.end_offsets(delivered)
        assert oracle.committed(bootstrap, group, topic, list(ends), **tls) == ends
    finally:
        proxy.down()
        broker.stop()
