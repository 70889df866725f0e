#!/usr/bin/env bash
# The project's test command: installs the test bed if needed, runs the unit tests, builds the
# release binary and runs the integration tests against real servers (tansu, garage, moto) that
# the tests start on loopback.
#   THROUGHPUT_RECORDS (default 20000), THROUGHPUT_WORKERS (32): size of the throughput run.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/install-testbed.sh)"
export TESTBED_HOME=${TESTBED_HOME:-$HOME/.cache/kafka-s3-archiver}

cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings
cargo test --locked
cargo build --release --locked
# Absolute: the tests start the binary from their own working directories.
export ARCHIVER_BIN=$(realpath -m "${CARGO_TARGET_DIR:-target}")/release/kafka-s3-archiver
"$VENV/bin/pytest" tests/integration -p no:warnings -p no:cacheprovider -v -s -rA --durations=30
