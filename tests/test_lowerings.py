"""Serve lowerings (int8 with row padding and layouts, w4a8, dequant) against NumPy; chooser."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import export

import jaxquant as jq
from jaxquant import ops
from tests.reference import ref_quantize


@pytest.fixture(autouse=True)
def _xla_lowerings():
  """These tests pin XLA's own lowerings; the compiled kernels are tested in test_cpu_kernels."""
  with ops.lowering_scope(kernels=False):
    yield


DENSE = (((1,), (0,)), ((), ()))


def _ref(x, q, dynamic: bool) -> np.ndarray:
  """float64 reference: (per-token int8 activations if `dynamic`) · dequantized weights."""
  x = np.asarray(x, np.float32)
  if dynamic:
    scale = ref_quantize(x, "int8", "token", axis=-1)[1]
    # Under jit XLA computes x / s as x · (1/s); at an exact tie the two round differently.
    x = np.clip(np.round(x * (np.float32(1) / scale)), -127, 127) * scale
  return x.astype(np.float64) @ np.asarray(jq.dequantize(q, jnp.float32), np.float64)


def _serve(x, q, lowering):
  return np.asarray(jax.jit(lambda x, q: ops.qdot_general(x, q, DENSE, lowering=lowering))(x, q))


@settings(max_examples=4, deadline=None)
@given(
  m=st.integers(1, 5),
  n=st.integers(1, 9),
  groups=st.integers(1, 3),
  spec=st.sampled_from(
    [
      "int4:g16",
      "int4:g16:asym",
      "uint4:g16",
      "int4",
      "int8",
      "int4:g16:asym:scale=f16",
      "int8:scale=bf16",
    ]
  ),
  minor=st.booleans(),
  seed=st.integers(0, 2**16),
)
def test_every_lowering_matches_numpy(m, n, groups, spec, minor, seed):
  k = 16 * groups
  kx, kw = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (m, k))
  q = jq.quantize(jax.random.normal(kw, (k, n)), spec)
  if minor:
    q = ops.serving_layout(q)
  np.testing.assert_allclose(
    np.asarray(jq.dequantize(q)),
    np.asarray(jq.dequantize(jq.quantize(jax.random.normal(kw, (k, n)), spec))),
  )
  integer = "int8" if spec.startswith("int8") else "w4a8"
  for lowering, dynamic in ((integer, True), ("dequant", False)):
    out, ref = _serve(x, q, lowering), _ref(x, q, dynamic)
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5 * (1 + np.abs(ref).max()))


@pytest.mark.parametrize("minor", [False, True])
def test_w8a8_batched_tokens_and_einsum(minor):
  x = jax.random.normal(jax.random.key(0), (2, 3, 32))
  q = jq.quantize(jax.random.normal(jax.random.key(1), (32, 8)), "int8")
  q = ops.serving_layout(q) if minor else q
  dims = (((2,), (0,)), ((), ()))
  out = ops.qdot_general(x, q, dims, lhs_spec="int8:token")
  ref = _ref(x.reshape(6, 32), q, True).reshape(2, 3, 8)
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)
  q4 = jq.quantize(jax.random.normal(jax.random.key(1), (32, 8)), "int4:g16")
  q4 = ops.serving_layout(q4) if minor else q4
  out = ops.qeinsum("btd,dk->btk", x, q4, lowering="w4a8")
  np.testing.assert_allclose(
    np.asarray(out), _ref(x.reshape(6, 32), q4, True).reshape(2, 3, 8), rtol=1e-5, atol=1e-5
  )


