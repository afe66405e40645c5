#!/usr/bin/env bash
# On a machine with an NVIDIA GPU and torch/triton already installed (no network needed):
# build the extension, run the whole test suite (the CUDA-only tests included), the CMake
# kernel test, and every benchmark. Results land in runs/ (and are copied to $OUT if set);
# pass --update-results to refresh the committed benchmarks/results/ instead.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
status=0
MAX_JOBS=${MAX_JOBS:-8} python3 -m pip install -q --no-build-isolation --no-deps -e . || status=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -m pytest tests -q -x || status=1
if command -v cmake >/dev/null; then
  cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release >/dev/null && cmake --build build/cmake -j \
    && ctest --test-dir build/cmake --output-on-failure || status=1
fi
python3 -m benchmarks.bench_attention "$@" || status=1
python3 -m benchmarks.bench_advantages || status=1
python3 -m benchmarks.demo "$@" || status=1
if [ -n "${OUT:-}" ]; then cp -r runs benchmarks/results "$OUT"/ 2>/dev/null; fi
exit $status
