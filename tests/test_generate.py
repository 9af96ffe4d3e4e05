"""Cached decoding of the byte-level decoder: float and INT8 KV caches, generation, serving."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant import flax as jqf
from jaxquant.apps.models.decoder import (
  Decoder,
  DecoderConfig,
  cache_bytes,
  init_cache,
  make_generate,
)
from jaxquant.ops import serving_layout

CFG = DecoderConfig(dim=64, layers=2, heads=2, mlp=128)
EMBED = jq.Rule("embed", None, expect_match=False)
W8A8 = [EMBED, jq.Rule(".*", weight="int8", act="int8:token")]
W4 = [EMBED, jq.Rule(".*", weight="int4:g64")]


@pytest.fixture(scope="module")
def setup():
  model = Decoder(CFG)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16)), jnp.int32)
  params = model.init(jax.random.key(0), tokens)["params"]
  return model, params, tokens


def _decode_all(apply, variables, tokens, kind: str, prefill: int) -> jax.Array:
  """Logits ``[B, T, vocab]``: prefill ``tokens[:, :prefill]``, then one token per call."""
  cache = init_cache(CFG, tokens.shape[0], tokens.shape[1], kind)
  step = jax.jit(lambda v, t, c, p: apply(v, t, cache=c, pos=p))
  logits, cache = step(variables, tokens[:, :prefill], cache, 0)
  out = [logits]
  for i in range(prefill, tokens.shape[1]):
    logits, cache = step(variables, tokens[:, i : i + 1], cache, i)
    out.append(logits)
  return jnp.concatenate(out, axis=1)


@pytest.mark.parametrize("prefill", [1, 7, 16])
def test_float_cache_logits_equal_full_forward_at_every_position(setup, prefill):
  model, params, tokens = setup
  ref = model.apply({"params": params}, tokens)
  got = _decode_all(model.apply, {"params": params}, tokens, "float32", prefill)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5, rtol=1e-5)


def test_int8_cache_logits_close_to_float(setup):
  model, params, tokens = setup
  ref = model.apply({"params": params}, tokens)
  got = _decode_all(model.apply, {"params": params}, tokens, "int8", 4)
  err = float(jnp.max(jnp.abs(got - ref)))
  # per-head, per-token absmax int8 keys/values: ≤ 2% of the largest logit here
  assert err <= 0.02 * float(jnp.max(jnp.abs(ref))), err
  agree = float(jnp.mean(jnp.argmax(got, -1) == jnp.argmax(ref, -1)))
  assert agree >= 0.9, agree


def test_training_forward_and_params_unchanged(setup):
  model, params, tokens = setup
  shapes = jax.tree.map(jnp.shape, model.init(jax.random.key(1), tokens)["params"])
  assert set(shapes) == {"embed", "final_norm", "head", "layers_0", "layers_1"}
  assert set(shapes["layers_0"]["attn"]) == {"query", "key", "value", "out"}
  assert model.apply({"params": params}, tokens).shape == (2, 16, 256)


def test_greedy_generation_equals_argmax_with_full_forward_each_step(setup):
  model, params, tokens = setup
  prompt, steps = tokens[:, :5], 10
  got = make_generate(model, steps)({"params": params}, prompt)
  # the full forward re-run over the whole sequence each step (zero-padded to one length:
  # the model is causal, so the padding never reaches the position read)
  forward = jax.jit(lambda t: model.apply({"params": params}, t))
  seq = jnp.zeros((2, 5 + steps), jnp.int32).at[:, :5].set(prompt)
  for i in range(5, 5 + steps):
    seq = seq.at[:, i].set(jnp.argmax(forward(seq)[:, i - 1], axis=-1).astype(jnp.int32))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(seq[:, 5:]))


def test_temperature_sampling_is_keyed(setup):
  model, params, tokens = setup
  gen = make_generate(model, 12, cache="int8", temperature=1.0)
  a = gen({"params": params}, tokens[:, :3], jax.random.key(1))
  b = gen({"params": params}, tokens[:, :3], jax.random.key(1))
  c = gen({"params": params}, tokens[:, :3], jax.random.key(2))
  assert a.shape == (2, 12) and a.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_int8_cache_is_a_quarter_of_float32_plus_scales():
  f32 = cache_bytes(init_cache(CFG, 2, 40, "float32"))
  i8 = cache_bytes(init_cache(CFG, 2, 40, "int8"))
  scales = 2 * CFG.layers * 2 * 40 * CFG.heads * 4  # k and v, one float32 per head and token
  assert i8 == f32 // 4 + scales
  assert i8 / f32 == pytest.approx(0.25 + 1 / CFG.head_dim)


@pytest.mark.parametrize("rules", [W8A8, W4], ids=["w8a8", "w4g64"])
def test_generation_runs_under_quantize_model_serve(setup, rules):
  model, params, tokens = setup
  serve = jqf.quantize_model(model, rules, "serve")
  variables = {"params": serving_layout(jq.quantize_params(params, rules))}
  ref = serve.apply(variables, tokens)
  got = _decode_all(serve.apply, variables, tokens, "float32", 6)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-4, rtol=1e-4)
  out = make_generate(serve, 6, cache="int8")(variables, tokens[:, :4])
  assert out.shape == (2, 6) and int(out.min()) >= 0 and int(out.max()) < 256
  step = lambda v, t: serve.apply(v, t, cache=init_cache(CFG, 2, 8, "int8"), pos=3)
  text = jax.jit(step).lower(variables, tokens[:, :1]).as_text()
  int8_dots = [ln for ln in text.splitlines() if "dot_general" in ln and "i32>" in ln]
  assert bool(int8_dots) == (rules is W8A8)


def test_cached_call_without_pos_is_a_clear_error(setup):
  model, params, tokens = setup
  with pytest.raises(ValueError, match="needs pos"):
    model.apply({"params": params}, tokens, cache=init_cache(CFG, 2, 16))
  with pytest.raises(ValueError, match="cache kind"):
    init_cache(CFG, 1, 4, "int4")
