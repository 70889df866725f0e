"""The AWS credential chain beyond static keys, on moto: temporary credentials with a session
token (AWS_SESSION_TOKEN, from moto's STS), web identity (AWS_WEB_IDENTITY_TOKEN_FILE +
AWS_ROLE_ARN, exchanged with moto's STS over HTTPS and refreshed before they expire), and EKS Pod
Identity (AWS_CONTAINER_CREDENTIALS_FULL_URI + AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE, from a
stand-in agent on loopback: the test bed has no EKS). moto does not check signatures, so a proxy in
front of it records what every request was signed with. ECS task roles
(AWS_CONTAINER_CREDENTIALS_RELATIVE_URI) are served at 169.254.170.2 only: not testable here. No
secret shows in the log, in `check` or on /status."""
import datetime
import http.server
import json
import random
import re
import threading
import urllib.parse
import urllib.request
import uuid

import boto3

import oracle
import testbed
from test_archive import Bucket, check_archive, produce_raw
from test_operations import check
from test_s3_options import archive, produced, sensor_messages

ROLE = "arn:aws:iam::123456789012:role/archiver"


def signed_with(proxy):
    """[(access key id, session token or None)] of every request the proxy saw."""
    out = []
    for _, _, _, headers, _ in proxy.requests:
        h = {k.lower(): v for k, v in headers.items()}
        key = re.search(r"Credential=([^/]+)/", h.get("authorization", ""))
        out.append((key.group(1) if key else None, h.get("x-amz-security-token")))
    return out


def no_secret_anywhere(secrets, *texts):
    for secret in secrets:
        for text in texts:
            assert secret not in text, f"a secret ({secret[:4]}…) shows"


def status_of(archiver):
    return urllib.request.urlopen(f"http://127.0.0.1:{archiver.rest_port}/status", timeout=5).read().decode()


def sts(moto):
    return boto3.client("sts", endpoint_url=moto.endpoint, region_name=testbed.REGION,
                        aws_access_key_id=testbed.ACCESS_KEY, aws_secret_access_key=testbed.SECRET_KEY)


def test_temporary_credentials_with_a_session_token(broker, moto, run_archiver, archiver_bin, tmp_path):
    run = uuid.uuid4().hex[:8]
    topic = f"creds.{run}"
    items = sensor_messages(random.Random(7), 30, 200)
    records = produced(broker, topic, items)
    creds = sts(moto).assume_role(RoleArn=ROLE, RoleSessionName="archiver")["Credentials"]
    proxy = testbed.HttpProxy(moto.port)
    bucket = Bucket("moto", server=moto, name=f"creds-token-{run}")
    moto.create_bucket(bucket.name)
    env = dict(GROUP_ID=f"t-{run}", SPOOL_DIR=tmp_path / "t", S3_BUCKET_NAME=bucket.name,
               S3_ENDPOINT_URL=proxy.endpoint, AWS_ACCESS_KEY_ID=creds["AccessKeyId"],
               AWS_SECRET_KEY=creds["SecretAccessKey"], AWS_SESSION_TOKEN=creds["SessionToken"])
    code, out = check(archiver_bin, tmp_path, BROKER_HOSTNAME=broker.bootstrap, KAFKA_TOPIC=topic, **env)
    assert code == 0, out
    assert "session_token=***" in out, out
    logs, _ = archive(run_archiver, broker, topic, len(items), **env)
    expected, reasons = oracle.expected_objects(topic, records)
    check_archive(bucket, expected, reasons)
    signatures = signed_with(proxy)
    assert len(signatures) >= len(expected)
    assert set(signatures) == {(creds["AccessKeyId"], creds["SessionToken"])}, set(signatures)
    no_secret_anywhere([creds["SecretAccessKey"], creds["SessionToken"]], logs, out)
    # Without the token the key pair is incomplete: check says which variable goes with it.
    code, out = check(archiver_bin, tmp_path, BROKER_HOSTNAME=broker.bootstrap, KAFKA_TOPIC=topic,
                      **{**env, "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_KEY": ""})
    assert code != 0 and "AWS_SESSION_TOKEN" in out, out
    proxy.stop()
    print(f"\nSESSION TOKEN: {len(signatures)} requests, every one signed with the temporary key and its token")


