"""The deployment files agree with the code and with the README, without any server.

- The README's configuration table, the variables src/config.rs reads and the binary's --help
  name the same variables.
- example_dot_env names every one of them, shows the README's defaults, reads the same under
  docker compose, systemd and the archiver, and the binary starts with it.
- docker-compose.yml, the Dockerfile, deploy/kafka-s3-archiver.service and
  deploy/grafana-dashboard.json agree with one another, with src/config.rs, src/http/mod.rs and
  src/metrics.rs.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

import testbed

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
DOTENV = REPO / "example_dot_env"
DOCKERFILE = REPO / "Dockerfile"
UNIT = REPO / "deploy" / "kafka-s3-archiver.service"
DASHBOARD = REPO / "deploy" / "grafana-dashboard.json"
SERVICE = "kafka-s3-archiver"
STATE_DIR = "/var/lib/kafka-s3-archiver"


# --- what the sources say ---------------------------------------------------------------------

def readme_table():
    """The README's configuration table: {name: (default column, meaning column)}. A row such as
    `KAFKA_PROPERTY_<NAME>` is kept under that name and matched as a prefix."""
    text = (REPO / "README.md").read_text()
    section = re.search(r"^## Configuration\n(.*?)(?=^## )", text, re.M | re.S)
    assert section, "README.md has no '## Configuration' section"
    rows = re.findall(r"^\| `([A-Z][A-Z0-9_]*(?:<[A-Z]+>)?)` \| (.*?) \| (.*) \|$", section.group(1), re.M)
    assert len(rows) > 10, f"the configuration table was not found: {rows}"
    return {name: (default.strip(), meaning) for name, default, meaning in rows}


TABLE = readme_table()
PREFIXES = [name.split("<")[0] for name in TABLE if "<" in name]
PLAIN = [name for name in TABLE if "<" not in name]


def in_table(var):
    return var in TABLE or any(var.startswith(p) and len(var) > len(p) for p in PREFIXES)


def table_default(var):
    """The default when the table gives a literal one (`...`), else None."""
    m = re.fullmatch(r"`([^`]*)`", TABLE[var][0])
    return m.group(1) if m else None


def table_aliases():
    """Other names the table's text says are accepted, e.g. `AWS_SECRET_ACCESS_KEY`."""
    names = set()
    for _, meaning in TABLE.values():
        names |= set(re.findall(r"`([A-Z][A-Z0-9]*_[A-Z0-9_]+)`", meaning))
    return names - set(TABLE)


def config_source():
    """src/config.rs without its unit tests."""
    return (REPO / "src" / "config.rs").read_text().split("#[cfg(test)]")[0]


def config_env_attributes():
    return set(re.findall(r'\benv\s*=\s*"([A-Za-z0-9_]+)"', config_source()))


def config_env_literals():
    """Every string literal in config.rs that is an environment variable's name (upper-case with an
    underscore): the env attributes, the names errors are reported under, AWS_SECRET_ACCESS_KEY,
    the KAFKA_PROPERTY_ prefix."""
    return set(re.findall(r'"([A-Z][A-Z0-9]*_[A-Z0-9_]*)"', config_source()))


def rust_u64_const(source, name):
    m = re.search(rf"const {name}: u\d+ = ([0-9_]+);", source)
    assert m, f"const {name} not found"
    return int(m.group(1).replace("_", ""))


def shutdown_timeout_default():
    """SHUTDOWN_TIMEOUT's default as config.rs applies it (the constant passed with the name)."""
    src = config_source()
    m = re.search(r'"SHUTDOWN_TIMEOUT",\s*([A-Z0-9_]+)', src)
    assert m, "config.rs: SHUTDOWN_TIMEOUT is not parsed with a default"
    default = m.group(1)
    return int(default) if default.isdigit() else rust_u64_const(src, default)


def metric_names():
    """{name: kind} of every metric src/metrics.rs defines; kind is counter, gauge or histogram."""
    src = (REPO / "src" / "metrics.rs").read_text()
    consts = dict(re.findall(r'pub const ([A-Z0-9_]+): &str = "(kafka_s3_archiver_[a-z0-9_]+)";', src))
    assert len(consts) > 10, "no metric names found in src/metrics.rs"
    kinds = {}
    for kind, const in re.findall(r"describe_(counter|gauge|histogram)!\(\s*([A-Z0-9_]+)", src):
        kinds[consts[const]] = kind
    missing = set(consts.values()) - set(kinds)
    assert not missing, f"metrics.rs defines but never describes: {missing}"
    return kinds


