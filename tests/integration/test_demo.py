"""The README's first command, as written: scripts/demo.sh on a machine with nothing else running
starts a broker, publishes SINETStream messages, archives them into ./data/demo and verifies them."""
import os
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_readme_first_command_archives_and_verifies():
    first = (REPO / "README.md").read_text().split("```")[0]
    assert "scripts/demo.sh" in first.splitlines()[2], "the README's first command is the demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "S3_", "AWS_", "BROKER_", "ARCHIVE_"))}
    r = subprocess.run(["scripts/demo.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    print(r.stdout + r.stderr[-3000:])
    assert r.returncode == 0
    assert re.search(r"what landed in \./data/demo/archive \(40 objects\)", r.stdout), r.stdout
    assert '"sensor": "demo"' in r.stdout and re.search(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}$", r.stdout, re.M)
    assert "clean: 20 offsets, 40 objects" in r.stdout, r.stdout
