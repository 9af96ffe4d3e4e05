"""HQQ (Badri & Shaji, 2023): calibration-free zero points by half-quadratic optimisation.

For asymmetric group quantization with scale ``s`` from the min/max range, HQQ looks for the
float zero point ``z`` that minimises ``‖W − (Q(W) − z)·s‖_p`` with ``p < 1`` (robust to the few
large errors), alternating

    W_e ← shrink_p(W − (Q − z)·s, β)          (the sparse error, generalised soft threshold)
    z   ← mean_group(Q − (W − W_e) / s)        (closed-form zero point)

with ``Q = clip(round(W/s + z))`` and ``β`` growing by ``κ`` each step. No data needed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.numerics import grouped_view, stored_scale
from jaxquant.qarray import QArray, from_codes
from jaxquant.spec import SpecLike, as_spec


def shrink_lp(x: jax.Array, beta: float, p: float) -> jax.Array:
  """``sign(x) · max(|x| − |x|^(p−1) / β, 0)``: the proximal step of the ``ℓ_p`` penalty."""
  ax = jnp.abs(x)
  return jnp.sign(x) * jax.nn.relu(ax - jnp.power(ax + 1e-12, p - 1.0) / beta)


def hqq_quantize(
  w: jax.Array,
  spec: SpecLike,
  *,
  iters: int = 20,
  p: float = 0.7,
  beta: float = 10.0,
  kappa: float = 1.01,
) -> QArray:
  """HQQ of `w` under an asymmetric integer `spec` (groups or channels); float32 zero points."""
  spec = as_spec(spec)
  if spec.info.kind != "int" or spec.symmetric:
    raise ValueError(f"HQQ optimises zero points: use an asymmetric integer spec, got {spec}.")
  xv, axes = grouped_view(jnp.asarray(w, jnp.float32), spec)
  lo_q, hi_q = spec.int_range
  lo = jnp.min(xv, axis=axes, keepdims=True)
  hi = jnp.max(xv, axis=axes, keepdims=True)
  scale = stored_scale(jnp.maximum((hi - lo) / (hi_q - lo_q), 1e-8), spec)
  zero = lo_q - lo / scale

  def step(carry, _):
    z, b, best_z, best_err = carry
    q = jnp.clip(jnp.round(xv / scale + z), lo_q, hi_q)
    err = xv - (q - z) * scale
    w_e = shrink_lp(err, b, p)
    z_new = jnp.mean(q - (xv - w_e) / scale, axis=axes, keepdims=True)
    e = jnp.sum(jnp.abs(err), axis=axes, keepdims=True)
    better = e < best_err
    return (z_new, b * kappa, jnp.where(better, z, best_z), jnp.where(better, e, best_err)), None

  init = (zero, jnp.asarray(beta, jnp.float32), zero, jnp.full(zero.shape, jnp.inf))
  (z, _, best_z, best_err), _ = jax.lax.scan(step, init, None, length=iters)
  q = jnp.clip(jnp.round(xv / scale + z), lo_q, hi_q)
  final = jnp.sum(jnp.abs(xv - (q - z) * scale), axis=axes, keepdims=True)
  z = jnp.where(final < best_err, z, best_z)
  codes = jnp.clip(jnp.round(xv / scale + z), lo_q, hi_q).astype(spec.info.storage)
  return from_codes(codes.reshape(w.shape), scale, z.astype(jnp.float32), spec, np.dtype(w.dtype))
