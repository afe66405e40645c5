#!/usr/bin/env bash
# One call on an H100/H200 (torch and triton installed, no network): build the extension, probe
# the bf16 kernels' correctness on the GPU, then the benchmark suites through
# `python -m benchmarks.run`, the ones with GPU targets first.
#
# Budget: under 8 minutes. Every step has its own `timeout`, so a slow or hung step costs only
# its own results, and not even those it measured: the runner rewrites a suite's CSV after
# every row, so a suite stopped by its timeout keeps what it measured. Seen on an H200
# (2026-12-04, torch 2.11.0, triton 3.6.0): the build took 22-26 s, compute-sanitizer 13 s,
# the advantages suite 23 s; the probe, the attention suite and the GPU test files did not
# reach a result (a process's first Triton attention call autotuned 24 configs per kernel
# for over 75 s), and the model suite's FlexAttention compiles did not finish its first
# config in 80 s. Since then the default autotuning tries 1-4 configs per kernel (8 warps;
# see triton_autotune), and the correctness steps (probe, tests) run with
# PREFIX_GROUPER_AUTOTUNE=off: one config per kernel, no sweep, since every feature
# combination and head dim they cover is a new autotuning key. The test files run last.
#   step                                                   timeout (env override)
#   build the extension (nvcc, sm_90a)                     BUILD_S=40
#   scripts/gpu_probe.py: bf16 vs fp64 against PyTorch's
#     own bf16 error, features, repeatability, host sync
#     (attention alone; where a model step syncs)         PROBE_S=100
#   compute-sanitizer on the CUDA advantage op             SANITIZER_S=20
#   attention suite (the configs with targets)             ATTENTION_S=135
#   model suite (1.5B shape first)                         MODEL_S=95
#   log_probs suite (C 8192, the target, and 2048; H 1536) LOG_PROBS_S=30
#   advantages suite at --quick                            ADVANTAGES_S=20
#   GPU test files (triton attention, fused log-probs)     TESTS_S=40
#   total of the timeouts: 480 s; set the ones you need lower to fit a shorter lease.
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
# What ran: the results are only worth committing from a clean commit (a session snapshots one
# with `git clone . .snap` and carries .snap, wheels copied into .snap/.whl).
echo "commit $(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown), $(git status --porcelain 2>/dev/null | wc -l) changed files"
# The device image has no trl (nor datasets, dill, multiprocess) and no liger-kernel, and cannot
# download: a session carries them as wheels in .whl/ (see the device tool's README).
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
step build "${BUILD_S:-40}" env MAX_JOBS=16 python3 -m pip install -q --no-build-isolation --no-deps -e .
step "bf16 probe (features, repeatability, host sync)" "${PROBE_S:-100}" \
  env PREFIX_GROUPER_AUTOTUNE=off python3 scripts/gpu_probe.py
step "compute-sanitizer (CUDA advantage op)" "${SANITIZER_S:-20}" compute-sanitizer --tool memcheck \
  --error-exitcode 1 python3 -c "
import torch
from prefix_grouper.advantages import grpo_advantages
r = torch.randn(97, device='cuda', dtype=torch.float64)
g = torch.arange(97, device='cuda') // 7
print(grpo_advantages(r, g, backend='cuda').abs().sum().item())"
# The configs that carry targets first (the whole suite does not fit beside the others).
step "attention suite" "${ATTENTION_S:-135}" python3 -m benchmarks.bench_attention --out runs/bench --configs \
  "P4096 S512 G8" "Qwen2.5-1.5B attn P4096 S256 G8" "Qwen2.5-0.5B attn P4096 S256 G8" "ragged GQA 4 groups" \
  "P8192 S512 G8 no window" "P8192 S512 G8 window 4096" "P8192 S512 G8 window 1024" \
  "P8192 S512 G8 softcap 50" "P8192 S512 G8 sinks"
step "model suite" "${MODEL_S:-95}" python3 -m benchmarks.run --suite model
step "log_probs suite" "${LOG_PROBS_S:-30}" python3 -m benchmarks.bench_log_probs --out runs/bench --configs 8192,1536 \
  2048,1536
step "advantages suite" "${ADVANTAGES_S:-20}" python3 -m benchmarks.run --quick --suite advantages
step "GPU tests" "${TESTS_S:-40}" env PREFIX_GROUPER_AUTOTUNE=off python3 -m pytest -q -x -rs -p no:cacheprovider \
  tests/test_prefix_attention_triton.py tests/test_fused_linear_log_probs.py

echo "=== seconds per step"
printf '  %s\n' "${timings[@]}"
if [ -n "${OUT:-}" ] && [ -d runs/bench ]; then tar -czf "$OUT/bench.tar.gz" -C runs bench; fi
exit $status
