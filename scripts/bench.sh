#!/usr/bin/env bash
# The benchmarks, from one command on a fresh machine of the test bed:
#   scripts/bench.sh            criterion micro-benchmarks (cargo bench), then the end-to-end load
#                               benchmark (scripts/loadbench.py) with its defaults: 200,000 records
#                               of 1 KB on 8 partitions, s3s-fs and garage, 20 ms round trip, the
#                               UPLOAD_WORKERS curve and the backlog RSS comparison; the Parquet
#                               format on a million records against the fetch ceiling
#   scripts/bench.sh --load-only [loadbench options]   only the load benchmark (see --help)
# Results: target/criterion/ and target/bench/{results.json,workers.svg}.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/install-testbed.sh --bench)"
export TESTBED_HOME=${TESTBED_HOME:-$HOME/.cache/kafka-s3-archiver}
if [ "${1:-}" = "--load-only" ]; then
  shift
else
  cargo bench --locked
fi
cargo build --release --locked
export ARCHIVER_BIN=$(realpath "${CARGO_TARGET_DIR:-target}")/release/kafka-s3-archiver
exec "$VENV/bin/python" scripts/loadbench.py "$@"
