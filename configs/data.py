r"""Data-only config: the built-in sounding-video data or a prepared TFDS dataset.

This is the `config.data` subtree every training phase embeds; on its own it
drives data preparation checks and the data benchmark.

  python -m avtok_jax.data.prepare --source=synthetic_av --num=512 --data_dir=data
  python bench/data_pipeline.py --preset=paper

Argument: the size preset, `tiny`, `small` or `paper` (default), optionally
followed by `,source=tfds:synthetic_av` etc. Expected: `paper` clips are
16x128x128 RGB frames with 98,304 audio samples at 22,050 Hz (4.46 s), which
become 1024 video patches of 4x8x8x3 and 480 mel patches of 8x8.
"""

from avtok_jax import config_lib


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(arg, preset="paper", source="synthetic", data_dir="")
  config = config_lib.ml_collections.ConfigDict()
  config.data = config_lib.data_config(args.preset)
  config.data.source = args.source
  config.data.data_dir = args.data_dir
  config_lib.check_data_config(config.data)
  return config
