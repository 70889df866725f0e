"""Fixtures: the servers of the test bed, and the archiver binary run as a user runs it."""
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import testbed  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def broker():
    b = testbed.Tansu()
    yield b
    b.stop()


@pytest.fixture(scope="session")
def garage():
    g = testbed.Garage()
    yield g
    g.stop()


@pytest.fixture(scope="session")
def moto():
    m = testbed.Moto()
    yield m
    m.stop()


@pytest.fixture(scope="session")
def s3s_fs():
    s = testbed.S3sFs()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def archiver_bin():
    path = Path(os.environ.get("ARCHIVER_BIN", REPO / "target" / "release" / "kafka-s3-archiver"))
    assert path.exists(), f"{path} is missing: run cargo build --release (scripts/test.sh does)"
    return path


class Archiver:
    """One run of the archiver binary with a given environment; logs go to a file."""

    def __init__(self, binary, env, workdir):
        self.binary, self.env, self.workdir = binary, env, Path(workdir)
        self.rest_port = int(env["REST_PORT"])
        self.log_path = self.workdir / f"archiver-{time.time_ns()}.log"
        self.proc = None
        self.started = None
        self.peak_rss = self.peak_spool = 0

    def start(self):
        self.log = open(self.log_path, "wb")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "S3_", "AWS_"))}
        env.update(self.env)
        env.setdefault("RUST_LOG", "info,object_store=warn")
        self.started = time.time()
        self.proc = subprocess.Popen([str(self.binary)], cwd=self.workdir, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        threading.Thread(target=self._sample, daemon=True).start()
        return self

    def _sample(self):
        """Peak RSS (the kernel's high-water mark) and spool size while the process runs."""
        while self.proc.poll() is None:
            try:
                self.peak_rss = max(self.peak_rss, testbed.rss_bytes(self.proc.pid, "VmHWM"))
            except OSError:
                return
            self.peak_spool = max(self.peak_spool, self.metric("kafka_s3_archiver_spool_bytes"))
            time.sleep(0.5)

    def metrics(self):
        return testbed.scrape(self.rest_port)

    def metric(self, name, default=0):
        """One value from /metrics; `default` while the endpoint is not up yet."""
        try:
            return self.metrics().get(name, default)
        except OSError:
            return default

    def archived(self):
        return self.metric("kafka_s3_archiver_records_archived_total")

    def wait_archived(self, n, timeout=120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, f"archiver exited early:\n{self.logs()}"
            if self.archived() >= n:
                return time.time() - self.started
            time.sleep(0.2)
        raise AssertionError(f"archived {self.archived()} of {n} records within {timeout}s:\n{self.logs()}")

    def stop(self, sig=signal.SIGTERM, timeout=60):
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self.log.close()
        return code

    def logs(self):
        return self.log_path.read_text(errors="replace")[-6000:]


@pytest.fixture
def run_archiver(archiver_bin, tmp_path):
    runs = []

    def make(**env):
        env = {k: str(v) for k, v in env.items()}
        env.setdefault("REST_PORT", str(testbed.free_port()))
        env.setdefault("REST_BIND_ADDRESS", "127.0.0.1")
        env.setdefault("COMMIT_INTERVAL_MS", "200")
        env.setdefault("KAFKA_PROPERTY_SESSION_TIMEOUT_MS", "6000")
        # A rebalance waits this long for members that were killed (the crash and group tests).
        env.setdefault("KAFKA_PROPERTY_MAX_POLL_INTERVAL_MS", "10000")
        a = Archiver(archiver_bin, env, tmp_path)
        runs.append(a)
        return a.start()

    yield make
    for a in runs:
        if a.proc and a.proc.poll() is None:
            a.proc.kill()
            a.proc.wait()
