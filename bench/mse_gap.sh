#!/bin/sh
# Why MSE only stays under its ceiling on the lookup family (README, "The toy ICL model"): MSE-only students on
# permutation 0, aligned after self-attention where the ceiling patches, with the MimIC heads for 10 and 40 epochs
# and with a linear shift for 10. Each prints its evaluation; the last-epoch mean of l_align is in its losses.jsonl.
# Needs the data that `pipeline experiment compare --family lookup --out bench/compare_lookup` writes (or copies it
# from there); about 20 minutes on one core.
set -e
out=${1:-runs/mse-gap}
data=bench/compare_lookup/data/perm0
[ -d "$data" ] || { echo "error: $data is missing: run pipeline experiment compare --family lookup --out bench/compare_lookup --tasks 1 first" >&2; exit 2; }
set -- --set model.path="$(python -c 'from stages.tasks.toy_icl import model_dpath; print(model_dpath())')" \
  --set task.root=$data --set run_dir="$out" --set task.support=train --set task.num_queries=1000 \
  --set teacher.sampler=cover --set eval.sampler=cover --set eval.num_samples=64 \
  --set teacher.shots=8 --set teacher.capture=attn --set teacher.store="$out/store-attn"
pipeline run teacher "$@"
for try in "e10 student.epochs=10" "e40 student.epochs=40" "linear student.epochs=10 student.shift=linear"; do
  name=${try%% *}; sets=$(for s in ${try#* }; do printf -- "--set %s " "$s"; done)
  pipeline run student "$@" --set student.out="$out/$name" --set student.w_ce=0 $sets
  pipeline eval "$@" --set eval.mode=trained --set eval.student="$out/$name" --set eval.out="$out/eval-$name" $sets
done
grep -H vqa_accuracy "$out"/eval-*/metrics.json
