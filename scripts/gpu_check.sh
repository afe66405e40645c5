#!/usr/bin/env bash
# One call on an H100/H200 (torch and triton installed, no network): build the extension (the
# flash backend's LSE-merge kernel included), probe the bf16 kernels' correctness on the GPU, run
# the flash backend's GPU tests, then the benchmark suites (their attention, model and tree steps
# with a `flash` row beside Triton), the ones with GPU targets first.
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
# combination and head dim they cover is a new autotuning key. The flash backend's test files run
# right after the probe (its benchmark rows mean little if it is wrong); the older test files last.
#   step                                                   timeout (env override)
#   build the extension (nvcc, sm_90a only: the device;
#     forced, so a failed build fails the step instead of
#     leaving flash on its PyTorch merge fallback)         BUILD_S=40
#   scripts/gpu_probe.py: triton and flash, bf16 vs fp64
#     against PyTorch's own bf16 error, features,
#     repeatability, the merge kernel, host sync
#     (attention alone; where a model step syncs)         PROBE_S=90
#   flash GPU test files (backend, merge kernel)           FLASH_TESTS_S=30
#   compute-sanitizer on the CUDA advantage op and merge   SANITIZER_S=15
#   attention suite (the configs with targets)             ATTENTION_S=125
#   model suite (1.5B shape first)                         MODEL_S=85
#   tree suite at --quick                                  TREE_S=25
#   log_probs suite (C 8192, the target, and 2048; H 1536) LOG_PROBS_S=30
#   advantages suite at --quick                            ADVANTAGES_S=20
#   GPU test files (triton attention, fused log-probs)     TESTS_S=20
#   total of the timeouts: 480 s; set the ones you need lower to fit a shorter lease. The flash
#   tests and the tree suite took their 55 s from other steps, none of which has finished inside
#   its old timeout but the sanitizer: 5 s from the sanitizer (13 s measured), 10 each from the
#   probe (flash adds no compiles to it), attention and model suites (each suite's CSV keeps the
#   rows it measured), 20 from the older GPU test files (stopped by a timeout in every call so
#   far). The build keeps 40 s, its nvcc runs now for sm_90a alone instead of sm_80 and sm_90a
#   (22-26 s measured for both), so that the merge kernel's source fits.
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
step "build" "${BUILD_S:-40}" env MAX_JOBS=16 PREFIX_GROUPER_FORCE_CUDA_BUILD=1 PREFIX_GROUPER_CUDA_ARCHS=90a \
  python3 -m pip install -q --no-build-isolation --no-deps -e .
step "bf16 probe (features, repeatability, host sync)" "${PROBE_S:-90}" \
  env PREFIX_GROUPER_AUTOTUNE=off python3 scripts/gpu_probe.py
# No -x: one device call should list every flash test that fails, not only the first.
step "flash GPU tests" "${FLASH_TESTS_S:-30}" env PREFIX_GROUPER_AUTOTUNE=off python3 -m pytest -q -rs \
  -p no:cacheprovider tests/attention/test_prefix_attention_flash_gpu.py tests/test_flash_merge.py
step "compute-sanitizer (CUDA advantage op, flash merge and sum)" "${SANITIZER_S:-15}" compute-sanitizer \
  --tool memcheck --error-exitcode 1 python3 -c "
import torch
from prefix_grouper.advantages import grpo_advantages
from prefix_grouper.attention.flash_merge import merge_partials, sum_partials
r = torch.randn(97, device='cuda', dtype=torch.float64)
g = torch.arange(97, device='cuda') // 7
print(grpo_advantages(r, g, backend='cuda').abs().sum().item())
parts = [(s, torch.randn(n, 3, 97, device='cuda', dtype=torch.bfloat16), torch.randn(3, n, device='cuda'))
         for s, n in [(0, 40)] + [(i, 7) for i in range(0, 33, 3)]]
out, lse = merge_partials(parts, 40, sinks=torch.zeros(3, device='cuda'), implementation='cuda')
total = sum_partials([(s, o) for s, o, _ in parts], 40, implementation='cuda')
print(out.float().abs().sum().item(), lse.sum().item(), total.float().abs().sum().item())"
# The configs that carry targets first (the whole suite does not fit beside the others). Every
# approach runs, flash included: a config it refuses (the softcap on PyTorch's engine) gets a
# row saying why.
step "attention suite" "${ATTENTION_S:-125}" python3 -m benchmarks.bench_attention --out runs/bench --configs \
  "P4096 S512 G8" "Qwen2.5-1.5B attn P4096 S256 G8" "Qwen2.5-0.5B attn P4096 S256 G8" "ragged GQA 4 groups" \
  "P8192 S512 G8 no window" "P8192 S512 G8 window 4096" "P8192 S512 G8 window 1024" \
  "P8192 S512 G8 softcap 50" "P8192 S512 G8 sinks"
step "model suite" "${MODEL_S:-85}" python3 -m benchmarks.run --suite model
step "tree suite" "${TREE_S:-25}" python3 -m benchmarks.run --quick --suite tree
step "log_probs suite" "${LOG_PROBS_S:-30}" python3 -m benchmarks.bench_log_probs --out runs/bench --configs 8192,1536 \
  2048,1536
step "advantages suite" "${ADVANTAGES_S:-20}" python3 -m benchmarks.run --quick --suite advantages
step "GPU tests" "${TESTS_S:-20}" env PREFIX_GROUPER_AUTOTUNE=off python3 -m pytest -q -x -rs -p no:cacheprovider \
  tests/attention/test_prefix_attention_triton.py tests/test_fused_linear_log_probs.py

echo "=== seconds per step"
printf '  %s\n' "${timings[@]}"
if [ -n "${OUT:-}" ] && [ -d runs/bench ]; then tar -czf "$OUT/bench.tar.gz" -C runs bench; fi
exit $status
