#!/usr/bin/env bash
# Run every benchmark, one after another (they share the machine, PostgreSQL
# and Redis database 0). JSON lines go to stdout, and are appended to the file
# given as $1 when there is one; progress goes to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-/dev/null}"
for script in detection planning overhead latency ingest memory cli_startup; do
    echo "== bench.$script" >&2
    python -m "bench.$script" | tee -a "$out"
done
