"""`qconv`: `lax.conv_general_dilated` with quantized operands.

The int8 path quantizes the input with one (dynamic or static) scale per tensor — a
convolution contracts over spatial windows as well as channels, so only a per-tensor input
scale factors out of the sum — and the kernel per output feature, then rescales the int32
accumulator. Other combinations dequantize the kernel in the graph.
"""

from __future__ import annotations

from typing import cast

import jax
import jax.numpy as jnp
from jax import lax

from jaxquant.numerics import fake_quant_along, quantize, quantize_along
from jaxquant.ops.dot import Lowering, Mode, float_weights
from jaxquant.qarray import QArray
from jaxquant.spec import QuantSpec, SpecLike, as_spec


def _conv_lowering(rhs, rhs_out_dim: int, lhs_spec: QuantSpec | None, mode: Mode) -> Lowering:
  if mode == "fake":
    return Lowering("float", "fake quantization")
  if not isinstance(rhs, QArray):
    return Lowering("float", "float kernel")
  if lhs_spec is None:
    return Lowering("dequant", f"weight-only {rhs.spec}")
  spec = rhs.spec
  ok = (
    spec.format == "int8"
    and spec.symmetric
    and spec.granularity in ("channel", "tensor")
    and rhs.scale is not None
    and all(d == 1 for i, d in enumerate(rhs.scale.shape) if i != rhs_out_dim)
    and lhs_spec.format == "int8"
    and lhs_spec.symmetric
    and lhs_spec.granularity == "tensor"
  )
  if ok:
    return Lowering("int8", "i8 x i8 -> i32 convolution, per-tensor input scale")
  return Lowering("dequant", "needs int8 per-output-feature kernel and per-tensor int8 input")


def qconv(
  lhs: jax.Array,
  rhs,
  window_strides,
  padding,
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers=None,
  feature_group_count: int = 1,
  batch_group_count: int = 1,
  precision=None,
  preferred_element_type=None,
  *,
  lhs_spec: SpecLike | None = None,
  rhs_spec: SpecLike | None = None,
  lhs_scale: jax.Array | None = None,
  lhs_zero_point: jax.Array | None = None,
  mode: Mode = "serve",
  out_dtype=None,
  **kwargs,
) -> jax.Array:
  """Drop-in for `lax.conv_general_dilated` (same positional arguments) with quantization."""
  del kwargs
  lhs_spec, rhs_spec = as_spec(lhs_spec), as_spec(rhs_spec)
  out_dtype = out_dtype or preferred_element_type or lhs.dtype
  rhs_shape = rhs.shape if isinstance(rhs, QArray) else jnp.shape(rhs)
  dn = lax.conv_dimension_numbers(lhs.shape, rhs_shape, dimension_numbers)
  if mode == "serve" and rhs_spec is not None and not isinstance(rhs, QArray):
    rhs = quantize(rhs, rhs_spec)
  lowering = _conv_lowering(rhs, dn.rhs_spec[0], lhs_spec, mode)
  conv = lambda a, b, **kw: lax.conv_general_dilated(
    a,
    b,
    window_strides,
    padding,
    lhs_dilation,
    rhs_dilation,
    dn,
    feature_group_count,
    batch_group_count,
    **kw,
  )
  if lowering.name == "int8":
    act = cast(QuantSpec, lhs_spec)  # `_conv_lowering` picks int8 only with an input spec
    q_lhs, s_lhs, _ = quantize_along(lhs, act, tuple(range(lhs.ndim)), scale=lhs_scale)
    acc = conv(q_lhs, rhs.values, preferred_element_type=jnp.int32)
    s_rhs = rhs.scale.reshape(-1)
    shape = [1] * acc.ndim
    shape[dn.out_spec[1]] = s_rhs.shape[0]
    out = acc.astype(jnp.float32) * jnp.reshape(s_lhs, ()) * s_rhs.reshape(shape)
    return out.astype(out_dtype)
  w = float_weights(rhs, rhs_spec, lhs.dtype)
  x = lhs
  if lhs_spec is not None:
    axes = tuple(range(lhs.ndim)) if lhs_spec.granularity == "tensor" else (dn.lhs_spec[1],)
    x = fake_quant_along(lhs, lhs_spec, axes, scale=lhs_scale, zero_point=lhs_zero_point)
  out = conv(
    x, w.astype(x.dtype), precision=precision, preferred_element_type=preferred_element_type
  )
  return out.astype(out_dtype)
