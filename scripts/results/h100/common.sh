python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD METAMM_DATA=$PWD/.gpudata METAMM_CACHE=/tmp/cache PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
COMMON="trainer.device=cuda trainer.tensorboard=false"
job() { name=$1; shift; ( timeout ${TMO:-420} python3 "$@" > $R/$name.json 2> $R/$name.log; echo "exit $?" >> $R/$name.log ) & }
