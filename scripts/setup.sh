#!/usr/bin/env bash
# Creates .venv (Python 3.10+) with torch 2.14.1, triton and the test/benchmark tools, then
# installs prefix_grouper in editable mode. The CUDA extension in csrc/ is compiled when
# nvcc and a CUDA build of torch are present (see setup.py for the switches).
#
# A second run only verifies: the install is skipped while the stamp in .venv matches a hash
# of what the install depends on (this script, setup.py, pyproject.toml, csrc/), and an
# import check runs. Python edits under prefix_grouper/ need no reinstall (editable install).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
STAMP=.venv/prefix_grouper_setup.sha256
# shellcheck disable=SC2046
inputs_hash=$(sha256sum scripts/setup.sh setup.py pyproject.toml $(find csrc -type f | LC_ALL=C sort) \
  | sha256sum | cut -d' ' -f1)
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
if [ "$(cat "$STAMP" 2>/dev/null)" = "$inputs_hash" ]; then
  echo "prefix_grouper: .venv is up to date with setup.py, pyproject.toml and csrc/ (delete $STAMP to reinstall)"
else
  python -m pip install -q "torch==2.14.1" numpy tqdm matplotlib pytest ninja cmake "setuptools>=77" \
    "transformers==5.24.0" "trl==1.16.0" "peft==0.21.2"
  python -m pip install -q --no-build-isolation -e .
  echo "$inputs_hash" > "$STAMP"
fi
python - <<'PY'
import torch, prefix_grouper
from prefix_grouper._extension import cuda_extension_available
print(f"prefix_grouper ready: torch {torch.__version__}, CUDA extension "
      f"{'built' if cuda_extension_available() else 'not built'}, "
      f"GPU {'yes: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no'}")
PY
