#!/usr/bin/env bash
# First run on a fresh machine, on the built-in sounding-video data:
#   1. create .venv and install the pinned requirements and the package;
#   2. write a few built-in clips as real mp4 files with sound (look at them!);
#   3. build the built-in TFDS dataset (array_record) that training reads;
#   4. stream a few batches through the Grain pipeline (patchified video + mel).
#
# Environment knobs: PRESET=tiny|small|paper (default paper), NUM=train clips
# (default 512), WORKDIR (default ./workdir), PYTHON (default python3),
# SETUP=0 to reuse the current Python environment instead of creating .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

PRESET="${PRESET:-paper}"
NUM="${NUM:-512}"
WORKDIR="${WORKDIR:-workdir}"
PYTHON="${PYTHON:-python3}"

if [[ "${SETUP:-1}" != "0" ]]; then
  "$PYTHON" -m venv .venv
  .venv/bin/pip install -q -r requirements.txt -e .
  PYTHON=.venv/bin/python
fi

"$PYTHON" -m avtok_jax.data.synthetic --out="$WORKDIR/samples" --num=16 --preset="$PRESET"
"$PYTHON" -m avtok_jax.data.prepare --source=synthetic_av --preset="$PRESET" \
  --num="$NUM" --num_test=$((NUM / 8 > 0 ? NUM / 8 : 1)) --data_dir="$WORKDIR/tfds"
"$PYTHON" -m avtok_jax.data.pipeline --preset="$PRESET" --source=tfds:synthetic_av \
  --data_dir="$WORKDIR/tfds" --num_batches=8