def test_web_identity_credentials_are_exchanged_and_refreshed(broker, moto, run_archiver, archiver_bin, tmp_path):
    """IRSA as on EKS: a token file and a role; the archiver exchanges the token with STS
    (AssumeRoleWithWebIdentity, HTTPS only) and signs with what STS returns. The STS in front of
    moto shortens each credential's life to 5 min + 4 s; object_store refreshes credentials with
    less than 5 min left, so a run of about 15 s exchanges the token several times."""
    run = uuid.uuid4().hex[:8]
    topic = f"irsa.{run}"
    rng = random.Random(8)
    ca, cert, key = testbed.make_ca_and_cert(tmp_path)
    issued = []

    def short_lived(body):
        text = body.decode()
        m = re.search(r"<AccessKeyId>(.*?)</AccessKeyId>.*?<SessionToken>(.*?)</SessionToken>", text, re.S)
        if m:
            secret = re.search(r"<SecretAccessKey>(.*?)</SecretAccessKey>", text).group(1)
            issued.append((m.group(1), m.group(2), secret))
            soon = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=304)
            text = re.sub(r"<Expiration>.*?</Expiration>",
                          f"<Expiration>{soon.strftime('%Y-%m-%dT%H:%M:%SZ')}</Expiration>", text)
        return text.encode()

    # moto serves an unsigned request as S3's unless its Authorization header names another service;
    # AWS's STS takes the unsigned exchange as it is.
    sts_front = testbed.HttpProxy(moto.port, tls=(cert, key), rewrite=short_lived, add_headers={
        "Authorization": f"AWS4-HMAC-SHA256 Credential=web-identity/20261202/{testbed.REGION}/sts/aws4_request"})
    s3 = testbed.HttpProxy(moto.port)
    token_file = tmp_path / "token"
    web_token = "eyJhbGciOiJSUzI1NiJ9.web-identity-" + uuid.uuid4().hex
    token_file.write_text(web_token)
    bucket = Bucket("moto", server=moto, name=f"creds-irsa-{run}")
    moto.create_bucket(bucket.name)
    broker.create_topic(topic, 2)
    env = dict(GROUP_ID=f"w-{run}", SPOOL_DIR=tmp_path / "w", S3_BUCKET_NAME=bucket.name,
               S3_ENDPOINT_URL=s3.endpoint, S3_CA_FILE=ca, AWS_WEB_IDENTITY_TOKEN_FILE=token_file,
               AWS_ROLE_ARN=ROLE, AWS_ENDPOINT_URL_STS=sts_front.endpoint)
    code, out = check(archiver_bin, tmp_path, BROKER_HOSTNAME=broker.bootstrap, KAFKA_TOPIC=topic, **env)
    assert code == 0, out
    assert f"credentials=web-identity role={ROLE}" in out, out
    checked = len(sts_front.requests)

    a = run_archiver(BROKER_HOSTNAME=broker.bootstrap, KAFKA_TOPIC=topic, **env)
    items = []
    for second in range(15):
        batch = sensor_messages(rng, 10, 200, first_us=1650250000000000 + second * 1000,
                                first_ms=1795545116000 + second * 1000)
        produce_raw(broker.bootstrap, topic, batch)
        items += batch
        threading.Event().wait(1)
    a.wait_archived(len(items))
    status = status_of(a)
    assert a.stop() == 0, a.logs()
    records = oracle.read_topic(broker.bootstrap, topic, len(items))
    expected, reasons = oracle.expected_objects(topic, records)
    check_archive(bucket, expected, reasons)

    exchanges = [r for r in sts_front.requests[checked:] if "AssumeRoleWithWebIdentity" in r[2]]
    assert len(exchanges) >= 2, f"{len(exchanges)} exchanges: the credentials were not refreshed"
    assert all(web_token in urllib.parse.unquote(r[2]) for r in exchanges)
    tokens = {key: token for key, token, _ in issued}
    used = [(k, t) for k, t in signed_with(s3) if k]
    assert all(tokens.get(k) == t for k, t in used), "a request signed with a key STS did not issue with it"
    assert len({k for k, _ in used}) >= 2, "every request signed with the first credentials"
    secrets = [web_token] + [t for _, t, _ in issued] + [s for _, _, s in issued]
    no_secret_anywhere(secrets, a.logs(), out, status)
    sts_front.stop()
    s3.stop()
    print(f"\nWEB IDENTITY: {len(exchanges)} token exchanges in {len(items) / 10:.0f} s, "
          f"{len({k for k, _ in used})} credentials used over {len(used)} requests")


def test_eks_pod_identity_credentials(broker, moto, run_archiver, archiver_bin, tmp_path):
    """A stand-in for the EKS Pod Identity agent: it answers credentials only to the token of the
    token file (in the Authorization header), as the agent does."""
    run = uuid.uuid4().hex[:8]
    topic = f"pod.{run}"
    items = sensor_messages(random.Random(9), 20, 200)
    records = produced(broker, topic, items)
    creds = sts(moto).assume_role(RoleArn=ROLE, RoleSessionName="pod")["Credentials"]
    agent_token = "pod-identity-" + uuid.uuid4().hex
    (tmp_path / "agent-token").write_text(agent_token)
    asked = []

    class Agent(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            asked.append(self.headers.get("Authorization"))
            if self.headers.get("Authorization") != agent_token:
                self.send_response(401)
                self.end_headers()
                return
            body = json.dumps({"AccessKeyId": creds["AccessKeyId"], "SecretAccessKey": creds["SecretAccessKey"],
                               "Token": creds["SessionToken"],
                               "Expiration": creds["Expiration"].astimezone(datetime.timezone.utc)
                               .strftime("%Y-%m-%dT%H:%M:%SZ")}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    agent = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Agent)
    threading.Thread(target=agent.serve_forever, daemon=True).start()
    proxy = testbed.HttpProxy(moto.port)
    bucket = Bucket("moto", server=moto, name=f"creds-pod-{run}")
    moto.create_bucket(bucket.name)
    env = dict(GROUP_ID=f"p-{run}", SPOOL_DIR=tmp_path / "p", S3_BUCKET_NAME=bucket.name,
               S3_ENDPOINT_URL=proxy.endpoint,
               AWS_CONTAINER_CREDENTIALS_FULL_URI=f"http://127.0.0.1:{agent.server_address[1]}/v1/credentials",
               AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE=tmp_path / "agent-token")
    logs, _ = archive(run_archiver, broker, topic, len(items), **env)
    expected, reasons = oracle.expected_objects(topic, records)
    check_archive(bucket, expected, reasons)
    assert asked and set(asked) == {agent_token}, asked
    assert set(signed_with(proxy)) == {(creds["AccessKeyId"], creds["SessionToken"])}
    no_secret_anywhere([agent_token, creds["SecretAccessKey"], creds["SessionToken"]], logs)
    agent.shutdown()
    proxy.stop()
    print(f"\nPOD IDENTITY: {len(asked)} credential requests to the agent, every S3 request signed with its key")
