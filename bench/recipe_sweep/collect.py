"""Composes every variant's first eval clips into one PNG (video rows, then mel rows)."""

import glob
import os
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from avtok_jax.data import patches  # noqa: E402

src, out = sys.argv[1], sys.argv[2]
rows, mrows = [], []
for f in sorted(glob.glob(os.path.join(src, "*.npz"))):
  d = np.load(f)
  name = os.path.basename(f)[:-4]
  to = lambda x: ((np.clip(x, -1, 1) + 1) * 127.5).astype(np.uint8)  # noqa: E731
  vin = patches.unpatchify_video(d["vin"].astype(np.float32) / 127.5 - 1, (8, 64, 64, 3), (4, 8, 8))
  vre = patches.unpatchify_video(d["vrecon"], (8, 64, 64, 3), (4, 8, 8))
  if not rows:
    rows.append(np.concatenate(list(to(vin[0])), axis=1))
    rows.append(np.concatenate(list(to(vin[1])), axis=1))
  rows.append(np.concatenate(list(to(vre[0])), axis=1))
  rows.append(np.concatenate(list(to(vre[1])), axis=1))
  print(len(rows), name)
  if "arecon" in d:
    mi = patches.unpatchify_mel(d["min"], (80, 192), (8, 8))
    mr = patches.unpatchify_mel(d["arecon"], (80, 192), (8, 8))
    if not mrows:
      mrows.append(to(mi[0])[::-1])
    mrows.append(to(mr[0])[::-1])
    print("mel", len(mrows), name)
Image.fromarray(np.concatenate(rows, axis=0)).save(os.path.join(out, "video.png"))
if mrows:
  Image.fromarray(np.concatenate(mrows, axis=0)).save(os.path.join(out, "mel.png"))
