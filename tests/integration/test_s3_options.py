"""What every object is written with on S3 besides its body, as a user reads it back with boto3:
the storage class (S3_STORAGE_CLASS) and the tags (S3_OBJECT_TAGS), for both archive formats, single
PUTs and multipart uploads alike; server-side encryption (S3_SSE, S3_SSE_KMS_KEY_ID, and customer
keys with S3_SSE_C_KEY_FILE); and `check` says when the store refuses them. On moto, which keeps
them and answers HEAD, GET and GetObjectTagging as S3 does."""
import base64
import hashlib
import random
import uuid

import botocore.exceptions

import oracle
import testbed
from test_archive import Bucket, check_archive, produce_raw
from load import v3_message
from test_operations import check
from test_verify_restore import tool

CLASS = "STANDARD_IA"
TAGS = "project=sensors&retention=1y&owner=lab%20A"
EXPECTED_TAGS = {"project": "sensors", "retention": "1y", "owner": "lab A"}


def written_with(bucket):
    """{key: (storage class, {tag: value})} of every object in the bucket."""
    s3 = bucket.server.client()
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket.name)
            for o in page.get("Contents", [])]
    out = {}
    for key in keys:
        head = s3.head_object(Bucket=bucket.name, Key=key)
        tags = s3.get_object_tagging(Bucket=bucket.name, Key=key)["TagSet"]
        # S3 leaves StorageClass out of HEAD for STANDARD.
        out[key] = (head.get("StorageClass", "STANDARD"), {t["Key"]: t["Value"] for t in tags})
    return out


def sensor_messages(rng, n, size, partition=None, first_us=1650250000123456, first_ms=1795545116000):
    """`n` SINETStream v3 messages of `size` random bytes, as produce_raw takes them; spread over
    two partitions unless one is given."""
    return [(i % 2 if partition is None else partition, v3_message(first_us + i, rng.randbytes(size)), first_ms + i)
            for i in range(n)]


def produced(broker, topic, items):
    """Creates `topic` (2 partitions) with `items`; the records as Kafka gives them back."""
    broker.create_topic(topic, 2)
    produce_raw(broker.bootstrap, topic, items)
    return oracle.read_topic(broker.bootstrap, topic, len(items))


def archive(run_archiver, broker, topic, n, **env):
    """Runs the archiver on `topic` until it archived `n` records and stops it (exit 0); its log
    and its last metrics."""
    a = run_archiver(BROKER_HOSTNAME=broker.bootstrap, KAFKA_TOPIC=topic, **env)
    a.wait_archived(n)
    m = a.metrics()
    assert a.stop() == 0, a.logs()
    return a.logs(), m


def test_storage_class_and_tags_are_on_every_object_of_both_formats(broker, moto, run_archiver, tmp_path):
    run = uuid.uuid4().hex[:8]
    topic = f"class.{run}"
    rng = random.Random(24)
    # SINETStream messages, one undecodable value (an errors/ object in the Connect format), and in
    # the Parquet run enough incompressible bytes for a multipart upload (objects past 8 MiB).
    items = sensor_messages(rng, 20, 200)
    items.append((0, b"not a SINETStream message", 1795545116100))
    items += sensor_messages(rng, 10, 1 << 20, partition=1, first_us=1650250000200000, first_ms=1795545116200)
    records = produced(broker, topic, items)
    put = dict(S3_STORAGE_CLASS=CLASS, S3_OBJECT_TAGS=TAGS)

    connect = Bucket("moto", server=moto, name=f"class-c-{run}")
    moto.create_bucket(connect.name)
    logs, _ = archive(run_archiver, broker, topic, len(items), GROUP_ID=f"c-{run}", SPOOL_DIR=tmp_path / "c",
                      **connect.env(), **put)
    assert f"storage_class={CLASS} tags=project=sensors&retention=1y&owner=lab A" in logs
    expected, reasons = oracle.expected_objects(topic, records)
    check_archive(connect, expected, reasons)
    got = written_with(connect)
    # Payloads, timestamps, the dead letter and its reason.
    assert len(got) == len(expected) + len(reasons), sorted(got)
    wrong = {k: v for k, v in got.items() if v != (CLASS, EXPECTED_TAGS)}
    assert not wrong, f"{len(wrong)} of {len(got)} objects without the class or the tags, e.g. {next(iter(wrong.items()))}"

    parquet = Bucket("moto", server=moto, name=f"class-p-{run}")
    moto.create_bucket(parquet.name)
    _, m = archive(run_archiver, broker, topic, len(items), GROUP_ID=f"p-{run}", SPOOL_DIR=tmp_path / "p",
                   ARCHIVE_FORMAT="parquet", BATCH_MAX_AGE="1s", **parquet.env(), **put)
    sizes = {k: v for k, v in parquet.read_all().items() if k.endswith(".parquet")}
    assert max(len(v) for v in sizes.values()) > 8 << 20, "no object went up as a multipart upload"
    assert m["kafka_s3_archiver_records_archived_total"] == len(items)
    got = written_with(parquet)
    wrong = {k: v for k, v in got.items() if v != (CLASS, EXPECTED_TAGS)}
    assert not wrong, f"{len(wrong)} of {len(got)} objects without the class or the tags, e.g. {next(iter(wrong.items()))}"
    print(f"\nS3 OPTIONS: {len(written_with(connect))} Connect-format and {len(got)} Parquet objects "
          f"(largest {max(len(v) for v in sizes.values()) >> 20} MiB, multipart) all {CLASS} with {EXPECTED_TAGS}")


