#!/usr/bin/env bash
# Device driver: install carried wheels, run all variants in parallel, collect.
# Usage (repo root): bash bench/recipe_sweep/run.sh   [ONLY="ref cont"] [DEADLINE=seconds]
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
fi
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT/logs
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import jax, flax, optax; print(jax.__version__, flax.__version__, optax.__version__, jax.devices())"
DEADLINE=${DEADLINE:-500}
export DATA=${DATA:-bench/recipe_sweep/data/data.npz}
mapfile -t lines < <(python3 bench/recipe_sweep/variants.py ${ONLY:-})
for line in "${lines[@]}"; do
  name=${line%%$'\t'*}; spec=${line#*$'\t'}
  (timeout $DEADLINE python3 bench/recipe_sweep/sweep.py run $OUT/logs "$name" "$spec" > $OUT/logs/$name.log 2>&1; echo "$name rc=$?" >> $OUT/logs/rc.txt) &
done
wait
cat $OUT/logs/*.jsonl > $OUT/results.jsonl 2>/dev/null
python3 bench/recipe_sweep/collect.py $OUT/logs $OUT || true
cat $OUT/logs/rc.txt
for f in $OUT/logs/*.log; do echo "== $f"; grep -v "^{" $f | grep -v WARNING | tail -4; done
cat $OUT/results.jsonl
cd $OUT && tar czf logs.tgz logs && rm -rf logs
