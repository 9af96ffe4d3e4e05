"""Numerics against a plain NumPy reference, and the properties every quantizer must have."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from reference import INT_RANGES, ref_quantize

import jaxquant as jq
from jaxquant.numerics import NF4_CODE, codes
from jaxquant.packing import pack_4bit, to_native_int4, unpack_4bit
from jaxquant.spec import SCALE_DTYPES

DIMS = st.sampled_from([1, 3, 4, 8])  # few shapes: each new shape compiles anew
FINITE = st.floats(-1e4, 1e4, width=32, allow_subnormal=False)


@st.composite
def matrices(draw, elements=FINITE):
  shape = (draw(DIMS), draw(DIMS))
  return draw(hnp.arrays(np.float32, shape, elements=elements))


@st.composite
def int_cases(draw):
  """(x, spec, reference kwargs) over integer formats and every granularity."""
  x = draw(matrices())
  fmt = draw(st.sampled_from(list(INT_RANGES)))
  symmetric = fmt.startswith("int") and draw(st.booleans())
  gran = draw(st.sampled_from(["tensor", "channel", "token", "group"]))
  axis = draw(st.sampled_from([0, 1, -1]))
  group = None
  if gran == "group":
    n = x.shape[axis]
    group = draw(st.sampled_from([d for d in range(1, n + 1) if n % d == 0]))
  scale_dtype = draw(st.sampled_from(["f32", "f16", "bf16"]))
  spec = jq.QuantSpec(fmt, gran, group, axis, symmetric, scale_dtype=scale_dtype)
  reference = {
    "fmt": fmt,
    "granularity": gran,
    "axis": axis,
    "group": group,
    "symmetric": symmetric,
    "scale_dtype": SCALE_DTYPES[scale_dtype],
  }
  return x, spec, reference


@given(int_cases())
def test_integer_formats_match_numpy_reference(case):
  x, spec, kw = case
  q = jq.quantize(x, spec)
  ref_codes, ref_scale, ref_zero, ref_deq = ref_quantize(x, **kw)
  np.testing.assert_array_equal(np.asarray(codes(q), np.float32), ref_codes)
  assert q.scale.dtype == spec.scale_storage
  np.testing.assert_array_equal(np.asarray(q.scale, np.float32), ref_scale)
  if not spec.symmetric:
    np.testing.assert_array_equal(np.asarray(q.zero_point, np.float32), ref_zero)
  np.testing.assert_allclose(np.asarray(jq.dequantize(q)), ref_deq, rtol=1e-6, atol=1e-30)


@given(int_cases())
def test_error_within_half_a_step_inside_the_range(case):
  x, spec, _ = case
  q = jq.quantize(x, spec)
  err = np.abs(x - np.asarray(jq.dequantize(q)))
  scale = np.asarray(q.scale)
  # scales broadcast against the grouped view; bring them back to x's shape
  if spec.granularity == "group":
    view_shape = jq.numerics.grouped_view(jnp.asarray(x), spec)[0].shape
    step = np.broadcast_to(scale, view_shape).reshape(x.shape)
  else:
    step = np.broadcast_to(scale, x.shape)
  assert np.all(err <= step / 2 * (1 + 1e-5) + 1e-30)


@given(int_cases())
def test_zero_is_exact(case):
  x, spec, _ = case
  x = x.copy()
  x[0, :] = 0.0
  q = jq.quantize(x, spec)
  assert np.all(np.asarray(jq.dequantize(q))[0, :] == 0.0)


@given(int_cases())
def test_quantize_is_idempotent_on_its_own_grid(case):
  x, spec, _ = case
  # a 16-bit scale, rounded up, can leave the top code unused, so the grid re-derived from
  # the dequantized values may be another one (the half-step bound above still holds)
  assume(spec.scale_dtype == "f32")
  q1 = jq.quantize(x, spec)
  q2 = jq.quantize(jq.dequantize(q1), spec)
  if not spec.symmetric:
    # an integer zero point can round an extreme inward at a tie (x / Δ + z = k + ½), so the
    # grid re-derived from the dequantized values may be narrower: they stay within half a step
    dq1, dq2 = np.asarray(jq.dequantize(q1)), np.asarray(jq.dequantize(q2))
    step = float(np.max(np.asarray(q1.scale)))
    assert np.max(np.abs(dq2 - dq1)) <= 0.5 * step * (1 + 1e-5) + 1e-30
    return
  np.testing.assert_array_equal(np.asarray(codes(q1)), np.asarray(codes(q2)))
  np.testing.assert_allclose(np.asarray(q1.scale), np.asarray(q2.scale), rtol=1e-6)
  # the re-derived scale may differ in the last bit (255 * (hi / 255) != hi in float32)
  np.testing.assert_allclose(
    np.asarray(jq.dequantize(q1)), np.asarray(jq.dequantize(q2)), rtol=1e-6, atol=1e-30
  )


@given(int_cases())
def test_jit_and_eager_agree(case):
  x, spec, _ = case
  eager = jq.quantize(x, spec)
  jitted = jax.jit(lambda v: jq.quantize(v, spec))(x)
  for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(
    np.asarray(jq.fake_quant(x, spec)), np.asarray(jax.jit(lambda v: jq.fake_quant(v, spec))(x))
  )


@given(int_cases())
def test_fake_quant_forward_equals_quantize_dequantize(case):
  x, spec, _ = case
  np.testing.assert_array_equal(
    np.asarray(jq.fake_quant(x, spec)), np.asarray(jq.dequantize(jq.quantize(x, spec)))
  )


@given(matrices(st.floats(-4, 4, width=32)), st.sampled_from(["int8", "int4", "uint8:asym"]))
def test_ste_gradient_is_one_inside_and_zero_outside_the_range(x, fmt):
  spec = jq.QuantSpec.parse(fmt + ":tensor")
  info = spec.info
  # static scale covering [-1, 1] (symmetric) or [-1, 1] via zero point (asymmetric)
  if spec.symmetric:
    scale, zp = jnp.full((1, 1), 1.0 / info.qmax), None
    lo_code, hi_code, z = -info.qmax, info.qmax, 0.0
  else:
    s = 2.0 / (info.qmax - info.qmin)
    z = float(info.qmin + round(1.0 / s))
    scale, zp = jnp.full((1, 1), s), jnp.full((1, 1), z, jnp.uint8)
    lo_code, hi_code = info.qmin, info.qmax
  g = jax.grad(lambda v: jnp.sum(jq.fake_quant(v, spec, scale=scale, zero_point=zp)))(x)
  v = x / np.asarray(scale, np.float32) + z
  inside = (v >= lo_code - 0.5) & (v <= hi_code + 0.5)
  np.testing.assert_array_equal(np.asarray(g), inside.astype(np.float32))


def test_ste_gradient_zero_where_percentile_clips():
  x = jnp.concatenate([jnp.linspace(-1, 1, 999), jnp.array([50.0])])[None, :]
  g = jax.grad(lambda v: jnp.sum(jq.fake_quant(v, "int8:token:p99.9")))(x)
  assert float(g[0, -1]) == 0.0 and float(jnp.min(g[0, :-1])) == 1.0


@given(
  hnp.array_shapes(min_dims=1, max_dims=3, max_side=5),
  st.booleans(),
  st.data(),
)
def test_pack_unpack_is_a_bijection(shape, signed, data):
  lo, hi = (-8, 7) if signed else (0, 15)
  dtype = np.int8 if signed else np.uint8
  v = data.draw(hnp.arrays(dtype, shape, elements=st.integers(lo, hi)))
  packed = pack_4bit(jnp.asarray(v))
  assert packed.dtype == jnp.uint8 and packed.shape == shape[:-1] + ((shape[-1] + 1) // 2,)
  back = unpack_4bit(packed, shape[-1], signed)
  np.testing.assert_array_equal(np.asarray(back), v)


@pytest.mark.parametrize("signed", [True, False])
def test_every_byte_unpacks_and_repacks_to_itself(signed):
  all_bytes = jnp.arange(256, dtype=jnp.uint8)[:, None]
  np.testing.assert_array_equal(
    np.asarray(pack_4bit(unpack_4bit(all_bytes, 2, signed))[:, 0]), np.arange(256)
  )


def test_native_int4_round_trips_under_jit():
  v = jnp.arange(-8, 8, dtype=jnp.int8)
  out = jax.jit(lambda a: to_native_int4(a).astype(jnp.int8))(v)
  np.testing.assert_array_equal(np.asarray(out), np.arange(-8, 8))


def test_nf4_code_book_matches_the_published_levels():
  published = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
  ]
  np.testing.assert_allclose(NF4_CODE, published, atol=2e-6)


@given(matrices())
def test_nf4_picks_the_nearest_level(x):
  q = jq.quantize(x, "nf4:token")
  absmax = np.max(np.abs(x), axis=-1, keepdims=True)
  safe = np.where(absmax > 0, absmax, 1)
  dist = np.abs(x[..., None] / safe[..., None] - NF4_CODE)
  chosen = dist[..., :][np.arange(x.shape[0])[:, None], np.arange(x.shape[1]), np.asarray(codes(q))]
  assert np.all(chosen <= dist.min(-1) + 1e-6)


@given(matrices(), st.sampled_from(["fp8_e4m3", "fp8_e5m2"]))
def test_fp8_matches_ml_dtypes_cast(x, fmt):
  q = jq.quantize(x, fmt + ":tensor")
  dtype = {"fp8_e4m3": ml_dtypes.float8_e4m3fn, "fp8_e5m2": ml_dtypes.float8_e5m2}[fmt]
  fmax = float(ml_dtypes.finfo(dtype).max)
  amax = np.float32(np.max(np.abs(x)))
  scale = np.float32(amax * np.float32(1.0 / fmax)) if amax > 0 else np.float32(1.0)
  expected = np.clip(x / scale, -fmax, fmax).astype(dtype)
  np.testing.assert_array_equal(np.asarray(q.values).view(np.uint8), expected.view(np.uint8))


def test_bf16_is_a_plain_cast():
  x = jax.random.normal(jax.random.key(0), (8, 8))
  q = jq.quantize(x, "bf16")
  assert q.scale is None and q.values.dtype == jnp.bfloat16
  np.testing.assert_array_equal(
    np.asarray(jq.dequantize(q)), np.asarray(x.astype(jnp.bfloat16), np.float32)
  )
  assert jnp.all(jax.grad(lambda v: jq.fake_quant(v, "bf16").sum())(x) == 1.0)


def test_stochastic_rounding_is_unbiased_and_needs_a_key():
  x = jnp.full((1, 20000), 0.3).at[0, 0].set(1.0)  # scale = 1/127; 0.3 * 127 = 38.1
  q = jq.quantize(x, "int8:token:stochastic", key=jax.random.key(0))
  c = np.asarray(codes(q))[0, 1:]
  assert set(np.unique(c)) == {38, 39}
  assert abs(c.mean() - 38.1) < 0.02
  with pytest.raises(ValueError, match="PRNG key"):
    jq.quantize(x, "int8:stochastic")


def _sq_err(x, spec):
  return float(jnp.sum((x - jq.dequantize(jq.quantize(x, spec))) ** 2))


def test_mse_calibration_beats_absmax_on_heavy_tails():
  x = jax.random.t(jax.random.key(1), 4.0, (64, 256))
  assert _sq_err(x, "int4:mse") < 0.9 * _sq_err(x, "int4")


@given(matrices(), st.sampled_from(["int8", "int4:token", "uint4:tensor", "nf4"]))
def test_mse_calibration_never_does_worse_than_the_full_range(x, fmt):
  assert _sq_err(x, fmt + ":mse") <= _sq_err(x, fmt) * (1 + 1e-6) + 1e-30


def test_percentile_clips_outliers():
  x = jnp.concatenate([jax.random.normal(jax.random.key(2), (1, 9999)), jnp.full((1, 1), 100.0)], 1)
  q = jq.quantize(x, "int8:tensor:p99.9")
  assert float(q.scale[0, 0]) * 127 < 10.0


def test_all_zero_tensor_quantizes_to_zero():
  for s in ["int8", "int4:g2:asym", "nf4:g2", "fp8_e4m3"]:
    q = jq.quantize(jnp.zeros((4, 4)), s)
    assert not np.any(np.asarray(jq.dequantize(q)))


def test_static_scale_is_used_as_given():
  x = jnp.array([[0.5, 1.0, 2.0]])
  q = jq.quantize(x, "int8:tensor", scale=jnp.full((1, 1), 1 / 127))
  np.testing.assert_array_equal(np.asarray(codes(q)), [[64, 127, 127]])


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.complex64, jnp.bool_])
def test_non_float_input_is_a_type_error(dtype):
  with pytest.raises(TypeError, match="Cast it to float32"):
    jq.quantize(jnp.ones((4, 4), dtype), "int8", path="layer/kernel")


def test_nan_or_inf_names_the_path():
  x = jnp.ones((4, 4)).at[1, 2].set(jnp.nan).at[0, 0].set(jnp.inf)
  with pytest.raises(ValueError, match=r"dense/kernel: contains 1 NaN and 1 Inf"):
    jq.quantize(x, "int8", path="dense/kernel")


def test_group_size_must_divide_the_axis():
  with pytest.raises(ValueError, match=r"w: group size 64 does not divide axis 0 of size 100.*50"):
    jq.quantize(jnp.ones((100, 8)), "int4:g64", path="w")


def test_asymmetric_static_scale_needs_a_zero_point():
  with pytest.raises(ValueError, match="zero_point"):
    jq.quantize(jnp.ones((2, 2)), "int8:asym:tensor", scale=jnp.ones((1, 1)))


@given(matrices(st.floats(-1e3, 1e3, width=32)), st.sampled_from(["int4:g4:asym", "int8", "uint8"]))
def test_a_16_bit_scale_is_the_float32_one_rounded_up(x, fmt):
  spec = jq.QuantSpec.parse(fmt + ":scale=f16")
  assume(x.shape[0] % 4 == 0 or spec.granularity != "group")
  full = jq.quantize(x, fmt).scale
  half = jq.quantize(x, spec).scale
  assert half.dtype == np.float16
  smallest = np.float32(ml_dtypes.finfo(np.float16).smallest_normal)
  wanted = np.maximum(np.asarray(full), smallest)
  got = np.asarray(half, np.float32)
  assert np.all(got >= wanted) and np.all(got <= wanted * (1 + 2**-10))
  assert spec.nbytes(x.shape) < jq.QuantSpec.parse(fmt).nbytes(x.shape)
