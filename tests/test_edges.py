"""Edges: the spec string form round-trips exactly, 16-bit scales never clip silently, finite
inputs at the limits of their dtype read back finite, and zero-size tensors are handled."""

import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import ref_quantize

import jaxquant as jq
from jaxquant import transforms
from jaxquant.numerics import NF4_CODE, codes, compute_scale, scale_limit
from jaxquant.qarray import grouped_shape
from jaxquant.spec import CALIBRATIONS, FORMATS, GRANULARITIES, SCALE_DTYPES, QuantSpec


# --------------------------------------------------------------------------- 1. spec grammar
def _symmetric_choices(fmt: str) -> list:
  """The `symmetric` values `fmt` accepts (None: the format's default)."""
  info = FORMATS[fmt]
  if info.kind == "int":
    return [None, True, False] if info.signed else [None, False]
  return [None, True] if info.kind in ("float", "codebook") else [None, True, False]


@st.composite
def valid_specs(draw):
  """Any valid QuantSpec, over every field and the whole range each one allows."""
  fmt = draw(st.sampled_from(list(FORMATS)))
  info = FORMATS[fmt]
  gran = draw(st.sampled_from(GRANULARITIES))
  group = draw(st.integers(1, 2**40)) if gran == "group" else None
  axis = draw(st.none() | st.integers(-(2**40), 2**40))
  symmetric = draw(st.sampled_from(_symmetric_choices(fmt)))
  calib = draw(st.sampled_from(CALIBRATIONS))
  pct = None
  if calib == "percentile":
    pct = draw(
      st.floats(0.0, 100.0, exclude_min=True, allow_nan=False)
      | st.integers(1, 100)
      | st.sampled_from([1e-7, 99.99999, 100.0, 5e-324, 99.9, 50.0])
    )
  rounding = draw(st.sampled_from(["nearest", "stochastic"])) if info.kind == "int" else "nearest"
  scale_dtype = "f32" if info.kind == "cast" else draw(st.sampled_from(list(SCALE_DTYPES)))
  return QuantSpec(fmt, gran, group, axis, symmetric, calib, pct, rounding, scale_dtype)


@settings(max_examples=400)  # no compilation: cheap
@given(valid_specs())
def test_every_valid_spec_round_trips_through_its_string(spec):
  text = str(spec)
  again = QuantSpec.parse(text)
  assert again == spec and hash(again) == hash(spec)
  assert str(again) == text


@pytest.mark.parametrize(
  "text, percentile, printed",
  [
    ("int8:p0.0000001", 1e-7, "int8:p1e-07"),
    ("int8:p99.99999", 99.99999, "int8:p99.99999"),
    ("int8:p99.9", 99.9, "int8:p99.9"),
    ("int8:p100", 100.0, "int8:p100"),
    ("int8:P1E-7", 1e-7, "int8:p1e-07"),
    ("int8:p.5", 0.5, "int8:p0.5"),
    ("int8:p5.", 5.0, "int8:p5"),
    ("int8:p1e+01", 10.0, "int8:p10"),
  ],
)
def test_percentiles_print_exactly_and_parse_in_every_float_form(text, percentile, printed):
  spec = QuantSpec.parse(text)
  assert spec.percentile == percentile
  assert str(spec) == printed
  assert QuantSpec.parse(str(spec)) == spec


@pytest.mark.parametrize("text", ["int8:p", "int8:p1e", "int8:pinf", "int8:p1e-07e2", "int8:p-1"])
def test_malformed_percentiles_are_errors(text):
  with pytest.raises(ValueError, match=r"Unknown part|percentile"):
    QuantSpec.parse(text)


def test_a_cast_prints_the_fields_it_ignores():
  spec = QuantSpec("bf16", "tensor", symmetric=False, calibration="mse")
  assert str(spec) == "bf16:tensor:asym:mse"
  assert QuantSpec.parse(str(spec)) == spec
  assert str(QuantSpec("bf16")) == "bf16"


# --------------------------------------------------------------------------- 2. 16-bit scales
def _rel(x, x_hat) -> float:
  x, x_hat = np.asarray(x, np.float64), np.asarray(x_hat, np.float64)
  return float(np.linalg.norm(x - x_hat) / np.linalg.norm(x))


def _gaussian(shape, scale, seed=0):
  return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


