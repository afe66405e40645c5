#!/usr/bin/env bash
# Creates .venv (Python 3.10+) with torch 2.14.1, triton and the test/benchmark tools, then
# installs prefix_grouper in editable mode. The CUDA extension in csrc/ is compiled when
# nvcc and a CUDA build of torch are present (see setup.py for the switches).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q "torch==2.14.1" numpy tqdm matplotlib pytest ninja cmake transformers
python -m pip install -q --no-build-isolation -e .
python - <<'PY'
import torch, prefix_grouper
from prefix_grouper._extension import cuda_extension_available
print(f"prefix_grouper ready: torch {torch.__version__}, CUDA extension "
      f"{'built' if cuda_extension_available() else 'not built'}, "
      f"GPU {'yes: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no'}")
PY
