#!/usr/bin/env bash
# A/B of two commits on the local suite, batch 1: `git worktree add /work/wt-base <old>` first, then
#   bash benchmarks/cpu/ab_worktrees.sh ROUNDS NPROMPTS NEW_TOKENS [OLD_TREE] [NEW_TREE]
# Runs `python main.py task=bench ...` in the old tree then the new one, alternating, one at a time, and prints
# each run's AR and method rows (tok/s, speedup, tau). Both trees use this checkout's .venv.
set -euo pipefail
R=${1:-2}; N=${2:-38}; NEW=${3:-128}; OLD_TREE=${4:-/work/wt-base}; NEW_TREE=${5:-$(cd "$(dirname "$0")/../.." && pwd)}
PY="$NEW_TREE/.venv/bin/python"
for i in $(seq "$R"); do
  for tree in "$OLD_TREE" "$NEW_TREE"; do
    (cd "$tree" && OMP_NUM_THREADS=1 PYTHONPATH="$tree" "$PY" main.py task=bench task.num_prompts="$N" \
        task.max_new_tokens="$NEW" task.warmup=1 hydra.run.dir="/tmp/ab/$(basename "$tree")-$i" 2>/dev/null \
      | grep -E "^\| (autoregressive|default)" | head -2 \
      | awk -v t="$(basename "$tree")" -v i="$i" -F'|' '{print i, t, $2, "tok/s", $6, "speedup", $7, "tau", $5}')
  done
done