@pytest.mark.parametrize(
  "spec, magnitude, limit",
  [
    ("nf4:scale=f16", 1e5, "65504"),
    ("int8:scale=f16", 1e7, "8.31901e\\+06"),
    ("int4:g16:asym:scale=f16", 1e6, "982560"),
    ("fp8_e4m3:tensor:scale=f16", 1e8, "2.93458e\\+07"),
  ],
)
def test_a_range_too_wide_for_a_16_bit_scale_is_an_error(spec, magnitude, limit):
  w = _gaussian((64, 32), magnitude)
  amax = float(np.max(np.abs(w)))
  with pytest.raises(ValueError) as err:
    jq.quantize(w, spec, path="enc/dense/kernel")
  text = str(err.value)
  assert text.startswith("enc/dense/kernel: max |x| = ")
  assert f"{amax:.6g}" in text and "65504" in text
  assert re.search(f"<= {limit} per scale group", text)
  assert "scale=bf16" in text and "scale=f32" in text
  # the fix it names works
  fixed = jq.quantize(w, spec.replace("scale=f16", "scale=bf16"))
  full = jq.quantize(w, spec.replace(":scale=f16", ""))
  assert _rel(w, jq.dequantize(fixed)) < 1.5 * _rel(w, jq.dequantize(full)) + 1e-3


@pytest.mark.parametrize("spec", ["nf4", "int8", "int4:g16:asym", "fp8_e4m3:tensor"])
def test_just_inside_the_16_bit_limit_quantizes_as_well_as_float32_scales(spec):
  info = QuantSpec.parse(spec)
  limit = scale_limit(QuantSpec.parse(spec + ":scale=f16"))
  reach = 0.99 * limit if info.symmetric else 0.49 * limit
  w = _gaussian((64, 32), 1.0)
  w = (w / np.max(np.abs(w)) * reach).astype(np.float32)
  half = jq.quantize(w, spec + ":scale=f16")
  assert np.all(np.isfinite(np.asarray(half.scale, np.float32)))
  assert _rel(w, jq.dequantize(half)) < 1.05 * _rel(w, jq.dequantize(jq.quantize(w, spec))) + 1e-3


def test_a_bf16_scale_that_overflows_suggests_f32_only():
  w = np.ones((4, 4), np.float32)
  w[0, 0] = np.finfo(np.float32).max  # past bfloat16's largest value, 3.3895e38
  with pytest.raises(ValueError, match=r"max \|x\| = 3.40282e\+38.*Use scale=f32") as err:
    jq.quantize(w, "nf4:tensor:scale=bf16")
  assert "scale=bf16 (" not in str(err.value)


def test_a_given_scale_beyond_float16_is_an_error():
  with pytest.raises(ValueError, match="does not fit int8:tensor:scale=f16"):
    jq.quantize(jnp.ones((2, 2)), "int8:tensor:scale=f16", scale=jnp.full((1, 1), 1e6))


def test_under_jit_an_overflowing_scale_reads_back_nan_never_clipped():
  w = _gaussian((64, 8), 1.0)
  w[:, 0] *= 1e5  # column 0 (one channel) is too wide for a float16 nf4 scale
  out = np.asarray(jax.jit(lambda v: jq.dequantize(jq.quantize(v, "nf4:scale=f16")))(w))
  assert np.all(np.isnan(out[:, 0]))
  rest = np.asarray(jq.dequantize(jq.quantize(w[:, 1:], "nf4:scale=f16")))
  np.testing.assert_array_equal(out[:, 1:], rest)  # the other channels are untouched
  fq = np.asarray(jax.jit(lambda v: jq.fake_quant(v, "nf4:scale=f16"))(w))
  assert np.all(np.isnan(fq[:, 0])) and np.all(np.isfinite(fq[:, 1:]))
  with pytest.raises(ValueError, match="does not fit nf4:scale=f16"):
    jq.fake_quant(jnp.asarray(w), "nf4:scale=f16")


