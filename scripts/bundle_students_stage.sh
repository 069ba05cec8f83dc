#!/bin/bash
# Pack what the `students` stage needs from finished `targets` stages, for a machine that has neither the teacher
# nor its caches (a GPU box): each run's config.yaml, targets/, probes/{test.npz,summary.json,layers.png} and the
# students already trained (so they are not retrained), plus one folder with the student model. Each packed
# config.yaml names that folder as the student model (`student`, relative: run from the unpacked folder).
#
#   scripts/bundle_students_stage.sh OUT.tgz STUDENT_MODEL_DIR RUN_DIR [RUN_DIR ...]
#
# On the other machine, in the folder where OUT.tgz is unpacked (the model lands in ./student, each run under
# ./runs/NAME), one process per GPU:
#   probekd run runs/NAME/config.yaml --out runs/NAME --stage students --workers N
# The teacher's shards are never packed. PYTHON (default python3) must import PyYAML. Copying the trained students
# back into the original run folder: they were made with `student.model: student`, so run that folder's grid with
# the packed config.yaml, or with --set student.model=... where the model now is.
set -eu
[ $# -ge 3 ] || { sed -n 2,15p "$0"; exit 2; }
out=$1
model=$2
shift 2
PY=${PYTHON:-python3}
[ -f "$model/config.json" ] || { echo "error: $model has no config.json: not a model folder" >&2; exit 2; }
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
cp -r "$model" "$stage/student"
for run in "$@"; do
  for f in config.yaml targets probes/test.npz probes/summary.json; do
    [ -e "$run/$f" ] || { echo "error: $run/$f is missing: run its targets stage first" >&2; exit 2; }
  done
  dst=$stage/runs/$(basename "$run")
  mkdir -p "$dst/probes"
  cp -r "$run/config.yaml" "$run/targets" "$dst/"
  cp "$run/probes/test.npz" "$run/probes/summary.json" "$dst/probes/"
  [ -e "$run/probes/layers.png" ] && cp "$run/probes/layers.png" "$dst/probes/"
  [ -d "$run/students" ] && cp -r "$run/students" "$dst/"
  "$PY" - "$dst/config.yaml" <<'PYEOF'
import sys
from pathlib import Path

import yaml

path = Path(sys.argv[1])
tree = yaml.safe_load(path.read_text())
tree["student"]["model"] = "student"  # the packed model folder, relative to where the bundle is unpacked
path.write_text(yaml.safe_dump(tree, sort_keys=False))
PYEOF
done
tar czf "$out" -C "$stage" .
echo "$out: $(du -h "$out" | cut -f1)"