def read_dotenv():
    """example_dot_env as (name, raw value, active?) for each line that sets a variable, commented
    out (`#NAME=value`) or not."""
    out = []
    for line in DOTENV.read_text().splitlines():
        m = re.fullmatch(r"(#\s?)?([A-Za-z_][A-Za-z0-9_]*)=(.*)", line)
        if m:
            out.append((m.group(2), m.group(3), m.group(1) is None))
    return out


def unquote(raw):
    return raw[1:-1] if len(raw) >= 2 and raw[0] == raw[-1] == "'" else raw


def compose():
    return yaml.safe_load(COMPOSE.read_text())


def compose_env(service):
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def compose_strings(node):
    """Every string in the parsed compose file (comments are gone by then)."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield str(k)
            yield from compose_strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from compose_strings(v)
    elif isinstance(node, str):
        yield node


def dockerfile_stages():
    """[(FROM line, [instruction lines])] with continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        if raw.lstrip().startswith("#"):  # comments (and parser directives), also inside a continuation
            continue
        current += raw.rstrip("\\").strip() + " " if raw.endswith("\\") else raw.strip()
        if not raw.endswith("\\"):
            if current.strip():
                lines.append(current.strip())
            current = ""
    stages = []
    for line in lines:
        if line.upper().startswith("FROM "):
            stages.append((line, []))
        else:
            assert stages, f"instruction before the first FROM: {line}"
            stages[-1][1].append(line)
    return stages


def instructions(stage, keyword):
    return [line.split(None, 1)[1] for line in stage[1] if line.split(None, 1)[0].upper() == keyword]


def runtime_spool_dir():
    final = dockerfile_stages()[-1]
    for env in instructions(final, "ENV"):
        m = re.match(r"SPOOL_DIR[= ](\S+)", env)
        if m:
            return m.group(1)
    raise AssertionError("the Dockerfile's runtime stage sets no SPOOL_DIR")


def read_unit():
    """The systemd unit as {section: [(key, value)]}, keys repeated as systemd allows."""
    sections, current = {}, None
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            assert line.endswith("]"), line
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None and "=" in line, f"not a unit line: {line}"
        key, value = line.split("=", 1)
        current.append((key.strip(), value.strip()))
    return sections


def unit_values(sections, section, key):
    return [v for k, v in sections.get(section, []) if k == key]


def unit_value(sections, section, key):
    values = unit_values(sections, section, key)
    assert values, f"[{section}] {key}= is missing"
    return values[-1]


def seconds(text):
    """A duration as systemd or compose writes it: 90, 90s, 1min 30s, 1m30s."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+)\s*([a-z]*)", text)
    assert parts and "".join(n + u for n, u in parts) == re.sub(r"\s", "", text), f"duration {text!r}"
    return sum(int(n) * units[u] for n, u in parts)


def clean_env(**extra):
    """The process environment without any archiver setting, so only the test's own count."""
    env = {k: v for k, v in os.environ.items()
           if not in_table(k) and k not in table_aliases() and not k.startswith(("KAFKA_", "S3_", "AWS_"))}
    env.update(extra)
    return env


# --- README table, config.rs and --help -------------------------------------------------------

def test_every_table_variable_is_read_by_config_rs():
    attrs = config_env_attributes()
    literals = config_env_literals()
    missing = [v for v in PLAIN if v not in attrs]
    assert not missing, f"in the README table but not an env attribute in src/config.rs: {missing}"
    for prefix in PREFIXES:
        assert prefix in literals, f"README row {prefix}<NAME>: config.rs has no {prefix!r} prefix"


def test_every_variable_config_rs_reads_is_in_the_table():
    documented = set(TABLE) | table_aliases()
    unknown = sorted(v for v in config_env_attributes() | config_env_literals()
                     if v not in documented and not in_table(v) and v not in PREFIXES)
    assert not unknown, f"src/config.rs reads variables the README table does not list: {unknown}"