def test_check_writes_its_probe_with_the_class_and_says_when_the_store_refuses_it(broker, moto, archiver_bin,
                                                                                    tmp_path):
    run = uuid.uuid4().hex[:8]
    topic = f"classcheck.{run}"
    broker.create_topic(topic, 1)
    bucket = Bucket("moto", server=moto, name=f"classcheck-{run}")
    moto.create_bucket(bucket.name)
    env = dict(BROKER_HOSTNAME=broker.bootstrap, KAFKA_TOPIC=topic, GROUP_ID=f"g-{run}", SPOOL_DIR=tmp_path / "spool",
               **bucket.env())
    code, out = check(archiver_bin, tmp_path, **env, S3_STORAGE_CLASS=CLASS, S3_OBJECT_TAGS=TAGS)
    assert code == 0, out
    wrote = [line for line in out.splitlines() if line.startswith("OK") and "wrote, read back and deleted" in line]
    assert wrote and f"written with storage_class={CLASS} tags=project=sensors" in wrote[0], out
    # A class the store does not have: the probe's PUT is refused, and check says so.
    code, out = check(archiver_bin, tmp_path, **env, S3_STORAGE_CLASS="NO_SUCH_CLASS")
    assert code != 0, out
    refused = [line for line in out.splitlines() if line.startswith("FAIL") and f"bucket {bucket.name}" in line]
    assert refused and "S3_STORAGE_CLASS" in refused[0] and "NO_SUCH_CLASS" in refused[0], out


def test_server_side_encryption_of_every_object(broker, moto, run_archiver, tmp_path):
    """SSE-S3 and SSE-KMS on moto, which keeps the headers and answers them on HEAD."""
    run = uuid.uuid4().hex[:8]
    topic = f"sse.{run}"
    items = sensor_messages(random.Random(25), 12, 300)
    records = produced(broker, topic, items)
    expected, reasons = oracle.expected_objects(topic, records)
    kms_key = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    s3 = moto.client()
    for name, sse, want in [("s3", {"S3_SSE": "AES256"}, ("AES256", None)),
                            ("kms", {"S3_SSE": "aws:kms", "S3_SSE_KMS_KEY_ID": kms_key}, ("aws:kms", kms_key))]:
        bucket = Bucket("moto", server=moto, name=f"sse-{name}-{run}")
        moto.create_bucket(bucket.name)
        archive(run_archiver, broker, topic, len(items), GROUP_ID=f"{name}-{run}", SPOOL_DIR=tmp_path / name,
                **bucket.env(), **sse)
        check_archive(bucket, expected, reasons)
        heads = [s3.head_object(Bucket=bucket.name, Key=k) for k in expected]
        got = {(h.get("ServerSideEncryption"), h.get("SSEKMSKeyId")) for h in heads}
        assert got == {want}, (name, got)
    print(f"\nSSE: {len(expected)} objects each with AES256 and with aws:kms ({kms_key}), as HEAD shows them")


def test_a_customer_key_alone_reads_the_archive_back(broker, garage, run_archiver, archiver_bin, tmp_path):
    """SSE-C on garage, which encrypts with the customer's key and refuses a read without it (moto
    takes the headers and ignores them). The key comes from a file and never reaches the log;
    `verify`, given the same key, reads the archive back."""
    run = uuid.uuid4().hex[:8]
    topic = f"ssec.{run}"
    rng = random.Random(26)
    items = sensor_messages(rng, 12, 300)
    records = produced(broker, topic, items)
    expected, _ = oracle.expected_objects(topic, records)
    key = rng.randbytes(32)
    (tmp_path / "sse-c.key").write_bytes(key)
    bucket = Bucket("garage", server=garage, name=f"ssec-{run}")
    garage.create_bucket(bucket.name)
    env = dict(BROKER_HOSTNAME=broker.bootstrap, KAFKA_TOPIC=topic, **bucket.env(),
               S3_SSE_C_KEY_FILE=str(tmp_path / "sse-c.key"))
    logs, _ = archive(run_archiver, broker, topic, len(items), GROUP_ID=f"c-{run}", SPOOL_DIR=tmp_path / "spool",
                      **bucket.env(), S3_SSE_C_KEY_FILE=str(tmp_path / "sse-c.key"))
    assert "SSE-C key=***" in logs
    assert base64.b64encode(key).decode() not in logs and key.hex() not in logs

    s3 = garage.client()
    read = {k: s3.get_object(Bucket=bucket.name, Key=k, SSECustomerAlgorithm="AES256",
                             SSECustomerKey=key)["Body"].read() for k in expected}
    assert read == expected
    for wrong in [{}, {"SSECustomerAlgorithm": "AES256", "SSECustomerKey": rng.randbytes(32)}]:
        try:
            s3.get_object(Bucket=bucket.name, Key=next(iter(expected)), **wrong)
            raise AssertionError(f"read back without the customer key: {list(wrong)}")
        except botocore.exceptions.ClientError as e:
            assert e.response["ResponseMetadata"]["HTTPStatusCode"] in (400, 403), e.response
    # verify reads every object with the key and compares it with the record in Kafka.
    code, out, err = tool(archiver_bin, {k: str(v) for k, v in env.items()}, "verify")
    assert code == 0 and f"clean: {len(items)} offsets" in out, out + err
    assert base64.b64encode(key).decode() not in out + err
    # And with another key it cannot.
    (tmp_path / "other.key").write_bytes(rng.randbytes(32))
    code, out, err = tool(archiver_bin, {**{k: str(v) for k, v in env.items()},
                                         "S3_SSE_C_KEY_FILE": str(tmp_path / "other.key")}, "verify")
    assert code != 0 and "clean" not in out, out + err
    print(f"\nSSE-C: {len(expected)} objects read back with the key, refused without it and with another")


