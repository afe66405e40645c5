#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the demo: equivalence with the unpacked layout and
# unpacked-vs-packed timing of prefix_attention on this device (CPU or GPU). Results go to
# runs/demo/ (ignored by git); pass --update-results to refresh benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
python -m benchmarks.demo "$@"
