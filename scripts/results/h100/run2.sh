#!/usr/bin/env bash
# GPU batch 2: omniglot_strokes fusions, cross-modal, Omniglot 20-way; then the benchmarks alone.
R=/tmp/results2; mkdir -p $R; . .gpudata/common.sh; start=$(date +%s)
STM="missing50=missing.test.image=0.5 missing.test.strokes=0.5"
for f in concat attention weighted gated mean mlp film lowrank graph am3; do
  job st_$f scripts/fusion_table.py --seeds 0 --no-singles --fusions $f --test "clean=" --test "$STM" +exp=omniglot_strokes_protonet_5w1s $COMMON
done
S="fusion=mean mapping=linear"
for ds in "av image audio avdigits_protonet_5w1s" "st image strokes omniglot_strokes_protonet_5w1s"; do
  set -- $ds
  job cm_$1_shared scripts/crossmodal_table.py --seeds 0 --pairs $2:$3,$3:$2 --recipe "shared=$S" +exp=$4 $COMMON
  job cm_$1_align scripts/crossmodal_table.py --seeds 0 --pairs $2:$3,$3:$2 --recipe "shared+align=$S align.weight=0.5" +exp=$4 $COMMON
  job cm_$1_ab scripts/crossmodal_table.py --seeds 0 --pairs $2:$3,$3:$2 --recipe "episodes $2->$3=$S episode.support_modalities=[$2] episode.query_modalities=[$3]" +exp=$4 $COMMON
  job cm_$1_ba scripts/crossmodal_table.py --seeds 0 --pairs $2:$3,$3:$2 --recipe "episodes $3->$2=$S episode.support_modalities=[$3] episode.query_modalities=[$2]" +exp=$4 $COMMON
done
job omni20w1s scripts/fusion_table.py --seeds 0 --no-singles --fusions concat +exp=omniglot_protonet_20w1s trainer.max_steps=2500 $COMMON
wait; echo "parallel part $(( $(date +%s) - start ))s" >> $R/times.txt
# benchmarks, alone on the GPU
timeout 150 python3 scripts/bench_algorithms.py --amp bf16 --repeats 5 > $R/bench_algorithms_bf16.json 2> $R/bench_algorithms_bf16.log; echo "exit $?" >> $R/bench_algorithms_bf16.log
echo "total $(( $(date +%s) - start ))s" >> $R/times.txt
tar czf $OUT/results2.tgz -C /tmp results2
for f in $R/*.log; do echo "$(basename $f): $(tail -n1 $f)"; done; cat $R/times.txt
