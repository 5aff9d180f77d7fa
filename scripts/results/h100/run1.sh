#!/usr/bin/env bash
# GPU batch 1: real-data accuracy tables (issues 5 and 7). Results -> $OUT/results1.tgz
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD METAMM_DATA=$PWD/.gpudata METAMM_CACHE=/tmp/cache PYTHONUNBUFFERED=1
R=/tmp/results1; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/gpu.txt; python3 -c "import torch;print(torch.__version__)" >> $R/gpu.txt
start=$(date +%s)
# decode once (fills the cache), timed
for d in "dataset=omniglot" "dataset=omniglot_strokes" "dataset=avdigits" "dataset=avdigits dataset.protocol=speakers episode.way=10"; do
  /usr/bin/time -f "%e s wall: metamm data $d" python3 -m metamm_cli.cli data $d >> $R/data.txt 2>&1
done
echo "decode done $(( $(date +%s) - start ))s" >> $R/data.txt
COMMON="trainer.device=cuda trainer.tensorboard=false"
job() { name=$1; shift; ( timeout ${TMO:-480} python3 "$@" > $R/$name.json 2> $R/$name.log; echo "exit $?" >> $R/$name.log ) & }
# Omniglot ProtoNet (Vinyals), preset budgets
job omni5w1s scripts/fusion_table.py --seeds 0 --no-singles --fusions concat +exp=omniglot_protonet_5w1s $COMMON
job omni20w1s scripts/fusion_table.py --seeds 0 --no-singles --fusions concat +exp=omniglot_protonet_20w1s $COMMON
# fusion tables: clean and 50% test-time missing per modality
AVM="missing50=missing.test.image=0.5 missing.test.audio=0.5"
STM="missing50=missing.test.image=0.5 missing.test.strokes=0.5"
job av_single scripts/fusion_table.py --seeds 0 --fusions "" --test "clean=" --test "$AVM" +exp=avdigits_protonet_5w1s $COMMON
job st_single scripts/fusion_table.py --seeds 0 --fusions "" --test "clean=" --test "$STM" +exp=omniglot_strokes_protonet_5w1s $COMMON
for g in concat,attention weighted,gated mean,mlp film,lowrank graph,am3 late; do
  job av_$g scripts/fusion_table.py --seeds 0 --no-singles --fusions $g --test "clean=" --test "$AVM" +exp=avdigits_protonet_5w1s $COMMON
  job st_$g scripts/fusion_table.py --seeds 0 --no-singles --fusions $g --test "clean=" --test "$STM" +exp=omniglot_strokes_protonet_5w1s $COMMON
done
# cross-modal few-shot both ways + retrieval
S="fusion=mean mapping=linear"
for ds in "av image audio avdigits_protonet_5w1s" "st image strokes omniglot_strokes_protonet_5w1s"; do
  set -- $ds
  job cm_$1_shared scripts/crossmodal_table.py --seeds 0 --pairs $2:$3,$3:$2 --recipe "shared=$S" --recipe "shared+align=$S align.weight=0.5" +exp=$4 $COMMON
  job cm_$1_eps scripts/crossmodal_table.py --seeds 0 --pairs $2:$3,$3:$2 --recipe "episodes $2->$3=$S episode.support_modalities=[$2] episode.query_modalities=[$3]" --recipe "episodes $3->$2=$S episode.support_modalities=[$3] episode.query_modalities=[$2]" +exp=$4 $COMMON
done
sleep 20; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv >> $R/gpu.txt
wait
echo "total $(( $(date +%s) - start ))s" >> $R/data.txt
tar czf $OUT/results1.tgz -C /tmp results1
grep -h "exit" $R/*.log | sort | uniq -c; tail -3 $R/data.txt
