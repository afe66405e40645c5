#!/usr/bin/env bash
# Set up (scripts/setup.sh), then the reference trainers' longer runs with default settings:
# metrics.jsonl and rewards.png of each under benchmarks/results/training/<run>/, and the
# speed/learning table that docs/training.md quotes, in benchmarks/results/training/summary.md.
# Extra arguments go to every run (e.g. --device cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
out=benchmarks/results/training
python -m prefix_grouper.train --algo grpo --steps 200 --out "$out/grpo" "$@"
python -m prefix_grouper.train --algo crpo --steps 200 --out "$out/crpo" "$@"
# An environment step trains on every episode step (up to 8 per episode): 4 reset states
# x 8 episodes already give up to 256 rows per step.
python -m prefix_grouper.train --algo gigpo --steps 120 --prompts-per-step 4 --out "$out/gigpo" "$@"
python -m prefix_grouper.train --algo grpo --task keydoor --steps 120 --prompts-per-step 4 --out "$out/grpo_keydoor" "$@"
python -c 'import sys; from prefix_grouper.trainers import summary_table; print(summary_table(sys.argv[1:]))' \
    "$out/grpo" "$out/crpo" "$out/gigpo" "$out/grpo_keydoor" | tee "$out/summary.md"
