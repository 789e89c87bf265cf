"""AR generator: vocabulary layout, KV-cache prefill/decoding, scan, parameter counts, axes."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avtok_jax import sharding
from avtok_jax.models import generator

VOCAB = generator.Vocab(codebook_size=16, num_classes=3)
MAX_LEN = 12
B = 2


def _model(**overrides) -> generator.Generator:
  c = generator.generator_config("tiny")
  c.update(overrides)
  return generator.build_generator(c, VOCAB, MAX_LEN)


MODEL = _model()


def _tokens(seed=1, length=10):
  return jax.random.randint(jax.random.key(seed), (B, length), 0, VOCAB.size)


@functools.cache
def _variables(model=MODEL):
  return jax.jit(model.init)(jax.random.key(0), _tokens())


@functools.partial(jax.jit, static_argnames="model")
def _full(params, tokens, model=MODEL):
  return model.apply({"params": params}, tokens)


@functools.partial(jax.jit, static_argnames="model")
def _decode(params, cache, tokens, model=MODEL):
  logits, state = model.apply(
    {"params": params, "cache": cache}, tokens, decode=True, mutable=["cache"]
  )
  return logits, state["cache"]


def test_vocab_layout():
  assert (VOCAB.sep, VOCAB.class_token(0), VOCAB.class_token(2)) == (16, 17, 19)
  assert (VOCAB.null_class, VOCAB.size, VOCAB.codes) == (20, 21, (0, 16))
  assert generator.sep_id(16) == 16 and generator.class_id(16, 1) == 18
  assert generator.null_class_id(16, 3) == 20 and generator.vocab_size(16, 3) == 21
  np.testing.assert_array_equal(VOCAB.class_token(jnp.arange(3)), [17, 18, 19])
  with pytest.raises(ValueError, match="outside"):
    VOCAB.class_token(3)
  assert generator.Vocab(8192).size == 8194  # codes, SEP, null class


def test_presets_and_swiglu_rule():
  assert generator.swiglu_hidden(1280, 256) == 3584  # [LARP]'s L
  assert generator.swiglu_hidden(256, 16) == 688
  sizes = {s: generator.generator_config(s) for s in generator.GENERATOR_PRESETS}
  got = {s: (c.width, c.depth, c.num_heads, c.mlp_dim) for s, c in sizes.items()}
  assert got == {"tiny": (32, 2, 2, 64), "small": (256, 6, 4, 688), "L": (1280, 30, 20, 3584)}
  assert sizes["L"].scan and sizes["L"].remat and sizes["L"].dtype == "bfloat16"
  with pytest.raises(ValueError, match="Unknown generator size"):
    generator.generator_config("XL")


def test_shapes_causality_and_length_check():
  params = _variables()["params"]
  tokens = _tokens()
  logits = _full(params, tokens)
  assert logits.shape == (B, 10, VOCAB.size) and logits.dtype == jnp.float32
  # Changing the last token changes only the last position's logits.
  logits2 = _full(params, tokens.at[:, -1].set((tokens[:, -1] + 1) % VOCAB.size))
  np.testing.assert_allclose(logits[:, :-1], logits2[:, :-1], atol=1e-6)
  assert float(jnp.abs(logits[:, -1] - logits2[:, -1]).max()) > 1e-4
  with pytest.raises(ValueError, match="exceeds max_length"):
    jax.eval_shape(lambda: MODEL.init(jax.random.key(0), jnp.zeros((1, MAX_LEN + 1), jnp.int32)))


def test_prefill_and_decoding_with_the_cache_match_the_full_forward():
  params = _variables()["params"]
  tokens = _tokens()
  full = _full(params, tokens)
  cache = generator.init_cache(MODEL, B, MAX_LEN)
  assert cache["block_0"]["attn"]["cached_key"].shape == (B, 2, MAX_LEN, 16)
  assert int(cache["position"]) == 0
  prefill, cache = _decode(params, cache, tokens[:, :6])
  # (c) prefill logits through the cache equal the full forward pass.
  np.testing.assert_allclose(prefill, full[:, :6], atol=1e-5)
  assert int(cache["position"]) == 6 and int(cache["block_1"]["attn"]["cache_index"]) == 6
  # Then one token at a time: absolute positions and the cache keep it exact.
  for t in range(6, 10):
    step, cache = _decode(params, cache, tokens[:, t : t + 1])
    np.testing.assert_allclose(step[:, 0], full[:, t], atol=1e-5)
  assert int(cache["position"]) == 10


def test_decode_uses_absolute_positions():
  # The same token fed at position 0 (fresh cache) and after a prefill
  # must see different position embeddings, hence different logits.
  params = _variables()["params"]
  tokens = _tokens()
  cache = generator.init_cache(MODEL, B, MAX_LEN)
  _, cache = _decode(params, cache, tokens[:, :1])
  fresh, _ = _decode(params, generator.init_cache(MODEL, B, MAX_LEN), tokens[:, 1:2])
  after, _ = _decode(params, cache, tokens[:, 1:2])
  np.testing.assert_allclose(after[:, 0], _full(params, tokens[:, :2])[:, 1], atol=1e-5)
  assert float(jnp.abs(after - fresh).max()) > 1e-4


def test_scan_remat_generator_decodes_like_its_full_forward():
  model = _model(scan=True, remat=True)
  variables = _variables(model)
  params = variables["params"]
  assert params["blocks"]["attn"]["query"]["kernel"].names == ("layers", "embed", "heads", "kv")
  params = nn.unbox(params)
  tokens = _tokens(length=8)
  full = _full(params, tokens, model=model)
  cache = generator.init_cache(model, B, 8)
  assert cache["blocks"]["attn"]["cached_key"].shape == (2, B, 2, 8, 16)
  prefill, cache = _decode(params, cache, tokens[:, :7], model=model)
  step, cache = _decode(params, cache, tokens[:, 7:], model=model)
  np.testing.assert_allclose(jnp.concatenate([prefill, step], 1), full, atol=1e-5)
  # Unrolled and scanned stacks compute the same function from the same weights.
  unrolled = nn.unbox(_variables()["params"])
  stacked = dict(unrolled)
  blocks = [stacked.pop(f"block_{i}") for i in range(2)]
  stacked["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
  np.testing.assert_allclose(
    _full(stacked, tokens, model=model), _full(unrolled, tokens), atol=1e-5
  )


def test_init_cache_rejects_a_cache_longer_than_the_position_table():
  with pytest.raises(ValueError, match="max_length"):
    generator.init_cache(MODEL, 1, MAX_LEN + 1)


def test_parameter_axes_and_no_biases():
  params = _variables()["params"]
  # (g) embedding and head are split over the vocabulary, like the codebook.
  assert params["embedding"].names == ("vocab", "embed")
  assert params["head"]["kernel"].names == ("embed", "vocab")
  assert sharding.logical_spec(params["embedding"].names) == jax.sharding.PartitionSpec(
    "model", "fsdp"
  )
  assert sharding.logical_spec(params["head"]["kernel"].names)[1] == "model"
  attn, mlp = params["block_0"]["attn"], params["block_0"]["mlp"]
  assert attn["query"]["kernel"].names == ("embed", "heads", "kv")
  assert attn["out"]["kernel"].names == ("heads", "kv", "embed")
  assert mlp["gate"]["kernel"].names == ("embed", "mlp")
  assert mlp["down"]["kernel"].names == ("mlp", "embed")
  assert params["pos_embed"].names == ("length", "embed")
  assert params["norm"]["scale"].names == ("embed",)
  leaf_names = {path[-1].key for path, _ in jax.tree_util.tree_leaves_with_path(nn.unbox(params))}
  assert leaf_names == {"embedding", "pos_embed", "kernel", "scale"}  # no biases


def test_dtypes_and_restricted_head():
  model = _model(dtype="bfloat16", predict_conditions=False)
  assert model.num_outputs == VOCAB.sep + 1
  tokens = _tokens()
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens))
  logits = jax.eval_shape(lambda v: model.apply(v, tokens), variables)
  assert logits.shape == (B, 10, VOCAB.sep + 1) and logits.dtype == jnp.float32
  cache = jax.eval_shape(lambda: generator.init_cache(model, B, MAX_LEN))
  assert cache["block_0"]["attn"]["cached_key"].dtype == jnp.bfloat16
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nn.unbox(variables["params"])))


def test_L_preset_parameter_count():
  # (f) [paper]: 632.0M / 632.4M. The module docstring explains the layouts.
  vocab = generator.Vocab(8192, 309)  # 8192 codes + SEP + 309 classes + null
  c = generator.generator_config("L")
  count = generator.count_params(generator.build_generator(c, vocab, 1 + 1024 + 128))
  assert count == 632_806_400
  assert abs(count - 632.0e6) / 632.0e6 < 0.005
  # Head over codes + SEP only: the paper's figures to the printed 0.1M.
  c.predict_conditions = False
  cjavg = generator.count_params(generator.build_generator(c, vocab, 1153))
  a2v = generator.count_params(generator.build_generator(c, generator.Vocab(8192), 1153))
  assert (round(cjavg / 1e5), round(a2v / 1e5)) == (6324, 6320)
