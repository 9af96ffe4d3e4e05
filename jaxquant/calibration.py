"""Range estimators: step 1 of quantization, finding the clipping range ``[lo, hi]``.

Each estimator reduces `x` over `axes` (keeping them with size 1, so the result broadcasts
against `x`) and returns ``(lo, hi)``. They are pure `jnp` code and run under `jit`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

Range = tuple[jax.Array, jax.Array]
QDQ = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]

# Clip factors tried by the MSE search: the full range down to 30% of it.
MSE_CLIP_GRID = tuple(1.0 - 0.01 * k for k in range(71))


def absmax_range(x: jax.Array, axes: Sequence[int]) -> Range:
  """``(-m, m)`` with ``m = max |x|``."""
  m = jnp.max(jnp.abs(x), axis=tuple(axes), keepdims=True)
  return -m, m


def minmax_range(x: jax.Array, axes: Sequence[int]) -> Range:
  """``(min x, max x)``."""
  axes = tuple(axes)
  return jnp.min(x, axis=axes, keepdims=True), jnp.max(x, axis=axes, keepdims=True)


def _quantile_over(x: jax.Array, axes: Sequence[int], q: float) -> jax.Array:
  """The q-quantile of `x` over `axes`, kept with size 1."""
  axes = tuple(a % x.ndim for a in axes)
  kept = [a for a in range(x.ndim) if a not in axes]
  moved = jnp.transpose(x, kept + list(axes))
  flat = moved.reshape(moved.shape[: len(kept)] + (-1,))
  out = jnp.quantile(flat, q, axis=-1)
  keep_shape = tuple(1 if a in axes else d for a, d in enumerate(x.shape))
  return out.reshape(keep_shape)


def percentile_range(
  x: jax.Array, axes: Sequence[int], percentile: float, symmetric: bool
) -> Range:
  """Clips the tails: symmetric uses the `percentile` of ``|x|``; asymmetric clips each side."""
  q = percentile / 100.0
  if symmetric:
    m = _quantile_over(jnp.abs(x), axes, q)
    return -m, m
  return _quantile_over(x, axes, 1.0 - q), _quantile_over(x, axes, q)


def mse_range(x: jax.Array, axes: Sequence[int], full: Range, qdq: QDQ) -> Range:
  """Shrinks `full` by the factor in `MSE_CLIP_GRID` that minimises ``sum (x - qdq(x))^2``.

  The search is per scale group (every index of the kept axes picks its own factor) and runs
  as a `lax.scan`, so memory stays at one copy of `x`.
  """
  axes = tuple(axes)
  lo, hi = full

  def step(best, alpha):
    best_err, best_alpha = best
    err = jnp.sum(jnp.square(x - qdq(x, alpha * lo, alpha * hi)), axis=axes, keepdims=True)
    better = err < best_err
    return (jnp.where(better, err, best_err), jnp.where(better, alpha, best_alpha)), None

  init = (jnp.full(lo.shape, jnp.inf, x.dtype), jnp.ones(lo.shape, x.dtype))
  (_, alpha), _ = jax.lax.scan(step, init, jnp.asarray(MSE_CLIP_GRID, x.dtype))
  return alpha * lo, alpha * hi


# --------------------------------------------------------------------------- activations
ACT_SAMPLE = 4096


def init_act_stats(sample_size: int = ACT_SAMPLE) -> dict[str, jax.Array]:
  """Empty running statistics of one activation tensor (a pytree of arrays).

  ``absmax``, ``min``, ``max`` are exact running values; ``sample`` is a uniform random sample
  of everything seen (each slot an independent draw), for percentile and MSE ranges.
  """
  return {
    "absmax": jnp.zeros((), jnp.float32),
    "min": jnp.zeros((), jnp.float32),
    "max": jnp.zeros((), jnp.float32),
    "count": jnp.zeros((), jnp.float32),
    "sample": jnp.zeros((sample_size,), jnp.float32),
  }


def update_act_stats(stats: dict, x: jax.Array, key: jax.Array) -> dict:
  """``stats`` after also seeing ``x``: a pure ``(stats, x) -> stats`` update (jit/scan-safe)."""
  flat = jnp.ravel(x).astype(jnp.float32)
  n = flat.shape[0]
  k = stats["sample"].shape[0]
  draw_key, mix_key = jax.random.split(key)
  drawn = flat[jax.random.randint(draw_key, (k,), 0, n)]
  total = stats["count"] + n
  take_new = jax.random.uniform(mix_key, (k,)) < n / total
  first = stats["count"] == 0
  return {
    "absmax": jnp.maximum(stats["absmax"], jnp.max(jnp.abs(flat))),
    "min": jnp.where(first, jnp.min(flat), jnp.minimum(stats["min"], jnp.min(flat))),
    "max": jnp.where(first, jnp.max(flat), jnp.maximum(stats["max"], jnp.max(flat))),
    "count": total,
    "sample": jnp.where(take_new, drawn, stats["sample"]),
  }


def act_range(stats: dict, spec, qdq: QDQ) -> Range:
  """Static ``(lo, hi)`` for an activation from its statistics, by the spec's calibration."""
  sample = stats["sample"][None, :]
  if spec.calibration == "percentile":
    lo, hi = percentile_range(sample, (1,), spec.percentile, spec.symmetric)
  elif spec.symmetric:
    lo, hi = -stats["absmax"], stats["absmax"]
  else:
    lo, hi = stats["min"], stats["max"]
  lo, hi = jnp.reshape(lo, ()), jnp.reshape(hi, ())
  if spec.calibration == "mse":
    full = (jnp.reshape(lo, (1, 1)), jnp.reshape(hi, (1, 1)))
    lo, hi = mse_range(sample, (1,), full, qdq)
    lo, hi = jnp.reshape(lo, ()), jnp.reshape(hi, ())
  return lo, hi
