#!/bin/bash
# The full real extractions of issue 4, one after another (resumable: rerun to continue).
# Run in the background: nohup scripts/real_extract.sh > runs/real_extract.out 2>&1 &
export PROBEKD_CACHE=${PROBEKD_CACHE:-/tmp/pkcache} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cd "$(dirname "$0")/.."
for spec in "arc_easy smollm2-135m-instruct option" "arc_easy smollm2-135m-instruct letter" \
            "arc_easy gemma3-270m option" "arc_easy gemma3-270m letter" \
            "arc_challenge smollm2-135m-instruct option" "arc_challenge smollm2-135m-instruct letter"; do
  set -- $spec
  out=runs/$1-$2-$3; mkdir -p runs
  echo "=== $(date +%T) start $out"
  start=$(date +%s)
  /usr/bin/time -v nice -n 10 .venv/bin/probekd extract --task $1 --teacher $2 --out $out --formulation $3 > $out.log 2>&1
  echo "=== $(date +%T) end $out rc=$? wall=$(( $(date +%s) - start ))s"
done
