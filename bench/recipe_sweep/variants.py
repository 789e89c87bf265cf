"""The recipe variants of the sweep; prints 'NAME<TAB>JSON' lines (all, or those named).

A spec: `common` / `s1` / `s2` map dotted config keys to values for both
stages / stage 1 / stage 2; `eval1` / `eval2` list extra held-out check
steps; `batch` is the batch size (default 8); `stage1_only` skips stage 2;
`continuous` replaces the codes by the l2-normalised encoder outputs (no
VQ; an ablation of this sweep only); `pe: "grid"` swaps the sin-cos tables
for grid-aware frequencies (pi/g .. pi per axis of length g); `latent_scale`
multiplies the unit code vectors before `quant_out`; `token_grid` (with
`pe: "grid"`) lays the 64 video tokens out as a 1x8x8 grid: holistic query i
starts as that location's PE and latent i gets it instead of the 1D PE.
"""

import json
import sys

E1 = [300, 600, 1200]
E1L = [300, 600, 1200, 2400, 3600]
E = [600, 1200, 2400]
R = {"restart_dead_codes_every": 50}
R0 = {"restart_dead_codes_every": 0}
NS = {"model.stochastic_quantization": False}
W256 = {
  "model.width": 256,
  "model.encoder_depth": 4,
  "model.decoder_depth": 4,
  "model.num_heads": 8,
}
VARIANTS = {
  # Run 1 (2026-11-26, H100): stage 1 (1200 steps) then stage 2 (300).
  "base": {"s1": R0, "eval1": E1},
  "restart": {"s1": R, "eval1": E1},
  "restart_nostoch": {"s1": R, "common": NS, "eval1": E1},
  "nostoch": {"s1": R0, "common": NS, "eval1": E1},
  "cb256d8": {"s1": R0, "common": {"model.codebook_size": 256, "model.code_dim": 8}, "eval1": E1},
  "restart_noprior": {"s1": dict(R, **{"loss_weights.prior": 0.0}), "eval1": E1},
  "restart_noalign": {"s1": dict(R, **{"loss_weights.alignment": 0.0}), "eval1": E1},
  "restart_lr2e-3": {"s1": dict(R, **{"optim.lr": 2e-3}), "eval1": E1},
  "restart_const": {"s1": dict(R, **{"optim.schedule": "constant"}), "eval1": E1},
  "restart_tok128": {"s1": R, "common": {"model.num_video_tokens": 128}, "eval1": E1},
  "restart_3600": {"s1": dict(R, total_steps=3600), "eval1": E1L},
  "base_3600": {"s1": dict(R0, total_steps=3600), "eval1": E1L, "stage1_only": True},
  # Run 2 (2026-11-26, H100): stage 1 only.
  "ref": {"s1": dict(R, total_steps=2400), "common": NS, "eval1": E, "stage1_only": True},
  "cont": {
    "s1": dict(R0, total_steps=2400),
    "common": NS,
    "continuous": True,
    "eval1": E,
    "stage1_only": True,
  },
  "w256": {
    "s1": dict(R, total_steps=2400),
    "common": dict(NS, **W256),
    "eval1": E,
    "stage1_only": True,
  },
  "b32": {
    "s1": dict(R, total_steps=2400, **{"optim.lr": 2e-3}),
    "common": NS,
    "batch": 32,
    "eval1": E,
    "stage1_only": True,
  },
  "l2only": {
    "s1": dict(R, total_steps=2400, **{"loss_weights.video_l1": 0.0}),
    "common": NS,
    "eval1": E,
    "stage1_only": True,
  },
  "cont_tok128": {
    "s1": dict(R0, total_steps=2400),
    "common": dict(NS, **{"model.num_video_tokens": 128}),
    "continuous": True,
    "eval1": E,
    "stage1_only": True,
  },
  "ref_4800": {
    "s1": dict(R, total_steps=4800),
    "common": NS,
    "eval1": [1200, 2400, 3600, 4800],
    "stage1_only": True,
  },
  # CPU (2-core VM), stage 1 only.
  "pe_grid": {
    "s1": dict(R, total_steps=1200),
    "common": NS,
    "pe": "grid",
    "eval1": [300, 600, 900],
    "stage1_only": True,
  },
  "pe_grid_ls4": {
    "s1": dict(R, total_steps=1200),
    "common": NS,
    "pe": "grid",
    "latent_scale": 4.0,
    "eval1": [300, 600, 900],
    "stage1_only": True,
  },
  "ls4": {
    "s1": dict(R, total_steps=1200),
    "common": NS,
    "latent_scale": 4.0,
    "eval1": [300, 600, 900],
    "stage1_only": True,
  },
  "token_grid": {
    "s1": dict(R, total_steps=1200),
    "common": NS,
    "pe": "grid",
    "latent_scale": 4.0,
    "token_grid": True,
    "eval1": [300, 600, 900],
    "stage1_only": True,
  },
  "token_grid_lr2e-3": {
    "s1": dict(R, total_steps=1200, **{"optim.lr": 2e-3}),
    "common": NS,
    "pe": "grid",
    "latent_scale": 4.0,
    "token_grid": True,
    "eval1": [300, 600, 900],
    "stage1_only": True,
  },
}

if __name__ == "__main__":
  for name, spec in VARIANTS.items():
    if len(sys.argv) > 1 and name not in sys.argv[1:]:
      continue
    print(name + "\t" + json.dumps(spec))