def test_quantize_params_names_the_leaf_before_quantizing(monkeypatch):
  params = {
    "a_ok": {"kernel": jnp.asarray(_gaussian((32, 16), 1.0))},
    "b_big": {"kernel": jnp.asarray(_gaussian((32, 16), 1e7, seed=1))},
  }
  calls = []
  quantize = transforms.quantize
  monkeypatch.setattr(transforms, "quantize", lambda *a, **k: calls.append(1) or quantize(*a, **k))
  with pytest.raises(ValueError, match=r"^b_big/kernel: max \|x\| = .*int8:scale=bf16"):
    jq.quantize_params(params, [jq.Rule(".*", "int8:scale=f16")])
  assert not calls  # raised before the first leaf was quantized
  stacked = {"layers": {"kernel": jnp.stack([params["a_ok"]["kernel"], params["b_big"]["kernel"]])}}
  with pytest.raises(ValueError, match=r"^layers/kernel: max \|x\|"):
    jq.quantize_params(stacked, [jq.Rule(".*", "int8:scale=f16", batch_dims=1)])
  assert isinstance(
    jq.quantize_params(params, [jq.Rule("a_ok", "int8:scale=f16")])["a_ok"]["kernel"], jq.QArray
  )
  assert calls == [1]


def test_quantize_params_checks_the_scale_groups_not_the_whole_tensor():
  # max x − min x of the tensor is 1.8e6, beyond int4's 65504 · 15 = 982560, but no group of 16
  # spans it: each group's range is 9e5 and fits
  w = np.zeros((32, 4), np.float32)
  w[:16] = np.linspace(0.0, 9e5, 16)[:, None]
  w[16:] = -np.linspace(0.0, 9e5, 16)[:, None]
  q = jq.quantize_params(
    {"d": {"kernel": jnp.asarray(w)}}, [jq.Rule(".*", "int4:g16:asym:scale=f16")]
  )
  assert _rel(w, jq.dequantize(q["d"]["kernel"])) < 0.05
  w[0, 0] = -1e5  # now the first group spans 1e6: too wide
  with pytest.raises(ValueError, match=r"d/kernel: .*max x − min x <= 982560"):
    jq.quantize_params(
      {"d": {"kernel": jnp.asarray(w)}}, [jq.Rule(".*", "int4:g16:asym:scale=f16")]
    )


# --------------------------------------------------------------------------- 3. format limits
FAMILIES = [
  "int8",
  "int8:asym",
  "uint8",
  "int4",
  "int4:asym",
  "uint4",
  "nf4",
  "fp8_e4m3",
  "fp8_e5m2",
  "int8:token",
  "uint4:tensor",
  "int8:g16",
  "int4:g16",
  "int4:g16:asym",
  "uint4:g16",
  "nf4:g16",
  "fp8_e4m3:g16",
]
_NF4_HALF_GAP = float(np.max(np.diff(NF4_CODE))) / 2


def max_rel_error(spec: QuantSpec) -> float:
  """The relative error the element of largest magnitude may have: half a step of the grid
  (``amax / qmax``, or ``(hi − lo) / (qmax − qmin) <= 2 amax / (qmax − qmin)`` with a zero
  point), half the widest gap of the NF4 levels, half an FP8 epsilon; with slack."""
  info = spec.info
  if info.kind == "int":
    err = 0.5 / info.qmax if spec.symmetric else 1.0 / (info.qmax - info.qmin)
  elif info.kind == "codebook":
    err = _NF4_HALF_GAP
  else:
    err = float(ml_dtypes.finfo(info.storage).eps) / 2
  return 1.01 * err + 1e-6


def _assert_max_reproduced(x, x_hat, spec):
  x, x_hat = np.asarray(x, np.float64), np.asarray(x_hat, np.float64)
  assert np.all(np.isfinite(x_hat)), f"{spec}: non-finite output"
  i = np.unravel_index(np.argmax(np.abs(x)), x.shape)
  assert abs(x_hat[i] - x[i]) <= max_rel_error(spec) * abs(x[i]), (spec, x[i], x_hat[i])


def _limit_input(value, dtype, seed=0):
  """A [16, 8] tensor of standard normals in `dtype` with one `value` at [3, 5]."""
  x = np.random.default_rng(seed).standard_normal((16, 8)).astype(dtype)
  x[3, 5] = value
  return x


@pytest.mark.parametrize("text", FAMILIES)
@pytest.mark.parametrize("value", [1e38, -1e38, np.finfo(np.float32).max])
def test_one_huge_float32_reads_back_finite_and_close(text, value):
  spec = QuantSpec.parse(text)
  x = _limit_input(value, np.float32)
  _assert_max_reproduced(x, jq.dequantize(jq.quantize(x, spec)), spec)
  _assert_max_reproduced(x, jq.fake_quant(jnp.asarray(x), spec), spec)


