#!/bin/bash
# The full real extractions of issue 4, one after another (resumable: rerun to continue).
# Run in the background: nohup scripts/real_extract.sh > runs/real_extract.out 2>&1 &
export PROBEKD_CACHE=${PROBEKD_CACHE:-/tmp/pkcache} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cd "$(dirname "$0")/.."
# task, teacher, formulation, cache dtype (Gemma-3's activations come near the float16 maximum: bfloat16)
for spec in "arc_easy smollm2-135m-instruct option float16" "arc_easy smollm2-135m-instruct letter float16" \
            "arc_easy gemma3-270m option bfloat16" "arc_easy gemma3-270m letter bfloat16" \
            "arc_challenge smollm2-135m-instruct option float16" "arc_challenge smollm2-135m-instruct letter float16"; do
  set -- $spec
  out=runs/$1-$2-$3; mkdir -p runs
  echo "=== $(date +%T) start $out"
  start=$(date +%s)
  /usr/bin/time -v nice -n 10 .venv/bin/probekd extract --task $1 --teacher $2 --out $out --formulation $3 --storage-dtype $4 > $out.log 2>&1
  echo "=== $(date +%T) end $out rc=$? wall=$(( $(date +%s) - start ))s"
done