def test_through_a_proxy_with_a_checksum_the_store_checks(broker, garage, run_archiver, archiver_bin, tmp_path):
    """S3_PROXY_URL and S3_CHECKSUM=sha256 on garage, which checks a body against the checksum sent
    with it (a wrong one is refused: the control below). The endpoint's host does not resolve, so
    nothing reaches the store but through the proxy; the proxy's password never shows."""
    run = uuid.uuid4().hex[:8]
    topic = f"proxy.{run}"
    rng = random.Random(26)
    items = sensor_messages(rng, 20, 300)
    items += sensor_messages(rng, 10, 1 << 20, partition=1, first_us=1650250000200000, first_ms=1795545116200)
    records = produced(broker, topic, items)
    s3 = garage.client()
    control = f"proxy-control-{run}"
    garage.create_bucket(control)
    wrong = base64.b64encode(hashlib.sha256(b"other bytes").digest()).decode()
    try:
        s3.put_object(Bucket=control, Key="k", Body=b"bytes", ChecksumSHA256=wrong)
        raise AssertionError("garage stored a body whose checksum is wrong")
    except botocore.exceptions.ClientError as e:
        assert e.response["ResponseMetadata"]["HTTPStatusCode"] == 400, e.response

    proxy = testbed.TcpProxy(garage.s3_port)
    password = "pr0xyPass"
    through = dict(S3_ENDPOINT_URL=f"http://s3.invalid:{garage.s3_port}",
                   S3_PROXY_URL=f"http://lab:{password}@127.0.0.1:{proxy.port}", S3_CHECKSUM="sha256")
    connect = Bucket("garage", server=garage, name=f"proxy-c-{run}")
    garage.create_bucket(connect.name)
    env = dict(BROKER_HOSTNAME=broker.bootstrap, KAFKA_TOPIC=topic, GROUP_ID=f"c-{run}", SPOOL_DIR=tmp_path / "c",
               **{**connect.env(), **through})
    code, out = check(archiver_bin, tmp_path, **env)
    assert code == 0, out
    assert f"through proxy http://lab:***@127.0.0.1:{proxy.port}/" in out and "checksum=sha256" in out, out
    assert password not in out
    code, out = check(archiver_bin, tmp_path, **{k: v for k, v in env.items() if k != "S3_PROXY_URL"})
    assert code != 0, "without the proxy the store cannot be reached"

    logs, _ = archive(run_archiver, broker, topic, len(items), GROUP_ID=f"c-{run}", SPOOL_DIR=tmp_path / "c",
                      **{**connect.env(), **through})
    expected, reasons = oracle.expected_objects(topic, records)
    check_archive(connect, expected, reasons)
    parquet = Bucket("garage", server=garage, name=f"proxy-p-{run}")
    garage.create_bucket(parquet.name)
    plogs, _ = archive(run_archiver, broker, topic, len(items), GROUP_ID=f"p-{run}", SPOOL_DIR=tmp_path / "p",
                       ARCHIVE_FORMAT="parquet", BATCH_MAX_AGE="1s", **{**parquet.env(), **through})
    assert password not in logs + plogs
    proxy.down()

    multipart = single = 0
    for bucket in (connect, parquet):
        for key, body in bucket.read_all().items():
            head = s3.head_object(Bucket=bucket.name, Key=key, ChecksumMode="ENABLED")
            stored = head.get("ChecksumSHA256")
            assert stored, f"{key}: no SHA-256 checksum stored: {head}"
            if "-" in stored:  # a multipart object: the checksum of its parts' checksums
                multipart += 1
            else:
                assert stored == base64.b64encode(hashlib.sha256(body).digest()).decode(), key
                single += 1
    assert multipart >= 1 and single >= len(expected), (multipart, single)
    print(f"\nPROXY AND CHECKSUM: {single} objects stored with their SHA-256 checked by garage, {multipart} multipart; "
          "all requests through the proxy")
