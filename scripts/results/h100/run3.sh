#!/usr/bin/env bash
# GPU batch 3: each algorithm at an equal budget (synthetic, 3 modalities, concat); modality dropout on avdigits; MAML bench.
R=/tmp/results3; mkdir -p $R; . .gpudata/common.sh; start=$(date +%s)
for a in protonet matching relation siamese gnn hypernet finetune maml fomaml anil metasgd reptile align "protonet[cosine]" "finetune[cosine] (Baseline++)" "relation[ce]"; do
  n=$(echo "$a" | tr -c 'a-z\n' '_')
  job alg_$n scripts/algorithm_table.py --steps 1000 --meta-batch 16 --algorithms "$a" $COMMON eval.episodes=600
done
AVM="missing50=missing.test.image=0.5 missing.test.audio=0.5"
job av_drop scripts/fusion_table.py --seeds 0 --no-singles --fusions concat,late --test "clean=" --test "$AVM" +exp=avdigits_protonet_5w1s missing.train.image=0.5 missing.train.audio=0.5 $COMMON
wait; echo "parallel part $(( $(date +%s) - start ))s" >> $R/times.txt
timeout 100 python3 scripts/bench_maml.py --tasks 32 --amp bf16 > $R/bench_maml_bf16.json 2> $R/bench_maml_bf16.log
echo "total $(( $(date +%s) - start ))s" >> $R/times.txt
tar czf $OUT/results3.tgz -C /tmp results3
for f in $R/*.log; do echo "$(basename $f): $(tail -n1 $f)"; done; cat $R/times.txt
