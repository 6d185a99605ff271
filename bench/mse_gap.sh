#!/bin/sh
# Why MSE only stays under its ceiling on the lookup family (README, "The toy ICL model"): MSE-only students on
# permutation 0, aligned after self-attention where the ceiling patches, with the MimIC heads for 10 and 40 epochs
# and with a linear shift for 10. It prints each evaluation and the mean l_align of each last epoch.
# Writes permutation 0's data itself, as `pipeline experiment compare --family lookup` does; about 20 minutes on one
# core. The optimum's L_align the README quotes (0.039) is not measured here.
set -e
out=${1:-runs/mse-gap}
data=$out/data/perm0
python -c "import sys; from pipeline.experiment import N_TRAIN, families; families()['lookup'].write(sys.argv[1], 0, N_TRAIN)" "$data"
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
for name in e10 e40 linear; do  # the last epoch's 250 steps
  python -c "import json, sys; r = [json.loads(l)['l_align'] for l in open(sys.argv[1])][-250:]; print(sys.argv[1], 'last-epoch l_align', round(sum(r) / len(r), 4))" "$out/$name/losses.jsonl"
done
