"""Pallas kernels (GPU Triton, TPU Mosaic) in interpret mode against NumPy, and their lowering
and export for cuda and tpu from a CPU-only machine."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.triton import pallas_call_registration as registration

from jaxquant.numerics import quantize_along
from jaxquant.ops import explain, qdot_general
from jaxquant.ops.pallas_gpu import EXPORT_CHECKS, gpu_reason, weight_only_matmul
from jaxquant.ops.pallas_kernels import pallas_matmul, pallas_reason, portable_matmul
from jaxquant.ops.pallas_tpu import PER_TOKEN_INT8, tpu_matmul, w8a8_matmul
from jaxquant.qarray import QArray, codes, dequantize
from jaxquant.spec import QuantSpec

EPS32 = float(np.finfo(np.float32).eps)


def _spec(text: str) -> QuantSpec:
  return QuantSpec.parse(text)


def _pack(c: np.ndarray) -> np.ndarray:
  """Two 4-bit codes a byte along the last axis, element 2i in the low nibble."""
  nib = c.astype(np.int64) & 0xF
  return (nib[..., 0::2] | (nib[..., 1::2] << 4)).astype(np.uint8)


def _from_numpy(c, scale, zero, spec: QuantSpec, minor: bool = False) -> QArray:
  """A [K, N] QArray from NumPy codes ``c`` (stored ``[N, K]`` when `minor`)."""
  stored = c.T if minor else c
  packed = spec.info.packed
  values = _pack(stored) if packed else stored.astype(spec.info.storage)
  return QArray(
    jnp.asarray(values),
    jnp.asarray(scale),
    None if zero is None else jnp.asarray(zero),
    spec,
    np.float32,
    packed,
    0,
    (1, 0) if minor else None,
  )


def _weights(text: str, k: int, n: int, minor: bool = False, seed: int = 0) -> QArray:
  """Random weights rounded to `text`'s grid in NumPy (absmax, or min-max with zero points)."""
  spec = _spec(text)
  w = np.random.default_rng(seed).standard_normal((k, n))
  g = spec.group_size if spec.granularity == "group" else k
  view = w.reshape(k // g, g, n)
  lo, hi = spec.int_range
  if spec.symmetric:
    scale = np.abs(view).max(axis=1, keepdims=True) / hi
    zero = None
  else:
    wmin, wmax = view.min(axis=1, keepdims=True), view.max(axis=1, keepdims=True)
    scale = (wmax - wmin) / (hi - lo)
    zero = np.clip(np.round(lo - wmin / scale), lo, hi)
  c = np.clip(np.round(view / scale) + (0 if zero is None else zero), lo, hi).reshape(k, n)
  shape = (k // g, 1, n) if spec.granularity == "group" else (1, n)
  zero = None if zero is None else zero.reshape(shape).astype(spec.info.storage)
  return _from_numpy(c, scale.reshape(shape).astype(np.float32), zero, spec, minor)


def _grid(q: QArray, a) -> np.ndarray:
  """Scale or zero point of a [K, N] QArray as [K, N] (repeated over each group)."""
  k, n = q.shape
  if a is None:
    return np.zeros((k, n))
  a = np.asarray(a, np.float64).reshape(-1, n)
  return np.broadcast_to(np.repeat(a, k // a.shape[0], axis=0), (k, n))


def _codes(q: QArray) -> np.ndarray:
  """The [K, N] codes of `q`, unpacked in NumPy."""
  v = np.asarray(q.values)
  if q.packed:
    v = v.astype(np.int64)
    low, high = v & 0xF, v >> 4
    v = np.stack([low, high], axis=-1).reshape(v.shape[:-1] + (-1,))
    if q.spec.info.signed:
      v = np.where(v >= 8, v - 16, v)
  v = v.astype(np.int64)
  return v.T if q.perm else v


def _check_float(y, x, q: QArray):
  """`y` equals ``x @ dequantize(q)`` (float64) up to float32 summation order: within
  ``2 K ε`` of the sum of the magnitudes ``Σ |x| (|q| + |z|) s``."""
  c = _codes(q).astype(np.float64)
  s, z = _grid(q, q.scale), _grid(q, q.zero_point)
  x64 = np.asarray(x, np.float64).reshape(-1, q.shape[0])
  ref = x64 @ ((c - z) * s)
  bound = 2 * q.shape[0] * EPS32 * (np.abs(x64) @ ((np.abs(c) + np.abs(z)) * s)) + 1e-30
  err = np.abs(np.asarray(y, np.float64).reshape(ref.shape) - ref)
  assert np.all(err <= bound), float((err / bound).max())


def test_numpy_weights_are_jaxquant_qarrays():
  """The NumPy-built test weights read back through jaxquant as the tests read them."""
  q = _weights("uint4:g64:asym", 128, 64, minor=True)
  np.testing.assert_array_equal(np.asarray(codes(q)), _codes(q))
  want = (_codes(q) - _grid(q, q.zero_point)) * _grid(q, q.scale)
  np.testing.assert_allclose(np.asarray(dequantize(q, jnp.float32)), want, rtol=1e-6)


GPU_CASES = [  # spec, M, K, N, minor
  ("int8", 1, 128, 64, False),
  ("int4:g32", 5, 128, 192, False),
  ("int4:g128", 16, 256, 64, True),
  ("uint4:g64:asym", 1, 256, 192, False),
  ("uint8:asym", 16, 128, 64, True),
]


@pytest.mark.parametrize("spec,m,k,n,minor", GPU_CASES)
def test_gpu_weight_only_matches_numpy(spec, m, k, n, minor):
  q = _weights(spec, k, n, minor)
  x = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
  assert gpu_reason(q, x.shape, "gpu") is None
  _check_float(weight_only_matmul(jnp.asarray(x), q, interpret=True), x, q)


def test_gpu_exact_with_exact_operands():
  """Integer activations and power-of-two group scales: every product and sum is exact, so
  the kernel's bf16 dot with float32 accumulation equals NumPy bit for bit."""
  rng = np.random.default_rng(2)
  k, n = 128, 64
  c = rng.integers(0, 16, (k, n)).astype(np.uint8)
  scale = 2.0 ** rng.integers(-6, -2, (k // 32, 1, n)).astype(np.float32)
  zero = rng.integers(0, 16, (k // 32, 1, n)).astype(np.uint8)
  q = _from_numpy(c, scale, zero, _spec("uint4:g32:asym"))
  x = rng.integers(-8, 8, (2, 3, k)).astype(np.float32)  # leading axes flatten to rows
  y = weight_only_matmul(jnp.asarray(x, jnp.bfloat16), q, out_dtype=jnp.float32, interpret=True)
  ref = x @ ((c.astype(np.float64) - _grid(q, zero)) * _grid(q, scale))
  assert y.shape == (2, 3, n)
  np.testing.assert_array_equal(np.asarray(y), ref.astype(np.float32))


def _int8_rows(m: int, k: int, seed: int = 3):
  rng = np.random.default_rng(seed)
  xq = rng.integers(-127, 128, (m, k)).astype(np.int8)
  sx = rng.uniform(0.005, 0.02, (m, 1)).astype(np.float32)
  return xq, sx


@pytest.mark.parametrize("spec,m", [("int8", 1), ("int4", 5), ("uint4:asym", 16)])
def test_tpu_integer_per_channel_exact(spec, m):
  """W8A8 / W4A8 per channel: the int32 sums are exact, then ``· s_w · s_x`` in float32."""
  k, n = 256, 256
  q = _weights(spec, k, n)
  xq, sx = _int8_rows(m, k)
  y = tpu_matmul(jnp.asarray(xq), q, x_scale=jnp.asarray(sx), interpret=True)
  c = _codes(q)
  z = 0 if q.zero_point is None else np.asarray(q.zero_point, np.int64).reshape(1, n)
  acc = (xq.astype(np.int64) @ (c - z)).astype(np.float32)
  ref = acc * np.asarray(q.scale, np.float32).reshape(1, n) * sx
  np.testing.assert_array_equal(np.asarray(y), ref)


def test_tpu_integer_groups_exact():
  """W4A8 with group scales (one group per K block): exact integer sums per group; with
  power-of-two scales the float32 sum over groups is exact too."""
  rng = np.random.default_rng(4)
  k, n, g = 256, 256, 128
  c = rng.integers(-8, 8, (k, n)).astype(np.int8)
  scale = 2.0 ** rng.integers(-8, -4, (k // g, 1, n)).astype(np.float32)
  q = _from_numpy(c, scale, None, _spec("int4:g128"))
  xq, _ = _int8_rows(5, k)
  sx = np.full((5, 1), 0.25, np.float32)
  y = tpu_matmul(jnp.asarray(xq), q, x_scale=jnp.asarray(sx), interpret=True)
  ref = (xq.astype(np.int64) @ (c.astype(np.int64) * _grid(q, scale))) * 0.25
  np.testing.assert_array_equal(np.asarray(y), ref.astype(np.float32))


@pytest.mark.parametrize("spec", ["uint4:g128:asym", "int8"])
def test_tpu_float_activations(spec):
  k, n = 256, 256
  q = _weights(spec, k, n)
  x = np.random.default_rng(5).standard_normal((5, k)).astype(np.float32)
  _check_float(tpu_matmul(jnp.asarray(x), q, interpret=True), x, q)


def test_w8a8_quantizes_tokens_like_numerics():
  k, n = 256, 256
  q = _weights("int8", k, n)
  x = np.random.default_rng(6).standard_normal((2, 3, k)).astype(np.float32)
  y = w8a8_matmul(jnp.asarray(x), q, interpret=True)
  xq, sx, _ = quantize_along(jnp.asarray(x), PER_TOKEN_INT8, (2,))
  acc = np.asarray(xq, np.int64).reshape(6, k) @ _codes(q)
  ref = acc.astype(np.float32) * np.asarray(q.scale, np.float32) * np.asarray(sx).reshape(6, 1)
  np.testing.assert_array_equal(np.asarray(y).reshape(6, n), ref)


def test_pallas_reason():
  q4 = _weights("int4:g128", 256, 256)
  assert pallas_reason(q4, (1, 256), "gpu") is None
  assert pallas_reason(q4, (1, 256), "tpu") is None
  assert pallas_reason(q4, (1, 256), "tpu", lhs_spec=PER_TOKEN_INT8) is None
  assert "backend cpu" in str(pallas_reason(q4, (1, 256), "cpu"))
  assert "weight-only" in str(pallas_reason(q4, (1, 256), "gpu", lhs_spec=PER_TOKEN_INT8))
  assert "Dense" in str(pallas_reason(q4, (1, 256), "gpu", dims=(((0,), (0,)), ((), ()))))
  assert "nf4" in str(pallas_reason(_weights("nf4:g64", 128, 64), (1, 128), "gpu"))
  assert "multiple of 128" in str(pallas_reason(_weights("int4:g32", 128, 256), (1, 128), "tpu"))
  assert "uint8" in str(
    pallas_reason(_weights("uint8:asym", 128, 256), (1, 128), "tpu", lhs_spec=PER_TOKEN_INT8)
  )
  assert "contract" in str(pallas_reason(q4, (1, 128), "gpu"))
  assert "power-of-two" in str(pallas_reason(_weights("int8", 128, 24), (1, 128), "gpu"))


def test_pallas_matmul_dispatches_in_interpret_mode():
  q = _weights("int4:g128", 256, 256)
  x = np.random.default_rng(7).standard_normal((3, 256)).astype(np.float32)
  _check_float(pallas_matmul(jnp.asarray(x), q, backend="gpu", interpret=True), x, q)


# --------------------------------------------------------------------------- lowering, export
@pytest.mark.parametrize("spec,minor", [("int8", True), ("uint4:g128:asym", False)])
def test_gpu_kernel_exports_for_cuda(spec, minor, monkeypatch):
  """The Triton lowering runs without a GPU: the kernel becomes Triton IR (checked by the MLIR
  verifier) inside a ``__gpu$xla.gpu.triton`` call; the export serializes and loads back."""
  modules = []
  lower = registration.lowering.lower_jaxpr_to_triton_module

  def verified(*args, **kwargs):
    result = lower(*args, **kwargs)
    modules.append((result.module.operation.verify(), str(result.module)))
    return result

  monkeypatch.setattr(registration.lowering, "lower_jaxpr_to_triton_module", verified)
  q = _weights(spec, 256, 192, minor)
  x = jax.ShapeDtypeStruct((5, 256), jnp.bfloat16)
  exported = jax.export.export(
    jax.jit(weight_only_matmul), platforms=("cuda",), disabled_checks=EXPORT_CHECKS
  )(x, q)
  assert "__gpu$xla.gpu.triton" in exported.mlir_module()
  assert jax.export.deserialize(exported.serialize()).platforms == ("cuda",)
  [(ok, ttir)] = modules
  assert ok and "tt.dot" in ttir and "scf.for" in ttir
  with pytest.raises(ValueError, match="compatibility guarantees"):
    jax.export.export(jax.jit(weight_only_matmul), platforms=("cuda",))(x, q)


@pytest.mark.parametrize("spec,act", [("int8", "int8"), ("int4:g128", "bf16")])
def test_tpu_kernel_exports_for_tpu(spec, act):
  q = _weights(spec, 256, 512)
  if act == "int8":
    f = lambda x, q: w8a8_matmul(x, q)
  else:
    f = lambda x, q: tpu_matmul(x, q, out_dtype=jnp.bfloat16)
  x = jax.ShapeDtypeStruct((2, 256), jnp.bfloat16)
  exported = jax.export.export(jax.jit(f), platforms=("tpu",))(x, q)
  assert "tpu_custom_call" in exported.mlir_module()
  assert jax.export.deserialize(exported.serialize()).platforms == ("tpu",)


def test_portable_matmul_picks_the_kernel_of_the_platform_lowered_for():
  q = _weights("int4:g128", 256, 256)
  fallback = lambda x, q: (x.astype(jnp.float32) @ dequantize(q, jnp.float32)).astype(x.dtype)
  f = jax.jit(lambda x, q: portable_matmul(x, q, fallback))
  x = jax.ShapeDtypeStruct((3, 256), jnp.bfloat16)
  found = {}
  for platform in ("cuda", "tpu", "cpu"):
    text = jax.export.export(f, platforms=(platform,), disabled_checks=EXPORT_CHECKS)(x, q)
    found[platform] = (
      "__gpu$xla.gpu.triton" in text.mlir_module(),
      "tpu_custom_call" in text.mlir_module(),
    )
  assert found == {"cuda": (True, False), "tpu": (False, True), "cpu": (False, False)}
  xv = jnp.ones((3, 256), jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(f(xv, q)), np.asarray(fallback(xv, q)))


# --------------------------------------------------------------------------- the serve path
DENSE = (((1,), (0,)), ((), ()))


def test_explain_names_the_pallas_kernels():
  q4, q8 = _weights("int4:g128", 256, 256), _weights("int8", 256, 256)
  x = jax.ShapeDtypeStruct((1, 256), jnp.bfloat16)
  assert str(explain(x, q4, backend="gpu")).startswith("kernel: Pallas Triton kernel")
  assert str(explain(x, q4, backend="tpu")).startswith("kernel: Pallas Mosaic kernel")
  w8a8 = explain(x, q8, lhs_spec="int8:token", backend="tpu")
  assert w8a8.name == "kernel" and "i8 x i8 -> i32 on the MXU" in w8a8.reason
  assert explain(x, q8, lhs_spec="int8:token", backend="gpu").name == "int8"
  assert explain(x, _weights("int8", 256, 24), backend="gpu").name == "dequant"


@pytest.mark.parametrize(
  "platform,spec,act", [("cuda", "int4:g128", None), ("tpu", "int8", "int8:token")]
)
def test_qdot_general_serves_through_the_pallas_kernels(platform, spec, act, monkeypatch):
  """On a GPU (TPU) backend the serve path lowers to the Triton (Mosaic) kernel."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu" if platform == "cuda" else "tpu")
  q = _weights(spec, 256, 256)
  f = jax.jit(lambda x, q: qdot_general(x, q, DENSE, lhs_spec=act))
  x = jax.ShapeDtypeStruct((3, 256), jnp.bfloat16)
  exported = jax.export.export(f, platforms=(platform,), disabled_checks=EXPORT_CHECKS)(x, q)
  target = "__gpu$xla.gpu.triton" if platform == "cuda" else "tpu_custom_call"
  assert target in exported.mlir_module()
  assert exported.out_avals[0].shape == (3, 256) and exported.out_avals[0].dtype == jnp.bfloat16