def test_chooser_decisions():
  w = jax.random.normal(jax.random.key(0), (4096, 64))
  q8, q4 = jq.quantize(w, "int8"), jq.quantize(w, "int4:g128")
  row = lambda m: jax.ShapeDtypeStruct((m, 4096), jnp.float32)
  one = ops.explain(row(1), q8, DENSE, "int8:token", backend="cpu")
  assert (one.name, one.pad_rows) == ("int8", 1) and "contraction-major" in one.reason
  assert ops.explain(row(16), q8, DENSE, "int8:token", backend="cpu").pad_rows == 0
  assert ops.explain(row(1), q8, DENSE, "int8:token", backend="tpu").pad_rows == 0
  assert (
    "contraction-minor" in ops.explain(row(1), ops.serving_layout(q8), DENSE, "int8:token").reason
  )
  # weight-only stays dequantized unless dynamic int8 activations are allowed
  assert ops.explain(row(1), q8).name == "dequant"
  assert ops.explain(row(1), q4).name == "dequant"
  with ops.lowering_scope(dynamic_int8=True):
    assert ops.explain(row(1), q8).name == "int8"
    assert "dynamic" in ops.explain(row(1), q8).activations
    assert ops.explain(row(1), q4, backend="cpu").name == "w4a8"
    assert ops.explain(row(16), q4, backend="cpu").name == "w4a8"  # 16 x 32 groups = 512 rows
    assert ops.explain(row(256), q4, backend="cpu").name == "dequant"
    assert ops.explain(row(1), q4, backend="gpu").name == "dequant"
  with ops.lowering_scope("w4a8"):
    assert ops.explain(row(256), q4).name == "w4a8"
  assert ops.explain(row(1), q8, lowering="dequant").name == "dequant"
  with pytest.raises(ValueError, match="w4a8"):
    ops.explain(row(1), q8, lowering="w4a8")
  with pytest.raises(ValueError, match="lowering"), ops.lowering_scope("int3"):
    pass


def _dots(text: str) -> list[str]:
  return [line for line in text.splitlines() if "stablehlo.dot_general" in line]


@pytest.mark.parametrize(
  "spec, lowering", [("int8", "int8"), ("int4:g16", "w4a8"), ("int4:g16:asym", "w4a8")]
)
def test_integer_lowerings_are_i8_dots_in_the_stablehlo(spec, lowering):
  x = jax.random.normal(jax.random.key(0), (1, 64))
  q = ops.serving_layout(jq.quantize(jax.random.normal(jax.random.key(1), (64, 32)), spec))
  text = (
    jax.jit(lambda x, q: ops.qdot_general(x, q, DENSE, lowering=lowering)).lower(x, q).as_text()
  )
  dots = _dots(text)
  int_dots = [d for d in dots if "xi8>, tensor<32x" in d and "xi32>" in d]
  assert int_dots, dots
  assert not any("tensor<64x32xf32>" in d or "tensor<32x64xf32>" in d for d in dots)  # no float W
  if lowering == "int8":  # one row padded to two, codes stored [out, in]
    assert "tensor<2x64xi8>, tensor<32x64xi8>) -> tensor<2x32xi32>" in dots[0]


@pytest.mark.parametrize(
  "spec, lowering, minor",
  [("int8", "int8", True), ("int4:g16", "w4a8", False), ("int4:g16", "dequant", True)],
)
def test_each_lowering_exports_for_cpu_cuda_tpu(spec, lowering, minor):
  x = jax.random.normal(jax.random.key(0), (1, 64))
  q = jq.quantize(jax.random.normal(jax.random.key(1), (64, 32)), spec)
  q = ops.serving_layout(q) if minor else q
  fn = jax.jit(lambda x, q: ops.qdot_general(x, q, DENSE, lowering=lowering))
  exp = export.export(fn, platforms=("cpu", "cuda", "tpu"))(x, q)
  restored = export.deserialize(exp.serialize())
  np.testing.assert_array_equal(np.asarray(restored.call(x, q)), np.asarray(fn(x, q)))


def test_serving_layout_round_trips_through_a_checkpoint(tmp_path):
  w = jax.random.normal(jax.random.key(2), (64, 48))
  tree = {"a": {"kernel": jq.quantize(w, "int4:g32")}, "b": jq.quantize(w, "int8"), "c": w}
  served = ops.serving_layout(tree)
  assert served["a"]["kernel"].perm == (1, 0) and served["a"]["kernel"].values.shape == (48, 32)
  assert served["c"] is w
  loaded = jq.load(jq.save(tmp_path / "m.safetensors", served))
  assert loaded["b"].perm == (1, 0)
  for k in ("b",):
    np.testing.assert_array_equal(
      np.asarray(jq.dequantize(loaded[k])), np.asarray(jq.dequantize(tree[k]))
    )
  np.testing.assert_array_equal(
    np.asarray(jq.dequantize(loaded["a"]["kernel"])), np.asarray(jq.dequantize(tree["a"]["kernel"]))
  )
