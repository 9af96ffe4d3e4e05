"""Learned quantizers: LSQ step sizes for weights, PACT clipping for activations.

Both are ordinary parameters (leaves ``lsq_scale`` and ``pact_alpha`` beside a layer's
kernel), so an optax optimizer trains them with everything else.

LSQ (Esser et al., 2020): ``x̂ = clip(round(x/s), −Q, Q)·s`` with gradients
``∂x̂/∂x = 1`` inside the range (0 outside) and
``∂x̂/∂s = round(x/s) − x/s`` inside, ``±Q`` where clipped, scaled by ``1/√(N·Q)``
(N elements per step size) so the step size learns at the weights' pace.

PACT (Choi et al., 2018): activations clipped to ``[−α, α]`` and quantized with step ``α/Q``;
``∂x̂/∂x = 1`` for ``|x| < α``, ``∂x̂/∂α = sign(x)`` for ``|x| ≥ α``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jaxquant.numerics import compute_scale, grouped_view
from jaxquant.spec import QuantSpec, SpecLike, as_spec

LSQ = "lsq_scale"
PACT = "pact_alpha"


def _symmetric_bound(spec: QuantSpec) -> float:
  if spec.info.kind != "int" or not spec.symmetric:
    raise ValueError(f"Learned quantizers use symmetric integer grids; got {spec}.")
  return float(spec.info.qmax)


def _sum_to(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  axes = tuple(i for i, (a, b) in enumerate(zip(x.shape, shape)) if b == 1 and a != 1)
  return jnp.sum(x, axis=axes, keepdims=True).reshape(shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _lsq(x, s, bound):
  return jnp.clip(jnp.round(x / s), -bound, bound) * s


def _lsq_fwd(x, s, bound):
  return _lsq(x, s, bound), (x, s)


def _lsq_bwd(bound, res, g):
  x, s = res
  v = x / s
  inside = (v >= -bound) & (v <= bound)
  ds_elem = jnp.where(inside, jnp.round(v) - v, jnp.sign(v) * bound)
  n_per_scale = x.size / s.size
  grad_scale = 1.0 / math.sqrt(n_per_scale * bound)
  ds = _sum_to(g * ds_elem, s.shape) * grad_scale
  return jnp.where(inside, g, 0.0), ds.astype(s.dtype)


_lsq.defvjp(_lsq_fwd, _lsq_bwd)


def lsq_fake_quant(x: jax.Array, scale: jax.Array, spec: SpecLike) -> jax.Array:
  """LSQ fake quantization of `x` with the learned step `scale` (shaped like
  ``spec.scale_shape(x.shape)``)."""
  spec = as_spec(spec)
  bound = _symmetric_bound(spec)
  xv, _ = grouped_view(x.astype(jnp.float32), spec)
  return _lsq(xv, scale.astype(jnp.float32), bound).reshape(x.shape).astype(x.dtype)


def lsq_init_scale(w: jax.Array, spec: SpecLike) -> jax.Array:
  """Initial step: the round-to-nearest absmax scale, so training starts from RTN."""
  spec = as_spec(spec)
  _symmetric_bound(spec)
  scale, _ = compute_scale(w, spec)
  return scale


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _pact(x, alpha, bound):
  clipped = jnp.clip(x, -alpha, alpha)
  step = alpha / bound
  return jnp.round(clipped / step) * step


def _pact_fwd(x, alpha, bound):
  return _pact(x, alpha, bound), (x, alpha)


def _pact_bwd(bound, res, g):
  x, alpha = res
  outside = jnp.abs(x) >= alpha
  d_alpha = jnp.sum(jnp.where(outside, g * jnp.sign(x), 0.0))
  return jnp.where(outside, 0.0, g), jnp.reshape(d_alpha, alpha.shape).astype(alpha.dtype)


_pact.defvjp(_pact_fwd, _pact_bwd)


def pact_fake_quant(x: jax.Array, alpha: jax.Array, spec: SpecLike) -> jax.Array:
  """PACT: clip to ``[−α, α]`` with learned `alpha` (a scalar), then quantize, step ``α/Q``."""
  bound = _symmetric_bound(as_spec(spec))
  out = _pact(x.astype(jnp.float32), jnp.abs(alpha).astype(jnp.float32) + 1e-8, bound)
  return out.astype(x.dtype)
