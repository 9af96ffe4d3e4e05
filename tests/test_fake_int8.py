"""Fake W8A8 on the integer path: forward and straight-through gradients against NumPy."""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxquant as jq
from jaxquant.numerics import fake_quant, fake_quant_along
from jaxquant.ops import explain, qdot_general, ste_backward

DENSE = (((1,), (0,)), ((), ()))


def np_fake_int8(x: np.ndarray, axis: int) -> np.ndarray:
  """Symmetric absmax int8 quantize-dequantize, one scale per slice along `axis`."""
  amax = np.max(np.abs(x), axis=axis, keepdims=True).astype(np.float32)
  scale = np.where(amax > 0, amax / np.float32(127), np.float32(1))
  return np.clip(np.round(x / scale), -127, 127) * scale


def fake_w8a8(x, w, dims=DENSE):
  return qdot_general(x, w, dims, lhs_spec="int8:token", rhs_spec="int8", mode="fake")


finite = st.floats(-8, 8, width=32)


def _out_and_grads(backward):
  @jax.jit
  def run(x, w, cot):
    with ste_backward(backward):
      out, vjp = jax.vjp(fake_w8a8, x, w)
    return (out, *vjp(cot))

  return run


RUNS = {"float": _out_and_grads("float"), "quantized": _out_and_grads("quantized")}


@settings(max_examples=10, deadline=None)
@given(
  x=hnp.arrays(np.float32, (4, 24), elements=finite),
  seed=st.integers(0, 2**16),
  backward=st.sampled_from(["float", "quantized"]),
)
def test_forward_and_gradients_match_numpy_reference(x, seed, backward):
  rng = np.random.default_rng(seed)
  w = (rng.normal(size=(24, 8)) * rng.choice([1e-3, 1, 100], size=(1, 8))).astype(np.float32)
  cot = rng.normal(size=(4, 8)).astype(np.float32)
  fq_x, fq_w = np_fake_int8(x, 1), np_fake_int8(w, 0)
  out, gx, gw = RUNS[backward](x, w, cot)
  tol = 1e-5 * (1 + np.abs(fq_x).sum(1, keepdims=True) * np.abs(fq_w).max(0, keepdims=True))
  assert np.all(np.abs(np.asarray(out) - fq_x @ fq_w) <= tol)
  # absmax scales never clip: the gradient is the float one, of the chosen operands
  bx, bw = (x, w) if backward == "float" else (fq_x, fq_w)
  np.testing.assert_allclose(gx, cot @ bw.T, rtol=1e-4, atol=1e-4 * np.abs(bw).max())
  np.testing.assert_allclose(gw, bx.T @ cot, rtol=1e-4, atol=1e-4 * (1 + np.abs(bx).max()))


def test_quantized_backward_equals_the_float_fake_quant_gradient():
  x = jax.random.normal(jax.random.key(4), (6, 32))
  w = jax.random.normal(jax.random.key(5), (32, 16))
  ref = lambda a, b: fake_quant_along(a, "int8:token", (1,)) @ fake_quant(b, "int8")
  loss = lambda f: lambda a, b: jnp.sum(jnp.sin(f(a, b)))
  with ste_backward("quantized"):
    got = jax.grad(loss(fake_w8a8), (0, 1))(x, w)
  want = jax.grad(loss(ref), (0, 1))(x, w)
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="ste_backward"), ste_backward("exact"):
    pass


def test_chooses_integer_path_only_where_the_identity_holds():
  x, w = jnp.ones((4, 16)), jnp.ones((16, 8))
  assert explain(x, w, DENSE, "int8:token", "fake", "int8").name == "int8-ste"
  assert explain(x, w, DENSE, "int8:tensor", "fake", "int8").name == "int8-ste"
  for lhs, rhs in [
    ("int8:token", "int4:g8"),
    ("int8:token:asym", "int8"),
    ("int8:token", "int8:g8"),
    (None, "int8"),
    ("int8:token:p99", "int8"),
    ("int8:token", "int8:channel@0"),
  ]:
    assert explain(x, w, DENSE, lhs, "fake", rhs).name == "float", (lhs, rhs)


def test_forward_lowers_to_int8_dot_and_backward_to_bf16():
  x, w = jnp.ones((4, 32), jnp.bfloat16), jnp.ones((32, 8), jnp.bfloat16)
  hlo = jax.jit(fake_w8a8).lower(x, w).as_text()
  assert "tensor<4x32xi8>" in hlo and "tensor<32x8xi8>" in hlo and "-> tensor<4x8xi32>" in hlo
  grad = jax.grad(lambda a, b: jnp.sum(fake_w8a8(a, b).astype(jnp.float32)), (0, 1))
  jaxpr = str(jax.make_jaxpr(grad)(x, w))
  assert "preferred_element_type=int32" in jaxpr
  assert "bf16[4,32]" in jaxpr and "bf16[32,8]" in jaxpr
  gx, gw = grad(x, w)
  assert gx.dtype == gw.dtype == jnp.bfloat16


def test_static_scale_clips_and_masks_the_gradient():
  x = jnp.asarray([[0.5, -3.0, 1.0, 10.0]])
  w = jnp.eye(4)
  scale = jnp.full((1, 1), 2.0 / 127)  # range ±2: the -3 and 10 entries clip
  f = lambda a: qdot_general(
    a, w, DENSE, lhs_spec="int8:tensor", rhs_spec="int8", lhs_scale=scale, mode="fake"
  )
  ref = fake_quant_along(x, "int8:tensor", (0, 1), scale=scale) @ fake_quant(w, "int8")
  np.testing.assert_allclose(f(x), ref, atol=1e-6)
  np.testing.assert_allclose(jax.grad(lambda a: f(a).sum())(x), [[1, 0, 1, 0]])


def test_fake_matches_serve_on_a_dense_layer():
  import flax.linen as nn

  from jaxquant import flax as jqf

  model = nn.Dense(16)
  x = jax.random.normal(jax.random.key(0), (8, 32))
  params = model.init(jax.random.key(1), x)["params"]
  rules = [jq.Rule(".*", weight="int8", act="int8:token")]
  fake = jqf.quantize_model(model, rules, "fake").apply({"params": params}, x)
  serve = jqf.quantize_model(model, rules, "serve").apply(
    {"params": jq.quantize_params(params, rules)}, x
  )
  np.testing.assert_allclose(fake, serve, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 3, 16)])
def test_batched_tokens(shape):
  x = jax.random.normal(jax.random.key(2), shape)
  w = jax.random.normal(jax.random.key(3), (16, 4))
  dims = (((2,), (0,)), ((), ()))
  out = fake_w8a8(x, w, dims)
  ref = np_fake_int8(np.asarray(x), 2) @ np_fake_int8(np.asarray(w), 0)
  np.testing.assert_allclose(out, ref, atol=1e-4)
