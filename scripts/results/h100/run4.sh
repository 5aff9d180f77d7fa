#!/usr/bin/env bash
R=/tmp/results4; mkdir -p $R; . .gpudata/common.sh; start=$(date +%s)
ROWS="maml[steps=1],maml[steps=5],fomaml[steps=1],fomaml[steps=5],metasgd[steps=1],metasgd[steps=5],reptile[steps=1],reptile[steps=5],maml[steps=1,execution=vmap],maml[steps=1,execution=loop],protonet,matching,relation,siamese,gnn,hypernet,finetune,maml_l2l_loop[steps=1],maml_l2l_loop[steps=5]"
timeout 190 python3 scripts/bench_algorithms.py --amp bf16 --repeats 3 --only "$ROWS" > $R/bench_algorithms_bf16.json 2> $R/bench.log; echo "bench exit $?"
timeout 60 python3 scripts/bench_algorithms.py --amp bf16 --repeats 3 --only "anil[steps=1],anil[steps=5]" > $R/bench_anil_bf16.json 2> $R/anil.log; echo "anil exit $?"
tail -n 3 $R/anil.log; echo "total $(( $(date +%s) - start ))s"
cp $R/*.json $OUT/
