#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the demo: equivalence with the naive layout and
# naive-vs-grouped timing of prefix_attention on this machine's device (CPU or GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
python benchmarks/demo.py "$@"
