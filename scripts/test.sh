#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the whole test suite. Without a GPU the Triton
# kernels run under TRITON_INTERPRET=1 (tests/conftest.py sets it) and GPU-only tests skip.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pytest tests "$@"
