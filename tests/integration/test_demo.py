"""The README's first command, as written: scripts/demo.sh on a machine with nothing else running
starts a broker, publishes SINETStream messages, archives them into ./data/demo and verifies them."""
import os
import re
import signal
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_readme_first_command_archives_and_verifies():
    first = (REPO / "README.md").read_text().split("```")[0]
    assert "scripts/demo.sh" in first.splitlines()[2], "the README's first command is the demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "S3_", "AWS_", "BROKER_", "ARCHIVE_"))}
    # Its own process group: on a timeout the broker and the archiver it started go too.
    p = subprocess.Popen(["scripts/demo.sh"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        raise
    r = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    print(r.stdout + r.stderr[-3000:])
    assert r.returncode == 0
    assert re.search(r"what landed in \./data/demo/archive \(40 objects\)", r.stdout), r.stdout
    assert '"sensor": "demo"' in r.stdout and re.search(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}$", r.stdout, re.M)
    assert "clean: 20 offsets, 40 objects" in r.stdout, r.stdout