@pytest.mark.parametrize("text", FAMILIES)
def test_float32_extremes_of_both_signs_in_one_group_read_back_finite(text):
  # max x − min x = 6.8e38 overflows float32: an asymmetric scale must not become inf
  spec = QuantSpec.parse(text)
  fmax = np.finfo(np.float32).max
  x = _limit_input(fmax, np.float32)
  x[4, 5] = -fmax
  for x_hat in (jq.dequantize(jq.quantize(x, spec)), jq.fake_quant(jnp.asarray(x), spec)):
    x_hat = np.asarray(x_hat, np.float64)
    assert np.all(np.isfinite(x_hat))
    for i in ((3, 5), (4, 5)):
      assert abs(x_hat[i] - x[i]) <= max_rel_error(spec) * fmax, (i, x_hat[i])


@pytest.mark.parametrize("text", FAMILIES)
@pytest.mark.parametrize("low", [-65504.0, -2000.0, -1.0])
def test_float16_at_65504_reads_back_finite_and_close(text, low):
  # a channel holding 65504 and a negative `low`: an asymmetric grid then reaches past 65504
  spec = QuantSpec.parse(text)
  x = _limit_input(65504.0, np.float16)
  x[4, 5], x[0, 2] = low, -65504.0
  for x_hat in (jq.dequantize(jq.quantize(x, spec)), jq.fake_quant(jnp.asarray(x), spec)):
    assert x_hat.dtype == jnp.float16
    x_hat = np.asarray(x_hat, np.float64)
    assert np.all(np.isfinite(x_hat))
    for i in ((3, 5), (0, 2)):
      assert abs(x_hat[i] - x[i]) <= max_rel_error(spec) * 65504.0, (i, x_hat[i])


@pytest.mark.parametrize("text", [t for t in FAMILIES if FORMATS[t.split(":")[0]].kind == "int"])
def test_integer_limits_match_the_numpy_reference(text):
  spec = QuantSpec.parse(text)
  gran, group = spec.granularity, spec.group_size
  axis = spec.resolved_axis(2)
  for x in (_limit_input(1e38, np.float32), _limit_input(65504.0, np.float16)):
    x[4, 5] = -2000.0
    q = jq.quantize(x, spec)
    ref_codes, _, _, ref_deq = ref_quantize(
      x, spec.format, gran, axis, group, bool(spec.symmetric), np.float32
    )
    np.testing.assert_array_equal(np.asarray(codes(q), np.float32), ref_codes)
    bound = np.finfo(x.dtype).max  # the reference's grid points, saturated at the dtype's max
    want = np.clip(ref_deq, -bound, bound)
    np.testing.assert_allclose(np.asarray(jq.dequantize(q, jnp.float32)), want, rtol=1e-6)


@pytest.mark.parametrize("text", ["nf4", "nf4:g16", "nf4:tensor"])
def test_nf4_limits_match_the_numpy_reference(text):
  spec = QuantSpec.parse(text)
  x = _limit_input(1e38, np.float32)
  x[7, 1] = -np.finfo(np.float32).max
  view = x.reshape(grouped_shape(x.shape, spec))
  axes = {"tensor": (0, 1), "channel": (0,), "group": (1,)}[spec.granularity]
  amax = np.max(np.abs(view), axis=axes, keepdims=True)
  level = np.argmin(np.abs(view[..., None] / amax[..., None] - NF4_CODE), axis=-1)
  want = (NF4_CODE[level] * amax).reshape(x.shape)
  got = np.asarray(jq.dequantize(jq.quantize(x, spec)))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
  assert got[3, 5] == np.float32(1e38) or spec.granularity == "tensor"


@pytest.mark.parametrize("text", FAMILIES)
def test_all_zeros_and_float32_subnormals_read_back_finite(text):
  spec = QuantSpec.parse(text)
  tiny = np.finfo(np.float32).tiny
  zeros = np.zeros((16, 8), np.float32)
  np.testing.assert_array_equal(np.asarray(jq.dequantize(jq.quantize(zeros, spec))), zeros)
  sub = np.full((16, 8), 1e-40, np.float32)
  sub[3, 5] = -3e-39
  for x_hat in (jq.dequantize(jq.quantize(sub, spec)), jq.fake_quant(jnp.asarray(sub), spec)):
    x_hat = np.asarray(x_hat)
    # below float32's smallest normal XLA flushes to zero: the error stays below it
    assert np.all(np.isfinite(x_hat)) and np.all(np.abs(x_hat - sub) <= tiny)


