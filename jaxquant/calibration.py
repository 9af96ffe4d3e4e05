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
