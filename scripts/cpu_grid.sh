#!/usr/bin/env bash
# The MiniLM full grids of docs/RESULTS.md, resumable across sessions: the targets stage (teacher, both cores),
# then the students in two lanes of one core each. Finished cells (students/<cell>/metrics.json) are committed, so a
# fresh clone resumes where the last session stopped (the teacher caches are not committed: a fresh clone that
# lacks targets/ for a cell reruns the targets stage, which re-extracts).
#   scripts/cpu_grid.sh arc_challenge        # or arc_easy; TARGETS=1 reruns the targets stage first
set -euo pipefail
task=$1
cfg=experiments/${task}-smollm2-minilm.yaml
out=results/grid-${task}-smollm2
bin=.venv/bin
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ ! -f "$out/targets/answers-test.npz" ] || [ -n "${TARGETS:-}" ]; then
  OMP_NUM_THREADS=2 $bin/probekd run "$cfg" --out "$out" --stage targets
fi
OMP_NUM_THREADS=1 $bin/probekd run "$cfg" --out "$out" --stage students --set "grid.signals=[hard, teacher]" \
  > "$out/lane-a.log" 2>&1 &
a=$!
OMP_NUM_THREADS=1 $bin/probekd run "$cfg" --out "$out" --stage students \
  --set "grid.signals=[teacher_calibrated, probe]" > "$out/lane-b.log" 2>&1 &
b=$!
wait $a $b
$bin/probekd report "$out"
