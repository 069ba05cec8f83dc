#!/bin/bash
# Train the student grids of run directories whose targets stage is done, one process per (run, seed), all in
# parallel: for a GPU machine that has neither the teacher nor its caches (copy each run directory without
# `teacher/*/shard-*`). The student model may sit at another path there: it is set in each run's config.yaml.
#
#   scripts/students_parallel.sh STUDENT_MODEL CONFIG.yaml:RUN_DIR [CONFIG.yaml:RUN_DIR ...]
#
# Logs go to RUN_DIR/students-s<seed>.log; a rerun trains only the missing cells; the report is written last.
set -u
model=$1
shift
PY=${PYTHON:-python3}
pids=()
for pair in "$@"; do
  cfg=${pair%%:*}
  run=${pair#*:}
  mkdir -p "$run"
  "$PY" - "$cfg" "$run" "$model" <<'PYEOF' || exit 2
import sys
from pathlib import Path

import yaml

cfg, run, model = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
saved = run / "config.yaml"
if saved.exists():  # the run's own config, with the student model where it is on this machine
    tree = yaml.safe_load(saved.read_text())
    tree["student"]["model"] = model
    saved.write_text(yaml.safe_dump(tree, sort_keys=False))
seeds = yaml.safe_load(open(cfg))["grid"]["seeds"]
(run / ".seeds").write_text(" ".join(map(str, seeds)))
PYEOF
  for s in $(cat "$run/.seeds"); do
    "$PY" -m probekd run "$cfg" --out "$run" --stage students --set "student.model=$model" \
      --set "grid.seeds=[$s]" > "$run/students-s$s.log" 2>&1 &
    pids+=($!)
  done
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
for pair in "$@"; do
  cfg=${pair%%:*}
  run=${pair#*:}
  rm -f "$run/.seeds"
  "$PY" -m probekd run "$cfg" --out "$run" --stage students --set "student.model=$model" > "$run/students-report.log" 2>&1 || rc=1
done
exit $rc
