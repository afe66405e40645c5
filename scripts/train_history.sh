#!/usr/bin/env bash
# Set up (scripts/setup.sh), then GiGPO on keydoor-history with every default of
# `python -m prefix_grouper.train`, twice from one seed: log-probs from the prefix tree of each
# step's histories, then from the unpacked rows (--no-prefix-grouper). Under
# benchmarks/results/training/ it writes
#   gigpo_history/, gigpo_history_unpacked/   each run's metrics.jsonl and rewards.png
#   gigpo_history.csv   per run: success rate of the first / last 20 steps, wall time, tokens
#                       packed / unpacked / forwarded, steps whose rollouts equal the tree run's
#   gigpo_history.png   success rate and mean reward per step of both runs
# One CPU thread unless OMP_NUM_THREADS says otherwise: the tiny model gains little from more,
# and the float sums of one thread are the same on every machine. Extra arguments go to both
# runs (e.g. --seed 3, --device cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
out=benchmarks/results/training
declare -A wall
for run in gigpo_history gigpo_history_unpacked; do
  flags=()
  [ "$run" = gigpo_history_unpacked ] && flags=(--no-prefix-grouper)
  start=$(date +%s.%N)
  python -m prefix_grouper.train --algo gigpo --task keydoor-history --out "$out/$run" "${flags[@]}" "$@"
  wall[$run]=$(python -c "import sys; print(float(sys.argv[2]) - float(sys.argv[1]))" "$start" "$(date +%s.%N)")
done
python - "$out" "${wall[gigpo_history]}" "${wall[gigpo_history_unpacked]}" <<'PY'
import os
import sys

from prefix_grouper.trainers import plot_runs, run_costs, write_run_costs

out, tree_wall, unpacked_wall = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
tree, unpacked = os.path.join(out, "gigpo_history"), os.path.join(out, "gigpo_history_unpacked")
rows = [run_costs(tree, grouped=True, wall_s=tree_wall, reference_dir=tree),
        run_costs(unpacked, grouped=False, wall_s=unpacked_wall, reference_dir=tree)]
write_run_costs(os.path.join(out, "gigpo_history.csv"), rows)
plot_runs(os.path.join(out, "gigpo_history.png"), {"prefix tree": tree, "unpacked rows": unpacked},
          "GiGPO on keydoor-history: prefix tree vs unpacked rows, one seed")
for row in rows:
    print(", ".join(f"{key}={value}" for key, value in row.items()))
PY
