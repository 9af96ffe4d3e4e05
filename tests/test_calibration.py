"""Range estimators and activation statistics against plain NumPy; jit and eager agree."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jaxquant as jq
from jaxquant.calibration import (
  MSE_CLIP_GRID,
  absmax_range,
  act_range,
  init_act_stats,
  minmax_range,
  mse_range,
  percentile_range,
  update_act_stats,
)

FINITE = st.floats(-1e3, 1e3, width=32, allow_subnormal=False)
# few shapes and axes: each new combination compiles anew
CASES = [((5,), (0,)), ((4, 6), (1,)), ((4, 6), (0, 1)), ((2, 3, 4), (0, -1))]


@st.composite
def arrays_and_axes(draw, elements=FINITE):
  shape, axes = draw(st.sampled_from(CASES))
  return draw(hnp.arrays(np.float32, shape, elements=elements)), axes


def int8_qdq(x, lo, hi):
  """Symmetric int8 round to nearest over ``[lo, hi]`` (jnp; broadcasts like the ranges)."""
  scale = jnp.maximum(jnp.abs(lo), jnp.abs(hi)) / 127.0
  safe = jnp.where(scale > 0, scale, 1.0)
  return jnp.clip(jnp.round(x / safe), -127, 127) * safe


def np_int8_qdq(x, lo, hi):
  scale = np.maximum(np.abs(lo), np.abs(hi)) / np.float32(127.0)
  safe = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
  return np.clip(np.round(x / safe), -127, 127) * safe


_mse = jax.jit(mse_range, static_argnums=(1, 3))
_act_range = jax.jit(act_range, static_argnums=(1, 2))


# --------------------------------------------------------------------------- weight ranges
@given(arrays_and_axes())
def test_absmax_range_is_numpy_max_abs(case):
  x, axes = case
  lo, hi = absmax_range(jnp.asarray(x), axes)
  m = np.max(np.abs(x), axis=axes, keepdims=True)
  np.testing.assert_array_equal(np.asarray(hi), m)
  np.testing.assert_array_equal(np.asarray(lo), -m)


@given(arrays_and_axes())
def test_minmax_range_is_numpy_min_and_max(case):
  x, axes = case
  lo, hi = minmax_range(jnp.asarray(x), axes)
  np.testing.assert_array_equal(np.asarray(lo), np.min(x, axis=axes, keepdims=True))
  np.testing.assert_array_equal(np.asarray(hi), np.max(x, axis=axes, keepdims=True))


@given(arrays_and_axes(), st.sampled_from([50.0, 90.0, 99.0, 99.9, 100.0]), st.booleans())
def test_percentile_range_is_numpy_quantile(case, percentile, symmetric):
  x, axes = case
  lo, hi = percentile_range(jnp.asarray(x), axes, percentile, symmetric)
  q = percentile / 100.0
  x64 = x.astype(np.float64)
  if symmetric:
    m = np.quantile(np.abs(x64), q, axis=axes, keepdims=True)
    ref_lo, ref_hi = -m, m
  else:
    ref_lo = np.quantile(x64, 1.0 - q, axis=axes, keepdims=True)
    ref_hi = np.quantile(x64, q, axis=axes, keepdims=True)
  atol = 1e-5 * (1.0 + np.max(np.abs(x)))
  assert lo.shape == ref_lo.shape and hi.shape == ref_hi.shape
  np.testing.assert_allclose(np.asarray(lo), ref_lo, rtol=1e-5, atol=atol)
  np.testing.assert_allclose(np.asarray(hi), ref_hi, rtol=1e-5, atol=atol)
  if percentile == 100.0 and symmetric:
    np.testing.assert_array_equal(np.asarray(hi), np.max(np.abs(x), axis=axes, keepdims=True))


@given(arrays_and_axes())
def test_mse_range_shrinks_the_full_range_to_its_least_error_clip(case):
  x, axes = case
  full = absmax_range(jnp.asarray(x), axes)
  lo, hi = (np.asarray(v) for v in _mse(jnp.asarray(x), axes, full, int8_qdq))
  full_lo, full_hi = (np.asarray(v) for v in full)
  assert lo.shape == full_lo.shape and hi.shape == full_hi.shape
  # within the full range, no further in than the grid's smallest factor
  assert np.all(lo >= full_lo) and np.all(hi <= full_hi)
  assert np.all(hi >= np.float32(min(MSE_CLIP_GRID)) * full_hi * (1 - 1e-6))
  np.testing.assert_array_equal(lo, -hi)  # alpha scales a symmetric range symmetrically

  def err(a, b):
    return np.sum(np.square(x - np_int8_qdq(x, a, b)), axis=axes, keepdims=True)

  tol = 1e-5 * np.sum(np.square(x), axis=axes, keepdims=True) + 1e-12
  chosen = err(lo, hi)
  assert np.all(chosen <= err(full_lo, full_hi) + tol)
  grid = np.asarray(MSE_CLIP_GRID, np.float32)
  best = np.min([err(a * full_lo, a * full_hi) for a in grid], axis=0)
  assert np.all(chosen <= best + tol)


def test_mse_range_clips_gaussian_tails_under_coarse_rounding():
  def ternary_qdq(x, lo, hi):  # three levels: the best clip is far inside max |x|
    scale = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    return jnp.clip(jnp.round(x / scale), -1, 1) * scale

  x = np.random.default_rng(0).normal(size=(2, 1024)).astype(np.float32)
  full = absmax_range(jnp.asarray(x), (1,))
  lo, hi = mse_range(jnp.asarray(x), (1,), full, ternary_qdq)
  assert lo.shape == hi.shape == (2, 1)
  assert np.all(np.asarray(hi) < 0.6 * np.asarray(full[1]))
  err = lambda h: np.sum((x - np.asarray(ternary_qdq(x, -h, h))) ** 2, axis=1)
  assert np.all(err(np.asarray(hi)) < err(np.asarray(full[1])))


# --------------------------------------------------------------------------- jit vs eager
class RangesUnderJitTest(chex.TestCase):
  """Each range is the same, bit for bit, eager and under jit (and equal to NumPy)."""

  def _arrays(self):
    rng = np.random.default_rng(0)
    return [rng.normal(size=(4, 6)).astype(np.float32) * s for s in (1e-3, 1.0, 1e3)]

  @chex.variants(with_jit=True, without_jit=True)
  def test_absmax_range(self):
    fn = self.variant(lambda x: absmax_range(x, (0,)))
    for x in self._arrays():
      lo, hi = fn(jnp.asarray(x))
      eager_lo, eager_hi = absmax_range(jnp.asarray(x), (0,))
      np.testing.assert_array_equal(np.asarray(hi), np.max(np.abs(x), axis=0, keepdims=True))
      np.testing.assert_array_equal(np.asarray(lo), np.asarray(eager_lo))
      np.testing.assert_array_equal(np.asarray(hi), np.asarray(eager_hi))

  @chex.variants(with_jit=True, without_jit=True)
  def test_minmax_range(self):
    fn = self.variant(lambda x: minmax_range(x, (1,)))
    for x in self._arrays():
      lo, hi = fn(jnp.asarray(x))
      np.testing.assert_array_equal(np.asarray(lo), np.min(x, axis=1, keepdims=True))
      np.testing.assert_array_equal(np.asarray(hi), np.max(x, axis=1, keepdims=True))

  @chex.variants(with_jit=True, without_jit=True)
  def test_percentile_range(self):
    fn = self.variant(lambda x: percentile_range(x, (1,), 90.0, False))
    for x in self._arrays():
      lo, hi = fn(jnp.asarray(x))
      eager_lo, eager_hi = jax.jit(lambda x: percentile_range(x, (1,), 90.0, False))(x)
      np.testing.assert_array_equal(np.asarray(lo), np.asarray(eager_lo))
      np.testing.assert_array_equal(np.asarray(hi), np.asarray(eager_hi))
      np.testing.assert_allclose(
        np.asarray(hi), np.quantile(x, 0.9, axis=1, keepdims=True), rtol=1e-5
      )


# --------------------------------------------------------------------------- activations
ACT_SHAPES = st.sampled_from([(2, 3), (4, 4)])


@st.composite
def activation_batches(draw, elements=FINITE):
  n = draw(st.integers(1, 4))
  return [draw(hnp.arrays(np.float32, draw(ACT_SHAPES), elements=elements)) for _ in range(n)]


_update = jax.jit(update_act_stats)


def _stats_of(xs, sample_size=16):
  stats = init_act_stats(sample_size)
  for i, x in enumerate(xs):
    stats = _update(stats, jnp.asarray(x), jax.random.key(i))
  return stats


@given(activation_batches())
def test_act_stats_are_exact_over_everything_seen(xs):
  stats = _stats_of(xs)
  flat = np.concatenate([x.ravel() for x in xs])
  assert float(stats["absmax"]) == np.max(np.abs(flat))
  assert float(stats["min"]) == np.min(flat)
  assert float(stats["max"]) == np.max(flat)
  assert float(stats["count"]) == flat.size
  assert np.all(np.isin(np.asarray(stats["sample"]), flat))  # every slot is a value seen


def test_act_stats_min_and_max_do_not_start_from_zero():
  positive = _stats_of([np.full((2, 3), 3.0, np.float32), np.full((2, 3), 5.0, np.float32)])
  assert float(positive["min"]) == 3.0 and float(positive["max"]) == 5.0
  negative = _stats_of([np.full((2, 3), -2.0, np.float32), np.full((2, 3), -7.0, np.float32)])
  assert float(negative["min"]) == -7.0 and float(negative["max"]) == -2.0
  assert float(negative["absmax"]) == 7.0


def test_init_act_stats_is_empty():
  stats = init_act_stats(32)
  assert stats["sample"].shape == (32,) and float(stats["count"]) == 0.0
  assert all(s.dtype == jnp.float32 for s in stats.values())


@given(activation_batches())
def test_act_range_follows_the_spec(xs):
  stats = _stats_of(xs)
  flat = np.concatenate([x.ravel() for x in xs])
  lo, hi = _act_range(stats, jq.QuantSpec.parse("int8:tensor"), int8_qdq)
  assert lo.shape == () and hi.shape == ()
  assert float(lo) == -np.max(np.abs(flat)) and float(hi) == np.max(np.abs(flat))
  lo, hi = _act_range(stats, jq.QuantSpec.parse("int8:tensor:asym"), int8_qdq)
  assert float(lo) == np.min(flat) and float(hi) == np.max(flat)
  sample = np.asarray(stats["sample"], np.float64)
  lo, hi = _act_range(stats, jq.QuantSpec.parse("int8:tensor:p90"), int8_qdq)
  m = np.quantile(np.abs(sample), 0.9)
  atol = 1e-5 * (1.0 + m)
  np.testing.assert_allclose([float(lo), float(hi)], [-m, m], rtol=1e-5, atol=atol)
  lo, hi = _act_range(stats, jq.QuantSpec.parse("int8:tensor:mse"), int8_qdq)
  absmax = np.max(np.abs(flat))
  assert -absmax <= float(lo) <= 0.0 <= float(hi) <= absmax
  assert float(hi) >= min(MSE_CLIP_GRID) * absmax * (1 - 1e-6)
