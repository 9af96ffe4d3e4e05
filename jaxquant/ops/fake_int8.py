"""W8A8 fake quantization computed on the integer path, with straight-through gradients.

For symmetric int8 activations (one scale per token, or one per tensor) and symmetric int8
weights whose scales are constant along the contraction (per output channel or per tensor),

    dot(fq(x), fq(w)) = Σ (s_x q_x)(s_w q_w) = s_x · s_w · Σ q_x q_w,

so the QAT forward can run the serving lowering, ``dot_general(i8, i8) -> i32`` and one
rescale, instead of a float dot of quantize-dequantized operands. The backward pass is the
straight-through estimator of the float formulation:

    ∂L/∂x = m_x ⊙ (g · fq(w)ᵀ),    ∂L/∂w = m_w ⊙ (fq(x)ᵀ · g),

with ``m`` the in-range masks (zero where a value was clipped) and the scales held constant.
The backward contractions run in the operands' dtype (BF16 under a BF16 compute policy).
Forward values equal the float fake-quant path up to float rounding (the int32 sum is exact).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxquant.numerics import quantize_along
from jaxquant.spec import QuantSpec

DotDims = tuple[tuple[tuple[int, ...], tuple[int, ...]], tuple[tuple[int, ...], tuple[int, ...]]]


def ste_int8_reason(
    lhs_spec: QuantSpec | None,
    rhs_spec: QuantSpec | None,
    rhs_ndim: int,
    rhs_contracting: tuple[int, ...],
) -> str | None:
  """Why a fake-mode contraction cannot run on the integer path (None if it can)."""
  if lhs_spec is None or rhs_spec is None:
    return "not both operands quantized"
  for side, spec in (("activations", lhs_spec), ("weights", rhs_spec)):
    if spec.format != "int8" or not spec.symmetric:
      return f"{side} are {spec}, not symmetric int8"
    if spec.rounding != "nearest" or spec.calibration != "absmax":
      return f"{side} use {spec.rounding} rounding / {spec.calibration} range"
  if lhs_spec.granularity not in ("token", "tensor"):
    return f"activation granularity {lhs_spec.granularity} varies along the contraction"
  if rhs_spec.granularity == "tensor":
    return None
  if rhs_spec.granularity != "channel" or rhs_spec.resolved_axis(rhs_ndim) in rhs_contracting:
    return "weight scales vary along the contraction"
  if rhs_ndim - 1 != len(rhs_contracting):
    return "weights have several free axes"
  return None


def _weight_axes(spec: QuantSpec, ndim: int) -> tuple[int, ...]:
  if spec.granularity == "tensor":
    return tuple(range(ndim))
  axis = spec.resolved_axis(ndim)
  return tuple(a for a in range(ndim) if a != axis)


def _in_range(x: jax.Array, scale: jax.Array, qmax: float) -> jax.Array:
  return jnp.abs(x.astype(jnp.float32)) <= (qmax + 0.5) * scale


def _quantize(x, spec: QuantSpec, axes, scale):
  q, s, _ = quantize_along(lax.stop_gradient(x), spec, axes, scale=scale)
  return q, lax.stop_gradient(s)


def _forward(lhs, rhs, dims, lhs_spec, rhs_spec, lhs_axes, lhs_scale):
  q_l, s_l = _quantize(lhs, lhs_spec, lhs_axes, lhs_scale)
  q_r, s_r = _quantize(rhs, rhs_spec, _weight_axes(rhs_spec, rhs.ndim), None)
  acc = lax.dot_general(q_l, q_r, dims, preferred_element_type=jnp.int32)
  out = _rescale(acc, s_l, s_r, lhs.ndim, rhs.ndim, dims).astype(lhs.dtype)
  return out, (q_l, s_l, q_r, s_r)


def _rescale(acc, s_l, s_r, lhs_ndim, rhs_ndim, dims) -> jax.Array:
  """``acc · s_l · s_r`` with the scales moved to dot_general's output layout."""
  (lc, rc), (lb, rb) = dims
  lfree = tuple(a for a in range(lhs_ndim) if a not in lc and a not in lb)
  rfree = tuple(a for a in range(rhs_ndim) if a not in rc and a not in rb)
  s_l = jnp.transpose(s_l, lb + lfree + lc).reshape(
      tuple(s_l.shape[a] for a in lb + lfree) + (1,) * len(rfree))
  s_r = jnp.transpose(s_r, rb + rfree + rc).reshape(
      tuple(s_r.shape[a] for a in rb) + (1,) * len(lfree) + tuple(s_r.shape[a] for a in rfree))
  return acc.astype(jnp.float32) * s_l * s_r


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _ste_dot(lhs, rhs, dims, lhs_spec, rhs_spec, lhs_axes, lhs_scale):
  return _forward(lhs, rhs, dims, lhs_spec, rhs_spec, lhs_axes, lhs_scale)[0]


def _ste_dot_fwd(lhs, rhs, dims, lhs_spec, rhs_spec, lhs_axes, lhs_scale):
  out, (q_l, s_l, q_r, s_r) = _forward(lhs, rhs, dims, lhs_spec, rhs_spec, lhs_axes, lhs_scale)
  m_l = _in_range(lhs, s_l, lhs_spec.info.qmax)
  m_r = _in_range(rhs, s_r, rhs_spec.info.qmax)
  probes = (jnp.zeros((), lhs.dtype), jnp.zeros((), rhs.dtype))  # dtypes of the cotangents
  return out, (q_l, s_l, m_l, q_r, s_r, m_r, probes, lhs_scale)


def _ste_dot_bwd(dims, lhs_spec, rhs_spec, lhs_axes, res, g):
  q_l, s_l, m_l, q_r, s_r, m_r, (l_probe, r_probe), lhs_scale = res
  fq_l = (q_l.astype(jnp.float32) * s_l).astype(l_probe.dtype)
  fq_r = (q_r.astype(jnp.float32) * s_r).astype(r_probe.dtype)
  _, vjp = jax.vjp(lambda a, b: lax.dot_general(a, b, dims), fq_l, fq_r)
  g_l, g_r = vjp(g.astype(jnp.result_type(fq_l, fq_r)))
  g_l, g_r = g_l.astype(l_probe.dtype), g_r.astype(r_probe.dtype)
  zero = jnp.zeros((), g_l.dtype)
  scale_ct = None if lhs_scale is None else jnp.zeros_like(lhs_scale)
  return jnp.where(m_l, g_l, zero), jnp.where(m_r, g_r, zero.astype(g_r.dtype)), scale_ct


_ste_dot.defvjp(_ste_dot_fwd, _ste_dot_bwd)


def ste_int8_dot_general(
    lhs: jax.Array,
    rhs: jax.Array,
    dims: DotDims,
    lhs_spec: QuantSpec,
    rhs_spec: QuantSpec,
    lhs_axes: tuple[int, ...],
    lhs_scale: jax.Array | None = None,
) -> jax.Array:
  """``dot_general(fq(lhs), fq(rhs))`` on the int8 path, straight-through gradients.

  Args:
    lhs: float activations; one scale per slice over `lhs_axes` (the contraction for per-token
      specs, all axes for per-tensor ones), or the static `lhs_scale`.
    rhs: float weights; scales per `rhs_spec` (per channel or tensor, constant along the
      contraction: check with `ste_int8_reason`).
    dims: normalised `lax.dot_general` dimension numbers.
  Returns:
    the contraction in `lhs`'s dtype.
  """
  return _ste_dot(lhs, rhs, dims, lhs_spec, rhs_spec, tuple(lhs_axes), lhs_scale)
