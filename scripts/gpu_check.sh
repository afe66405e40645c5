#!/usr/bin/env bash
# One call on an H100/H200 (torch and triton installed, no network): build the extension, run
# the test files that hold the GPU-only tests, then every benchmark suite through
# `python -m benchmarks.run`, so that one device call measures everything.
#
# Budget: under 8 minutes. Every step has its own `timeout`, so a slow or hung step costs only
# its own results, and not even those it measured: the runner rewrites a suite's CSV after
# every row (the attention suite yields a shape's rows together, the model suite each
# approach's row), so a suite stopped by its timeout keeps what it measured. The costs
# below are estimates (this script has not run on a GPU yet); it prints each step's measured
# seconds at the end, and the runner prints seconds per suite: put those here after a run.
#   step                                                  expected   timeout (env override)
#   build the extension (nvcc, sm_90a)                     ~50 s      BUILD_S=75
#   GPU test files (bf16 kernels, fused heads, host sync)  ~45 s      TESTS_S=75
#   attention suite (9 shapes incl. the two Qwen2.5 model-attention shapes; FlexAttention
#     compiles once per shape)                             ~130 s     ATTENTION_S=170
#   model suite (Qwen2.5-0.5B and 1.5B shapes, P4096 S256 G8, bf16, grad ckpt: unpacked,
#     FlexAttention-grouped, prefix_grouper, fused)        ~80 s      MODEL_S=100
#   advantages, log_probs, training, trl at --quick
#     (first shape each, cheapest first)                   ~40 s      QUICK_SUITES_S=60
#   total of the timeouts: 480 s.
# Results: runs/bench/<suite>_<device>.csv and .png; with $OUT set (the device tool), also
# $OUT/bench.tar.gz (the device tool returns at most 8 files) and $OUT/gpu_check.log.
# To quote a run in the README, commit its CSVs under benchmarks/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if [ -n "${OUT:-}" ]; then exec > >(tee "$OUT/gpu_check.log") 2>&1; fi
status=0
timings=()

step() {  # step NAME SECONDS COMMAND...: run with a timeout, record its time and failure
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  echo "=== $name (timeout ${limit}s)"
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  timings+=("$name: $((SECONDS - start)) s (rc $rc$([ $rc -eq 124 ] && echo ', TIMED OUT'))")
  [ $rc -eq 0 ] || status=1
}

nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
# The device image has no trl (nor datasets, dill, multiprocess) and no liger-kernel, and cannot
# download: a session carries them as wheels in .whl/ (see the device tool's README).
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
step build "${BUILD_S:-75}" env MAX_JOBS=16 python3 -m pip install -q --no-build-isolation --no-deps -e .
step "GPU tests" "${TESTS_S:-75}" python3 -m pytest -q -rs -p no:cacheprovider \
  tests/test_prefix_attention_triton.py tests/test_prefix_attention.py tests/test_fused_linear_log_probs.py \
  tests/test_advantages.py tests/test_transformers_integration.py
step "compute-sanitizer (CUDA advantage op)" "${SANITIZER_S:-40}" compute-sanitizer --tool memcheck \
  --error-exitcode 1 python3 -c "
import torch
from prefix_grouper.advantages import grpo_advantages
r = torch.randn(97, device='cuda', dtype=torch.float64)
g = torch.arange(97, device='cuda') // 7
print(grpo_advantages(r, g, backend='cuda').abs().sum().item())"
step "attention suite" "${ATTENTION_S:-150}" python3 -m benchmarks.run --suite attention
step "model suite" "${MODEL_S:-90}" python3 -m benchmarks.run --suite model
step "quick suites" "${QUICK_SUITES_S:-50}" python3 -m benchmarks.run --quick \
  --suite advantages log_probs training trl

echo "=== seconds per step"
printf '  %s\n' "${timings[@]}"
if [ -n "${OUT:-}" ] && [ -d runs/bench ]; then tar -czf "$OUT/bench.tar.gz" -C runs bench; fi
exit $status