def test_help_names_every_table_variable(archiver_bin, tmp_path):
    # A clean environment and an empty directory: no .env, no value shown after `env: NAME=`.
    out = subprocess.run([str(archiver_bin), "--help"], cwd=tmp_path, env=clean_env(),
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    missing = [v for v in PLAIN if not re.search(rf"\[env: {v}(=[^\]]*)?\]", out.stdout)]
    assert not missing, f"--help shows no [env: NAME] for: {missing}\n{out.stdout}"
    for prefix in PREFIXES:
        assert prefix in out.stdout, f"--help does not mention {prefix}<NAME>"
    shown = set(re.findall(r"\[env: ([A-Z0-9_]+)", out.stdout))
    assert shown <= set(TABLE), f"--help reads variables the README table does not list: {shown - set(TABLE)}"


# --- example_dot_env --------------------------------------------------------------------------

def test_example_dot_env_and_the_table_name_the_same_variables():
    names = [name for name, _, _ in read_dotenv()]
    unknown = [n for n in names if not in_table(n)]
    assert not unknown, f"example_dot_env sets variables the README table does not list: {unknown}"
    missing = [v for v in PLAIN if v not in names]
    missing += [p + "<NAME>" for p in PREFIXES if not any(n.startswith(p) for n in names)]
    assert not missing, f"README table variables missing from example_dot_env: {missing}"
    duplicated = {n for n in names if names.count(n) > 1}
    assert not duplicated, f"set twice in example_dot_env: {duplicated}"


def test_example_dot_env_sets_the_required_and_shows_the_defaults():
    entries = {name: (unquote(raw), active) for name, raw, active in read_dotenv()}
    for var in PLAIN:
        value, active = entries[var]
        if TABLE[var][0] == "(required)":
            assert active and value, f"{var} is required: example_dot_env must set it"
        elif not active and table_default(var) is not None:
            assert value == table_default(var), \
                f"example_dot_env shows #{var}={value}, the README's default is {table_default(var)!r}"


def test_example_dot_env_reads_the_same_under_compose_systemd_and_the_archiver():
    # Unquoted, systemd drops a backslash (\n becomes n) and compose and the archiver expand $ and
    # cut at ' #'; single-quoted, all three take the value as written.
    for name, raw, _ in read_dotenv():
        if raw.startswith("'"):
            assert re.fullmatch(r"'[^']*'", raw), f"{name}: unbalanced single quotes: {raw}"
        else:
            assert not re.search(r"[\\$#\s\"']", raw), f"{name}={raw}: put the value in single quotes"


def test_example_dot_env_secrets_are_placeholders():
    for name, raw, _ in read_dotenv():
        if re.search(r"SECRET|PASSWORD|ACCESS_KEY", name):
            assert re.search(r"REPLACE|CHANGE|EXAMPLE", unquote(raw), re.I), \
                f"{name} in example_dot_env does not look like a placeholder: {raw}"


def test_example_dot_env_names_the_minio_of_the_compose_file():
    hinted = [unquote(raw) for name, raw, _ in read_dotenv() if name == "S3_ENDPOINT_URL"]
    assert hinted, "example_dot_env shows no S3_ENDPOINT_URL"
    m = re.fullmatch(r"http://([a-z0-9-]+):(\d+)", hinted[0])
    assert m, f"S3_ENDPOINT_URL example {hinted[0]} is not http://service:port"
    services = compose()["services"]
    assert m.group(1) in services and "minio" in services[m.group(1)].get("profiles", []), \
        f"S3_ENDPOINT_URL example {hinted[0]}: no such service in the minio profile"
    # Inside the compose network the port is the one MinIO listens on (9000 unless --address).
    listen = re.search(r"--address\s+\S*:(\d+)", str(services[m.group(1)].get("command", "")))
    assert m.group(2) == (listen.group(1) if listen else "9000"), f"MinIO does not listen on {m.group(2)}"


def test_the_archiver_starts_with_example_dot_env_and_its_defaults(archiver_bin, tmp_path):
    """Every value example_dot_env sets or shows as a default is accepted: the binary starts with
    them (exit code 2 would name a bad one), serves /healthz, and stops cleanly on SIGTERM.
    Only the addresses are replaced, so that nothing leaves the machine."""
    lines = []
    for line in DOTENV.read_text().splitlines():
        m = re.fullmatch(r"#\s?([A-Z][A-Z0-9_]*)=(.*)", line)
        if m and m.group(1) in TABLE and table_default(m.group(1)) is not None:
            line = line.lstrip("#").lstrip()
        lines.append(line)
    (tmp_path / ".env").write_text("\n".join(lines) + "\n")
    port = testbed.free_port()
    # The process environment wins over .env: the broker and the store are closed local ports;
    # ARCHIVE_DIR empty (= unset) so that the S3 settings are the ones validated.
    env = clean_env(BROKER_HOSTNAME=f"127.0.0.1:{testbed.free_port()}",
                    S3_ENDPOINT_URL=f"http://127.0.0.1:{testbed.free_port()}",
                    ARCHIVE_DIR="", REST_PORT=str(port), REST_BIND_ADDRESS="127.0.0.1")
    log = open(tmp_path / "archiver.log", "w+")
    proc = subprocess.Popen([str(archiver_bin)], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 20
        while True:
            assert proc.poll() is None, f"exit code {proc.returncode}:\n{(tmp_path / 'archiver.log').read_text()}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert time.time() < deadline, "/healthz did not answer within 20 s"
                time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    text = (tmp_path / "archiver.log").read_text()
    assert code == 0, f"exit code {code} after SIGTERM:\n{text}"
    # The start-up line shows the separator: '\n' must reach the archiver as a newline.
    if "separator=" in text:
        assert 'separator="\\n"' in text, text


# --- docker-compose.yml -----------------------------------------------------------------------

def test_compose_archiver_service():
    services = compose()["services"]
    archiver = services[SERVICE]
    assert "profiles" not in archiver, "the archiver must run without a profile"
    env_file = archiver.get("env_file")
    assert env_file in (".env", [".env"]), f"env_file: {env_file}"
    env = compose_env(archiver)
    container_port = env.get("REST_PORT", table_default("REST_PORT"))
    # REST_PORT in .env picks the host's port, as it did for Kafka Connect; the container's is fixed.
    assert f"${{REST_PORT:-{table_default('REST_PORT')}}}:{container_port}" in [str(p) for p in archiver["ports"]]
    assert container_port == "8083"
    assert env.get("REST_BIND_ADDRESS", "0.0.0.0") in ("0.0.0.0", "::"), "a loopback bind is unreachable through the port"
    spool = env.get("SPOOL_DIR", runtime_spool_dir())
    assert spool == runtime_spool_dir(), "compose and the Dockerfile disagree on SPOOL_DIR"
    assert f"./spool:{spool}" in archiver["volumes"], f"./spool is not mounted at SPOOL_DIR {spool}"
    grace = seconds(str(archiver.get("stop_grace_period", "10s")))
    assert grace >= shutdown_timeout_default() + 30, \
        f"stop_grace_period {grace}s: docker kills the archiver before SHUTDOWN_TIMEOUT is over"


def test_compose_minio_profile():
    services = compose()["services"]
    minio, job = services["minio"], services["create-bucket"]
    assert minio.get("profiles") == ["minio"] and job.get("profiles") == ["minio"]
    assert job["depends_on"]["minio"]["condition"] == "service_healthy"
    test = minio["healthcheck"]["test"]
    # MinIO images have had no curl since late 2023: such a check never becomes healthy.
    assert "curl" not in json.dumps(test), f"MinIO's image has no curl: {test}"
    env = compose_env(minio)
    # As in the Kafka Connect deployment: the archiver's keys are MinIO's root credentials.
    assert env["MINIO_ROOT_USER"] in ("$AWS_ACCESS_KEY_ID", "${AWS_ACCESS_KEY_ID}")
    assert env["MINIO_ROOT_PASSWORD"] in ("$AWS_SECRET_KEY", "${AWS_SECRET_KEY}")
    entry = json.dumps(job["entrypoint"])
    assert re.search(r"mc mb .*S3_BUCKET_NAME", entry), "create-bucket does not create S3_BUCKET_NAME"


def test_compose_variables_are_in_the_table():
    doc = compose()
    referenced = set()
    for s in compose_strings(doc):
        s = s.replace("$$", "")  # an escaped dollar reaches the container's shell, not compose
        referenced |= set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", s))
    unknown = sorted(v for v in referenced if not in_table(v))
    assert not unknown, f"docker-compose.yml uses variables the README table does not list: {unknown}"
    unknown = sorted(v for v in compose_env(doc["services"][SERVICE]) if not in_table(v))
    assert not unknown, f"the archiver's environment: in compose has variables not in the table: {unknown}"
    for name, service in doc["services"].items():
        if name != SERVICE:
            odd = [v for v in compose_env(service) if not v.startswith("MINIO_")]
            assert not odd, f"{name}: environment variables {odd}"


# --- Dockerfile -------------------------------------------------------------------------------

def test_dockerfile():
    stages = dockerfile_stages()
    assert len(stages) >= 2, "the Dockerfile should build in one stage and run in another"
    build_from = stages[0][0].split()
    assert len(build_from) == 4 and build_from[2].upper() == "AS", stages[0][0]
    builder = build_from[3]
    m = re.match(r"rust:(\d+)\.(\d+)", build_from[1])
    assert m, f"the build stage is not a rust image: {build_from[1]}"
    wanted = re.search(r'^rust-version = "(\d+)\.(\d+)', (REPO / "Cargo.toml").read_text(), re.M)
    assert wanted and tuple(map(int, m.groups())) >= tuple(map(int, wanted.groups())), \
        "the build image is older than Cargo.toml's rust-version"
    builds = [r for r in instructions(stages[0], "RUN") if "cargo build" in r]
    assert builds and all("--locked" in r and "--release" in r for r in builds), builds
    # Everything the build reads must be copied into the build stage.
    copied = " ".join(instructions(stages[0], "COPY"))
    for needed in ["Cargo.toml", "Cargo.lock", "src"] + [p for p in ["build.rs"] if (REPO / p).exists()]:
        assert re.search(rf"(^|\s){re.escape(needed)}(\s|$)", copied), f"{needed} is not copied into the build"

    final = stages[-1]
    assert "rust" not in final[0], "the runtime image should not carry the toolchain"
    assert any(f"--from={builder}" in c for c in instructions(final, "COPY"))
    users = instructions(final, "USER")
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the container must not run as root"
    assert [e for e in instructions(final, "ENTRYPOINT") + instructions(final, "CMD") if "kafka-s3-archiver" in e]
    spool = runtime_spool_dir()
    assert spool.startswith(STATE_DIR + "/")
    assert any(spool in v for v in instructions(final, "VOLUME")), "SPOOL_DIR is not a VOLUME"
    assert "8083" in instructions(final, "EXPOSE")
    volumes = compose()["services"][SERVICE]["volumes"]
    assert f"./spool:{spool}" in volumes, "the compose volume target differs from the image's SPOOL_DIR"


def test_dockerfile_healthcheck_asks_an_endpoint_that_exists():
    checks = instructions(dockerfile_stages()[-1], "HEALTHCHECK")
    if not checks:
        pytest.skip("no HEALTHCHECK")
    path = re.search(r"GET (/[a-z]+)", checks[0])
    assert path, checks[0]
    assert f'.route("{path.group(1)}"' in (REPO / "src" / "http" / "mod.rs").read_text(), \
        f"the HEALTHCHECK asks {path.group(1)}, which src/http/mod.rs does not serve"
    # The slim image has neither curl nor wget unless the Dockerfile installs it.
    tool = re.search(r"\b(curl|wget)\b", checks[0])
    if tool:
        installs = " ".join(instructions(dockerfile_stages()[-1], "RUN"))
        assert re.search(rf"install .*\b{tool.group(1)}\b", installs), f"the HEALTHCHECK needs {tool.group(1)}"


# --- systemd ----------------------------------------------------------------------------------

def test_systemd_unit():
    unit = read_unit()
    assert {"Unit", "Service", "Install"} <= set(unit)
    svc = lambda key: unit_value(unit, "Service", key)  # noqa: E731
    assert svc("ExecStart").split()[0] == "/usr/local/bin/kafka-s3-archiver"
    # No leading '-': a missing env file must stop the start, not run with the defaults.
    assert svc("EnvironmentFile") == "/etc/kafka-s3-archiver/env"
    assert svc("User") not in ("root", "0")
    assert svc("StateDirectory") == "kafka-s3-archiver"
    assert svc("WorkingDirectory") == STATE_DIR
    spool = [v.split("=", 1)[1] for v in unit_values(unit, "Service", "Environment") if v.startswith("SPOOL_DIR=")]
    assert spool and spool[0].startswith(STATE_DIR + "/"), "SPOOL_DIR is not in the state directory"
    assert svc("Restart") == "on-failure"
    assert "2" in svc("RestartPreventExitStatus").split(), "exit code 2 (configuration error) must not restart"
    stop = seconds(svc("TimeoutStopSec"))
    assert stop >= shutdown_timeout_default() + 30, \
        f"TimeoutStopSec={stop}s leaves no margin over SHUTDOWN_TIMEOUT ({shutdown_timeout_default()}s)"
    assert svc("NoNewPrivileges") == "yes"
    assert svc("ProtectSystem") == "strict"
    assert STATE_DIR in svc("ReadWritePaths").split()
    assert svc("PrivateTmp") == "yes"
    assert svc("ProtectHome") in ("yes", "read-only", "tmpfs")
    assert int(svc("LimitNOFILE").split(":")[0]) >= 8192
    assert unit_value(unit, "Install", "WantedBy") == "multi-user.target"


def test_systemd_accepts_the_unit(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if not analyze:
        pytest.skip("systemd-analyze is not installed")
    # verify wants ExecStart to exist; everything else is checked as written.
    text = re.sub(r"^ExecStart=\S+", "ExecStart=/bin/true", UNIT.read_text(), flags=re.M)
    copy = tmp_path / UNIT.name
    copy.write_text(text)
    out = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    problems = [line for line in (out.stdout + out.stderr).splitlines() if UNIT.name in line or "Unknown" in line]
    assert out.returncode == 0 and not problems, out.stdout + out.stderr


# --- Grafana ----------------------------------------------------------------------------------

def dashboard_panels(d):
    for p in d["panels"]:
        yield p
        yield from p.get("panels", [])


def test_grafana_dashboard_shape():
    d = json.loads(DASHBOARD.read_text())
    assert d["schemaVersion"] >= 36
    variables = {v["name"]: v for v in d["templating"]["list"]}
    ds = variables["DS_PROMETHEUS"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    assert variables["instance"]["type"] == "query"
    assert variables["instance"]["datasource"]["uid"] == "${DS_PROMETHEUS}"
    ids = [p["id"] for p in dashboard_panels(d)]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    taken = set()
    for p in dashboard_panels(d):
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & taken, f"panel {p['title']!r} overlaps another"
        taken |= cells
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
        assert p.get("targets"), f"panel {p['title']!r} has no query"
        for t in p["targets"]:
            expr = t["expr"]
            assert t["datasource"]["uid"] == "${DS_PROMETHEUS}"
            assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
            # Every selector is narrowed to the chosen instances.
            selectors = re.findall(r"kafka_s3_archiver_[a-z0-9_]+(\{[^}]*\})?", expr)
            assert all('instance=~"$instance"' in s for s in selectors), expr


def test_grafana_dashboard_uses_exactly_the_metrics_of_metrics_rs():
    d = json.loads(DASHBOARD.read_text())
    kinds = metric_names()
    exprs = [t["expr"] for p in dashboard_panels(d) for t in p.get("targets", [])]
    exprs += [json.dumps(v.get("query", "")) for v in d["templating"]["list"]]
    used = set()
    for expr in exprs:
        for name in re.findall(r"kafka_s3_archiver_[a-z0-9_]+", expr):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            if base != name and kinds.get(base) == "histogram":
                used.add(base)
                if name.endswith("_bucket"):
                    assert "histogram_quantile" in expr, expr
            else:
                assert name in kinds, f"the dashboard queries {name}, which src/metrics.rs does not define"
                assert kinds[name] != "histogram", f"{name} is a histogram: query its _bucket, _sum or _count"
                used.add(name)
    unused = sorted(set(kinds) - used)
    assert not unused, f"metrics no panel shows: {unused}"
    # A counter is shown as a rate, never as its raw running total.
    for expr in exprs:
        for name in re.findall(r"kafka_s3_archiver_[a-z0-9_]+_total", expr):
            assert re.search(rf"(rate|increase)\({name}", expr), expr
