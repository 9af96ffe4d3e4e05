"""qdot_general / qeinsum / qconv: each lowering against a float reference; serve == fake."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import jaxquant as jq
from jaxquant import ops


@pytest.fixture(autouse=True)
def _xla_lowerings():
  """These tests pin XLA's own lowerings; the compiled kernels are tested in test_cpu_kernels."""
  with ops.lowering_scope(kernels=False):
    yield


DENSE = (((2,), (0,)), ((), ()))


@pytest.fixture(scope="module")
def xw():
  x = jax.random.normal(jax.random.key(0), (4, 7, 64))
  w = jax.random.normal(jax.random.key(1), (64, 32)) * 0.1
  return x, w


def _rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize(
  "w_spec, a_spec, lowering, tol",
  [
    ("int8", "int8:token", "int8", 0.012),
    ("int8", "int8:tensor", "int8", 0.02),
    ("int8", None, "dequant", 0.008),
    ("int8:asym", "int8:token", "dequant", 0.012),
    ("int4:g16", None, "dequant", 0.1),
    ("int4:g16:asym", "int8:token", "dequant", 0.1),
    ("nf4:g16", None, "dequant", 0.1),
    ("fp8_e4m3", None, "dequant", 0.05),
  ],
)
def test_each_lowering_matches_float_and_fake_mode(xw, w_spec, a_spec, lowering, tol):
  x, w = xw
  q = jq.quantize(w, w_spec)
  assert ops.explain(x, q, DENSE, a_spec).name == lowering
  serve = jax.jit(lambda x, q: ops.qdot_general(x, q, DENSE, lhs_spec=a_spec))(x, q)
  fake = ops.qdot_general(x, w, DENSE, lhs_spec=a_spec, rhs_spec=w_spec, mode="fake")
  assert _rel(serve, jnp.einsum("btd,dk->btk", x, w)) < tol
  np.testing.assert_allclose(np.asarray(serve), np.asarray(fake), rtol=1e-5, atol=1e-5)


def test_int8_path_is_integer_in_the_stablehlo(xw):
  x, w = xw
  text = (
    jax.jit(lambda x, q: ops.qdot_general(x, q, DENSE, lhs_spec="int8:token"))
    .lower(x, jq.quantize(w, "int8"))
    .as_text()
  )
  dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
  assert len(dots) == 1
  assert "tensor<4x7x64xi8>, tensor<64x32xi8>) -> tensor<4x7x32xi32>" in dots[0]


def test_weight_only_int4_unpacks_in_the_graph(xw):
  x, w = xw
  text = (
    jax.jit(lambda x, q: ops.qdot_general(x, q, DENSE))
    .lower(x, jq.quantize(w, "int4:g16"))
    .as_text()
  )
  assert "tensor<64x16xui8>" in text  # packed codes enter the computation
  assert "f32>) -> tensor<4x7x32xf32>" in text


def test_static_activation_scale_is_used(xw):
  x, w = xw
  q = jq.quantize(w, "int8")
  static = jnp.full((), 0.5 / 127)  # clips everything beyond ±0.5
  out = ops.qdot_general(x, q, DENSE, lhs_spec="int8:tensor", lhs_scale=static)
  ref = jnp.einsum("btd,dk->btk", jnp.clip(x, -0.5, 0.5), jq.dequantize(q))
  assert _rel(out, ref) < 0.01


def test_gradients_flow_in_fake_mode(xw):
  x, w = xw
  g = jax.grad(
    lambda w: ops.qdot_general(
      x, w, DENSE, lhs_spec="int8:token", rhs_spec="int4:g16", mode="fake"
    ).sum()
  )(w)
  assert g.shape == w.shape and float(jnp.abs(g).sum()) > 0


@pytest.mark.parametrize(
  "eq, lshape, rshape",
  [
    ("btd,dk->btk", (2, 5, 16), (16, 8)),
    ("btd,dhk->bthk", (2, 5, 16), (16, 4, 8)),
    ("bthk,hkd->btd", (2, 5, 4, 8), (4, 8, 16)),
    ("...d,dk->...k", (3, 2, 16), (16, 8)),
    ("bd,kd->bk", (6, 16), (8, 16)),
  ],
)
def test_qeinsum_matches_jnp_einsum(eq, lshape, rshape):
  a = jax.random.normal(jax.random.key(2), lshape)
  b = jax.random.normal(jax.random.key(3), rshape)
  np.testing.assert_allclose(
    np.asarray(ops.qeinsum(eq, a, b)), np.asarray(jnp.einsum(eq, a, b)), rtol=1e-5, atol=1e-5
  )
  axis = (
    eq.split("->")[0]
    .split(",")[1]
    .index(next(c for c in eq.split(",")[1].split("->")[0] if c in eq.split("->")[1]))
  )
  q = jq.quantize(b, jq.QuantSpec("int8", axis=axis))
  out = ops.qeinsum(eq, a, q, lhs_spec="int8:token")
  assert _rel(out, jnp.einsum(eq, a, b)) < 0.02


@pytest.mark.parametrize("a_spec, lowering", [("int8:tensor", "int8"), (None, "dequant")])
def test_qconv_int8_and_dequant(a_spec, lowering):
  img = jax.random.normal(jax.random.key(4), (2, 9, 9, 8))
  k = jax.random.normal(jax.random.key(5), (3, 3, 8, 16))
  dn = ("NHWC", "HWIO", "NHWC")
  ref = jax.lax.conv_general_dilated(img, k, (1, 1), "SAME", dimension_numbers=dn)
  q = jq.quantize(k, "int8")
  serve = jax.jit(
    lambda a, q: ops.qconv(a, q, (1, 1), "SAME", dimension_numbers=dn, lhs_spec=a_spec)
  )
  out = serve(img, q)
  assert _rel(out, ref) < 0.02
  fake = ops.qconv(
    img, k, (1, 1), "SAME", dimension_numbers=dn, lhs_spec=a_spec, rhs_spec="int8", mode="fake"
  )
  np.testing.assert_allclose(np.asarray(out), np.asarray(fake), rtol=1e-5, atol=1e-5)
  text = serve.lower(img, q).as_text()
  assert ("xi8>) -> tensor<2x9x9x16xi32>" in text) == (lowering == "int8")


def test_serve_function_exports_for_cpu_cuda_tpu(xw):
  x, w = xw
  q = jq.quantize(w, "int8")
  fn = jax.jit(lambda x, q: ops.qdot_general(x, q, DENSE, lhs_spec="int8:token"))
  exp = export.export(fn, platforms=("cpu", "cuda", "tpu"))(x, q)
  assert "i32" in exp.mlir_module()
  restored = export.deserialize(exp.serialize())
  np.testing.assert_array_equal(np.asarray(restored.call(x, q)), np.asarray(fn(x, q)))


def test_bad_activation_granularity_is_an_error(xw):
  x, w = xw
  with pytest.raises(ValueError, match="'token'"):
    ops.qdot_general(x, jq.quantize(w, "int8"), DENSE, lhs_spec="int8:g16")