@pytest.mark.parametrize("text", FAMILIES)
def test_float16_subnormals_are_kept_with_float32_scales(text):
  spec = QuantSpec.parse(text)
  x = (_limit_input(0.0, np.float32) * 1e-6).astype(np.float16)  # subnormal in float16
  x[3, 5] = np.float16(-6e-6)
  assert np.abs(x[3, 5]) < np.finfo(np.float16).smallest_normal
  for x_hat in (jq.dequantize(jq.quantize(x, spec)), jq.fake_quant(jnp.asarray(x), spec)):
    assert x_hat.dtype == jnp.float16
    _assert_max_reproduced(x, x_hat, spec)


# --------------------------------------------------------------------------- 4. zero size
@pytest.mark.parametrize("shape", [(0, 8), (8, 0), (0,), (2, 0, 4)])
def test_quantizing_an_empty_array_is_an_error_naming_its_shape(shape):
  x = jnp.zeros(shape)
  with pytest.raises(
    ValueError, match=rf"^w: cannot quantize an empty array \(shape {re.escape(str(shape))}\)"
  ):
    jq.quantize(x, "int8", path="w")
  with pytest.raises(ValueError, match="empty array"):
    jax.jit(lambda v: jq.quantize(v, "int4:asym", path="w"))(x)
  with pytest.raises(ValueError, match="empty array"):
    compute_scale(x, "int8")
  assert jq.fake_quant(x, "int8").shape == shape  # nothing to quantize: kept as it is


def test_plan_and_the_transforms_keep_zero_size_leaves():
  params = {
    "empty": {"kernel": jnp.zeros((0, 8))},
    "dense": {"kernel": jnp.asarray(_gaussian((8, 8), 1.0))},
    "stack": {"kernel": jnp.zeros((3, 0, 8))},
  }
  rules = [jq.Rule(".*", "int4:g4:asym", batch_dims=0)]
  p = jq.plan(params, rules)
  rows = {r.path: r for r in p.rows}
  assert rows["empty/kernel"].spec is None and rows["empty/kernel"].note == "kept (zero-size)"
  assert rows["stack/kernel"].note == "kept (zero-size)"
  assert rows["dense/kernel"].spec is not None and not p.problems
  assert "kept (zero-size)" in str(p)
  assert {r["path"]: r["note"] for r in p.to_dict()["rows"]}["empty/kernel"] == "kept (zero-size)"
  q = jq.quantize_params(params, rules)
  assert q["empty"]["kernel"] is params["empty"]["kernel"]
  assert isinstance(q["dense"]["kernel"], jq.QArray)
  fq = jax.jit(lambda t: jq.fake_quant_params(t, rules))(params)
  assert fq["empty"]["kernel"].shape == (0, 8) and fq["stack"]["kernel"].shape == (3, 0, 8)
  assert not np.array_equal(
    np.asarray(fq["dense"]["kernel"]), np.asarray(params["dense"]["kernel"])
  )


def test_ptq_recipes_check_scale_ranges_before_any_work():
  """PTQ recipes (HQQ here) store float16 scales too: the same up-front error naming the leaf
  as quantize_params, before the step runs."""
  params = {"dense": {"kernel": jnp.full((64, 64), 3e6, jnp.float32).at[0, 0].set(-3e6)}}
  rules = (jq.Rule(".*", weight="int4:g32:asym:scale=f16"),)
  recipe = jq.Recipe("hqq-f16", rules, "test", (("hqq", {}),))
  with pytest.raises(ValueError, match=r"dense/kernel.*scale=(bf16|f32)"):
    jq.apply_recipe(recipe, params)


def test_bad_batch_dims_and_rules_are_clear_errors():
  with pytest.raises(ValueError, match=r"batch_dims=3 must be in \[0, 1\]"):
    jq.quantize(jnp.ones((4, 6)), "int8", batch_dims=3)
  with pytest.raises(ValueError, match="batch_dims=-1"):
    jq.quantize(jnp.ones((4, 6)), "int8", batch_dims=-1)
  for rules in ("int8", jq.Rule(".*", weight="int8"), [1, 2]):
    with pytest.raises(TypeError, match=r"rules must be a list of jaxquant\.Rule"):
      jq.quantize_params({"a": jnp.ones((4, 4))}, rules)
