#!/usr/bin/env bash
# First run on a fresh machine, on the built-in sounding-video data:
#   1. create .venv and install the pinned requirements and the package;
#   2. write a few built-in clips as real mp4 files with sound (look at them!);
#   3. build the built-in TFDS dataset (array_record) that training reads;
#   4. train the three Video-First-Audio-Later stages on it, each stage
#      starting from the previous one, and print where the samples are.
#
# Environment knobs: SIZE=tiny|small (default small: the CPU demo), NUM=train
# clips (default 2048), NUM_TEST=held-out clips (default 64), WORKDIR (default
# ./workdir), PYTHON (default python3),
# STEPS=N to override every stage's total_steps, SETUP=0 to reuse the current
# Python environment instead of creating .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE="${SIZE:-small}"
NUM="${NUM:-2048}"
NUM_TEST="${NUM_TEST:-64}"
WORKDIR="${WORKDIR:-workdir}"
PYTHON="${PYTHON:-python3}"
case "$SIZE" in
  tiny | small) PRESET="$SIZE" ;;  # model size -> data preset (config_lib.data_preset_for)
  *) echo "quickstart: SIZE must be tiny or small, got '$SIZE'" >&2; exit 2 ;;
esac

if [[ "${SETUP:-1}" != "0" ]]; then
  "$PYTHON" -m venv .venv
  .venv/bin/pip install -q -r requirements.txt -e .
  PYTHON=.venv/bin/python
fi

"$PYTHON" -m avtok_jax.data.synthetic --out="$WORKDIR/clips" --num=16 --preset="$PRESET"
"$PYTHON" -m avtok_jax.data.prepare --source=synthetic_av --preset="$PRESET" \
  --num="$NUM" --num_test="$NUM_TEST" --data_dir="$WORKDIR/tfds"

data_flags=(--config.data.source=tfds:synthetic_av --config.data.data_dir="$WORKDIR/tfds")
steps_flag=()
if [[ -n "${STEPS:-}" ]]; then
  steps_flag=(--config.total_steps="$STEPS")
fi
previous=""
for stage in 1 2 3; do
  init_flag=()
  if [[ -n "$previous" ]]; then
    init_flag=(--config.init_from="$previous")
  fi
  "$PYTHON" -m avtok_jax.main --config="configs/vfal_stage$stage.py:$SIZE" \
    --workdir="$WORKDIR/stage$stage" "${data_flags[@]}" "${steps_flag[@]}" "${init_flag[@]}"
  previous="$WORKDIR/stage$stage"
done
echo "Input vs reconstruction (PNG grids, mp4 with sound): $WORKDIR/stage*/samples/"
echo "Score the tokenizer: $PYTHON -m avtok_jax.evaluate --workdir=$WORKDIR/stage3 --num_clips=$NUM_TEST"
echo "Metrics: tensorboard --logdir $WORKDIR   (or $WORKDIR/stage*/metrics.jsonl)"
