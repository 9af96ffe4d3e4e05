"""W8A8 fake quantization computed on the integer path, with straight-through gradients.

For symmetric int8 activations (one scale per token, or one per tensor) and symmetric int8
weights whose scales are constant along the contraction (per output channel or per tensor),

    dot(fq(x), fq(w)) = Σ (s_x q_x)(s_w q_w) = s_x · s_w · Σ q_x q_w,

so the QAT forward can run the serving lowering, ``dot_general(i8, i8) -> i32`` and one
rescale, instead of a float dot of quantize-dequantized operands. Forward values equal the
float fake-quant path up to float rounding (the int32 sum is exact).

The backward pass is a straight-through estimator with the scales held constant and ``m`` the
in-range masks (zero where a static activation scale clipped; dynamic absmax never clips).
Two variants, chosen at trace time with `ste_backward`:

* ``"float"`` (default): the float operands the forward saw,
  ``∂L/∂x = m_x ⊙ (g · wᵀ)``, ``∂L/∂w = xᵀ · g`` — no dequantization pass in the backward,
  so a W8A8 QAT step costs what the int8 forward saves (the choice Qwix makes);
* ``"quantized"``: the quantize-dequantized operands, ``∂L/∂x = m_x ⊙ (g · fq(w)ᵀ)``,
  ``∂L/∂w = fq(x)ᵀ · g`` — exactly the gradient of the float fake-quant graph, for one extra
  elementwise pass per operand; residuals are kept as int8 codes (4× smaller).

The two differ by the int8 rounding of the operands (≤ 1/254 of each operand's range). The
backward contractions run in the operands' dtype (BF16 under a BF16 compute policy).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

from jaxquant.numerics import grouped_view, quantize_along
from jaxquant.ops.lowerings import int8_act_reason, rescale
from jaxquant.spec import QuantSpec

SteBackward = Literal["float", "quantized"]
_STE_BACKWARD: contextvars.ContextVar[SteBackward] = contextvars.ContextVar(
  "jaxquant_ste_backward", default="float"
)


@contextlib.contextmanager
def ste_backward(mode: SteBackward) -> Iterator[None]:
  """Within this context, fake W8A8 contractions traced take the `mode` backward::

  with jaxquant.ops.ste_backward("quantized"):
    step = make_train_step(...); step(state, batch)   # traced (first call) inside
  """
  if mode not in ("float", "quantized"):
    raise ValueError(f"ste_backward takes 'float' or 'quantized', got {mode!r}.")
  token = _STE_BACKWARD.set(mode)
  try:
    yield
  finally:
    _STE_BACKWARD.reset(token)


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
  if why := int8_act_reason(lhs_spec):
    return why
  if rhs_spec.format != "int8" or not rhs_spec.symmetric:
    return f"weights are {rhs_spec}, not symmetric int8"
  for side, spec in (("activations", lhs_spec), ("weights", rhs_spec)):
    if spec.rounding != "nearest" or spec.calibration != "absmax":
      return f"{side} use {spec.rounding} rounding / {spec.calibration} range"
  if rhs_spec.granularity == "tensor":
    return None
  if rhs_spec.granularity != "channel" or rhs_spec.resolved_axis(rhs_ndim) in rhs_contracting:
    return "weight scales vary along the contraction"
  if rhs_ndim - 1 != len(rhs_contracting):
    return "weights have several free axes"
  return None


def _in_range(x: jax.Array, scale: jax.Array, qmax: float) -> jax.Array:
  return jnp.abs(x.astype(jnp.float32)) <= (qmax + 0.5) * scale


def _quantize(x, spec: QuantSpec, axes, scale):
  """int8 codes and scale (`quantize_along`), constants to differentiation."""
  q, s, _ = quantize_along(lax.stop_gradient(x), spec, axes, scale=scale)
  return q, lax.stop_gradient(s)


def _forward(lhs, rhs, dims, lhs_spec, rhs_spec, lhs_axes, lhs_scale):
  q_l, s_l = _quantize(lhs, lhs_spec, lhs_axes, lhs_scale)
  q_r, s_r = _quantize(rhs, rhs_spec, grouped_view(rhs, rhs_spec)[1], None)
  acc = lax.dot_general(q_l, q_r, dims, preferred_element_type=jnp.int32)
  out = rescale(acc, s_l, s_r, tuple(lhs.shape), rhs.ndim, dims).astype(lhs.dtype)
  return out, (q_l, s_l, q_r, s_r)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _ste_dot(lhs, rhs, dims, lhs_spec, rhs_spec, lhs_axes, backward, lhs_scale):
  return _forward(lhs, rhs, dims, lhs_spec, rhs_spec, lhs_axes, lhs_scale)[0]


def _ste_dot_fwd(lhs, rhs, dims, lhs_spec, rhs_spec, lhs_axes, backward, lhs_scale):
  out, (q_l, s_l, q_r, s_r) = _forward(lhs, rhs, dims, lhs_spec, rhs_spec, lhs_axes, lhs_scale)
  # Dynamic absmax scales never clip (|x| <= 127·s), so only a static scale needs a mask.
  m_l = None if lhs_scale is None else _in_range(lhs, s_l, lhs_spec.info.qmax)
  if backward == "float":
    return out, ((lhs, rhs), m_l, lhs_scale)
  probes = (jnp.zeros((), lhs.dtype), jnp.zeros((), rhs.dtype))  # dtypes of the cotangents
  return out, ((q_l, s_l, q_r, s_r, probes), m_l, lhs_scale)


def _bwd_operands(backward: SteBackward, saved):
  if backward == "float":
    return saved
  q_l, s_l, q_r, s_r, (l_probe, r_probe) = saved
  return (
    (q_l.astype(jnp.float32) * s_l).astype(l_probe.dtype),
    (q_r.astype(jnp.float32) * s_r).astype(r_probe.dtype),
  )


def _ste_dot_bwd(dims, lhs_spec, rhs_spec, lhs_axes, backward, res, g):
  saved, m_l, lhs_scale = res
  fq_l, fq_r = _bwd_operands(backward, saved)
  _, vjp = jax.vjp(lambda a, b: lax.dot_general(a, b, dims), fq_l, fq_r)
  g_l, g_r = vjp(g.astype(jnp.result_type(fq_l, fq_r)))
  g_l, g_r = g_l.astype(fq_l.dtype), g_r.astype(fq_r.dtype)
  zero = jnp.zeros((), g_l.dtype)
  scale_ct = None if lhs_scale is None else jnp.zeros_like(lhs_scale)
  g_l = g_l if m_l is None else jnp.where(m_l, g_l, zero)
  return g_l, g_r, scale_ct


_ste_dot.defvjp(_ste_dot_fwd, _ste_dot_bwd)


def ste_int8_dot_general(
  lhs: jax.Array,
  rhs: jax.Array,
  dims: DotDims,
  lhs_spec: QuantSpec,
  rhs_spec: QuantSpec,
  lhs_axes: tuple[int, ...],
  lhs_scale: jax.Array | None = None,
  backward: SteBackward | None = None,
) -> jax.Array:
  """``dot_general(fq(lhs), fq(rhs))`` on the int8 path, straight-through gradients.

  Args:
    lhs: float activations; one scale per slice over `lhs_axes` (the contraction for per-token
      specs, all axes for per-tensor ones), or the static `lhs_scale`.
    rhs: float weights; scales per `rhs_spec` (per channel or tensor, constant along the
      contraction: check with `ste_int8_reason`).
    dims: normalised `lax.dot_general` dimension numbers.
    backward: ``"float"`` or ``"quantized"`` operands in the backward (module docstring);
      None takes the `ste_backward` context's (default ``"float"``).
  Returns:
    the contraction in `lhs`'s dtype.
  """
  backward = backward or _STE_BACKWARD.get()
  return _ste_dot(lhs, rhs, dims, lhs_spec, rhs_spec, tuple(lhs_axes), backward, lhs_scale)
