#!/usr/bin/env bash
# Runs the test suite in a second environment, .venv-compat, holding the oldest versions the
# project supports: torch 2.11.0 and transformers 5.10.4 (the floors in pyproject.toml). TRL
# 1.16 accepts that transformers, so the TRL drop-in is tested there too. verl 0.9.1 (which
# pins transformers<5.11) is installed beside them, so code that meets verl runs against it.
#
# Like scripts/setup.sh, a second run skips the install while the stamp matches a hash of
# what the install depends on. Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv-compat
STAMP=$VENV/prefix_grouper_compat.sha256
inputs_hash=$(sha256sum scripts/test_compat.sh setup.py pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$inputs_hash" ]; then
  # The pins hold through every step: nothing installed later may move torch or transformers.
  # numpy < 2.4: triton 3.6's interpreter (CPU runs of the Triton kernels) turns 1-element
  # arrays into Python scalars, which numpy 2.4 refuses.
  pins=$(mktemp)
  printf 'torch==2.11.0\ntransformers==5.10.4\nnumpy<2.4\n' > "$pins"
  python -m pip install -q -c "$pins" torch transformers numpy tqdm matplotlib pytest \
    "setuptools>=77" "trl==1.16.0" "peft==0.21.2"
  python -m pip install -q -c "$pins" "verl==0.9.1" cachetools uvicorn fastapi
  PREFIX_GROUPER_SKIP_CUDA_BUILD=1 python -m pip install -q --no-build-isolation --no-deps -e .
  rm -f "$pins"
  echo "$inputs_hash" > "$STAMP"
fi
python -c "import torch, transformers; print(f'compat env: torch {torch.__version__}, transformers {transformers.__version__}')"
python -m pytest tests "$@"
