"""The command line as a new user meets it: each command's --help lists the settings it reads, each
with its default (the README's table) and variable; configuration errors exit 2, said once."""
import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COMMANDS = [[], ["run"], ["check"], ["verify"], ["restore"], ["bench-store"]]


def run(archiver_bin, *args, env=None, cwd=None):
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "S3_", "AWS_", "BROKER_"))}
    r = subprocess.run([str(archiver_bin), *args], env={**clean, **(env or {})}, capture_output=True, text=True,
                       timeout=60, cwd=cwd)
    return r.returncode, r.stdout, r.stderr


def readme_defaults():
    """{VARIABLE: default} from the README's configuration table, for the rows with a plain default."""
    out = {}
    for line in (REPO / "README.md").read_text().splitlines():
        m = re.match(r"^\| `([A-Z0-9_]+)` \| `([^`]*)` \|", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def options(help_text):
    """{VARIABLE or --option: its help text} from clap's long help."""
    out, current = {}, None
    for line in help_text.splitlines():
        m = re.match(r"^\s+(?:-\w, )?(--[\w-]+)", line)
        if m:
            current = m.group(1)
            out[current] = ""
        elif current:
            out[current] += line.strip() + " "
    return {(re.search(r"\[env: ([A-Z0-9_]+)", h).group(1) if "[env: " in h else o): h for o, h in out.items()}


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "archiver")
def test_each_command_shows_the_defaults_of_the_settings_it_reads(archiver_bin, command):
    code, out, _ = run(archiver_bin, *command, "--help")
    print(f"$ kafka-s3-archiver {' '.join(command)} --help\n{out}")
    assert code == 0
    shown = options(out)
    defaults = readme_defaults()
    for var, text in shown.items():
        if var in defaults:
            assert f"[default: {defaults[var]}]" in text, (var, text)
    every = {"BROKER_HOSTNAME", "KAFKA_TOPIC", "S3_BUCKET_NAME", "SPOOL_DIR", "UPLOAD_WORKERS", "UNDECODABLE",
             "REST_PORT", "COMMIT_INTERVAL_MS"}
    if command in ([], ["run"], ["check"]):
        assert every <= shown.keys(), every - shown.keys()
    if command == ["verify"]:
        assert {"BROKER_HOSTNAME", "KAFKA_TOPIC", "S3_BUCKET_NAME", "UNDECODABLE", "PARTITION_TIMEZONE"} <= shown.keys()
        assert not {"UPLOAD_WORKERS", "REST_PORT", "SPOOL_DIR", "COMMIT_INTERVAL_MS"} & shown.keys(), shown.keys()
        assert shown["KAFKA_TOPIC"].startswith("Topic whose archive to check")
    if command == ["restore"]:
        assert {"BROKER_HOSTNAME", "KAFKA_TOPIC", "S3_BUCKET_NAME", "--to-topic"} <= shown.keys()
        assert not {"UPLOAD_WORKERS", "UNDECODABLE", "REST_PORT", "SPOOL_DIR"} & shown.keys(), shown.keys()
        assert shown["KAFKA_TOPIC"].startswith("Topic whose archive to replay")
    if command == ["bench-store"]:
        assert {"S3_BUCKET_NAME", "UPLOAD_WORKERS", "--records"} <= shown.keys()
        assert not {"KAFKA_TOPIC", "BROKER_HOSTNAME", "UNDECODABLE"} & shown.keys(), shown.keys()


def test_configuration_errors_exit_2_and_are_said_once(archiver_bin, tmp_path):
    # A librdkafka property it does not know: refused before the start, said once.
    code, out, err = run(archiver_bin, env={"BROKER_HOSTNAME": "localhost:9", "KAFKA_TOPIC": "t",
                                            "KAFKA_PROPERTY_NO_SUCH_PROP": "1"}, cwd=tmp_path)
    print(out + err)
    assert code == 2 and err.count("librdkafka rejected a property") == 1 and "starting" not in err, err
    # The same for a tool that talks to Kafka: before it lists the bucket.
    code, out, err = run(archiver_bin, "verify", env={"BROKER_HOSTNAME": "localhost:9", "KAFKA_TOPIC": "t",
                                                     "ARCHIVE_DIR": str(tmp_path), "KAFKA_PROPERTY_NO_SUCH_PROP": "1"},
                         cwd=tmp_path)
    assert code == 2 and "librdkafka rejected a property" in err and "listing" not in err, (code, err)
    # check, and the tools, with nothing set: the same exit status as the archiver.
    for command in [[], ["check"], ["verify"], ["restore"]]:
        code, out, err = run(archiver_bin, *command, cwd=tmp_path)
        print(f"$ kafka-s3-archiver {' '.join(command)}   # exit {code}\n{out}{err}")
        assert code == 2 and "BROKER_HOSTNAME" in out + err, (command, out, err)
    # bench-store reads no Kafka setting; a bad one of its own is the same kind of error.
    code, out, err = run(archiver_bin, "bench-store", env={"ARCHIVE_DIR": str(tmp_path), "UPLOAD_WORKERS": "many"},
                         cwd=tmp_path)
    print(f"$ UPLOAD_WORKERS=many kafka-s3-archiver bench-store   # exit {code}\n{out}{err}")
    assert code == 2 and "UPLOAD_WORKERS" in err and '"objects"' not in out, (code, out, err)


def test_one_exit_status_policy(archiver_bin, tmp_path):
    """0 done; 1 a runtime failure or problems found; 2 a configuration or usage error."""
    archive = tmp_path / "archive"
    archive.mkdir()
    # verify cannot reach Kafka: a runtime failure.
    code, out, err = run(archiver_bin, "verify", env={"BROKER_HOSTNAME": "127.0.0.1:9", "KAFKA_TOPIC": "t",
                                                     "ARCHIVE_DIR": str(archive)}, cwd=tmp_path)
    print(f"$ kafka-s3-archiver verify   # broker down, exit {code}\n{out}{err}")
    assert code == 1 and "error: Kafka" in err, (code, err)
    # bench-store reads no Kafka setting: none is needed.
    code, out, err = run(archiver_bin, "bench-store", "--records", "10", env={"ARCHIVE_DIR": str(archive)},
                         cwd=tmp_path)
    print(f"$ kafka-s3-archiver bench-store --records 10   # exit {code}\n{out}{err}")
    assert code == 0 and '"objects":20' in out.replace(" ", ""), (code, out, err)
    # A usage error of a tool.
    code, out, err = run(archiver_bin, "restore", env={"BROKER_HOSTNAME": "127.0.0.1:9", "KAFKA_TOPIC": "t",
                                                      "ARCHIVE_DIR": str(archive)}, cwd=tmp_path)
    assert code == 2 and "--to-topic" in err, (code, err)

