"""The four steps of quantization as pure, jit-able functions.

1. range: ``[lo, hi]`` per scale group (`jaxquant.calibration`);
2. scale: symmetric ``Δ = max(|lo|, |hi|) / qmax`` on the narrow grid ``[-qmax, qmax]``;
   asymmetric ``Δ = (hi - lo) / (qmax - qmin)`` and ``z = qmin - round(lo / Δ)``, with
   ``lo <= 0 <= hi`` so that 0.0 is always exactly representable;
3. map: ``q = clip(round(x / Δ) + z, qmin, qmax)``;
4. keep: ``x̂ = (q - z) · Δ``.

FP8 formats scale ``x / Δ`` into the dtype's finite range and cast (round to nearest even);
NF4 stores the index of the nearest of 16 normal-quantile levels in ``[-1, 1]``, with
``Δ = absmax``; ``bf16`` is a plain cast.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import cast

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxquant import calibration
from jaxquant.qarray import QArray, codes, decode, dequantize, from_codes
from jaxquant.spec import NF4_CODE, QuantSpec, SpecLike, as_spec, check_group_size

__all__ = [
  "check_finite",
  "check_input",
  "codes",
  "compute_scale",
  "dequantize",
  "fake_quant",
  "fake_quant_along",
  "find_range",
  "grouped_view",
  "quantization_error",
  "quantize",
  "quantize_along",
  "scale_from_range",
  "static_act_scale",
  "stored_scale",
]

_TINY = float(np.finfo(np.float32).tiny)
_NF4_MIDPOINTS = (NF4_CODE[1:] + NF4_CODE[:-1]) / 2


# --------------------------------------------------------------------------- validation
def check_input(x, path: str = "x") -> None:
  """TypeError unless `x` is a real floating array."""
  dtype = np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype
  if not jnp.issubdtype(dtype, jnp.floating):
    kind = "complex" if jnp.issubdtype(dtype, jnp.complexfloating) else dtype.name
    raise TypeError(
      f"{path}: cannot quantize a {kind} array (dtype {dtype.name}); quantization maps real "
      "floating values to a grid. Cast it to float32 first, or exclude it with a rule whose "
      "weight spec is None."
    )


def check_finite(x, path: str = "x") -> None:
  """ValueError if a concrete `x` holds NaN or Inf (skipped for traced values)."""
  if isinstance(x, jax.core.Tracer):
    return
  arr = np.asarray(jax.device_get(x), dtype=np.float32)
  n_nan, n_inf = int(np.isnan(arr).sum()), int(np.isinf(arr).sum())
  if n_nan or n_inf:
    raise ValueError(
      f"{path}: contains {n_nan} NaN and {n_inf} Inf values; quantizing it would spread them "
      "over its whole scale group. Repair the tensor, or exclude this path with a rule "
      "whose weight spec is None."
    )


# --------------------------------------------------------------------------- step 1: range
def grouped_view(x: jax.Array, spec: QuantSpec) -> tuple[jax.Array, tuple[int, ...]]:
  """Reshapes `x` so one scale covers each slice along the returned reduction axes.

  Only ``group`` granularity reshapes: axis ``a`` of size n becomes ``(n // G, G)``.
  """
  ndim = x.ndim
  if spec.granularity == "tensor" or ndim == 0:
    return x, tuple(range(ndim))
  axis = spec.resolved_axis(ndim)
  if spec.granularity == "channel":
    return x, tuple(a for a in range(ndim) if a != axis)
  if spec.granularity == "token":
    return x, (axis,)
  check_group_size(spec, x.shape)
  n = x.shape[axis]
  group = cast(int, spec.group_size)  # QuantSpec.__post_init__: a positive int for "group"
  view = x.reshape(x.shape[:axis] + (n // group, group) + x.shape[axis + 1 :])
  return view, (axis + 1,)


def find_range(xv: jax.Array, axes: tuple[int, ...], spec: QuantSpec) -> calibration.Range:
  """``(lo, hi)`` over `axes` by the spec's calibration method."""
  if spec.calibration == "percentile":
    # QuantSpec.__post_init__ sets a float percentile for this calibration, and always a bool
    # `symmetric`.
    percentile = cast(float, spec.percentile)
    return calibration.percentile_range(xv, axes, percentile, cast(bool, spec.symmetric))
  full = (
    calibration.minmax_range(xv, axes) if not spec.symmetric else calibration.absmax_range(xv, axes)
  )
  if spec.calibration == "mse":
    return calibration.mse_range(xv, axes, full, functools.partial(_qdq_range, spec=spec))
  return full


# --------------------------------------------------------------------------- step 2: scale
def stored_scale(scale: jax.Array, spec: QuantSpec) -> jax.Array:
  """`scale` as the spec's scale dtype holds it: clipped into the dtype's normal range, then
  rounded **up**, so that the stored scale never clips the range it was computed from (a range
  too small for the dtype gets its smallest normal scale: fewer levels, never a zero scale)."""
  dtype = spec.scale_storage
  if dtype == np.float32:
    return scale
  finfo = ml_dtypes.finfo(dtype)
  scale = jnp.clip(scale, float(finfo.smallest_normal), float(finfo.max))
  nearest = scale.astype(dtype)
  up = jnp.nextafter(nearest, jnp.asarray(jnp.inf, dtype))
  return jnp.where(nearest.astype(jnp.float32) < scale, up, nearest)


def scale_from_range(
  lo: jax.Array, hi: jax.Array, spec: QuantSpec
) -> tuple[jax.Array, jax.Array | None]:
  """``(scale, zero_point)`` for the range, the scale as stored (`stored_scale`) and the zero
  point from it; zero_point is None when symmetric."""
  info = spec.info
  lo = jnp.minimum(lo, 0.0).astype(jnp.float32)
  hi = jnp.maximum(hi, 0.0).astype(jnp.float32)
  if spec.symmetric:
    amax = jnp.maximum(-lo, hi)
    # Multiply by the reciprocal constant: XLA rewrites x / c that way under jit anyway,
    # and eager and jitted results must agree to the bit.
    scale = amax * (1.0 if info.kind == "codebook" else 1.0 / info.qmax)
    return stored_scale(jnp.where(scale >= _TINY, scale, 1.0), spec), None
  scale = (hi - lo) * (1.0 / (info.qmax - info.qmin))
  scale = stored_scale(jnp.where(scale >= _TINY, scale, 1.0), spec)
  zero_point = jnp.clip(info.qmin - jnp.round(lo / scale.astype(jnp.float32)), info.qmin, info.qmax)
  return scale, zero_point.astype(info.storage)


def compute_scale(x: jax.Array, spec: SpecLike) -> tuple[jax.Array, jax.Array | None]:
  """``(scale, zero_point)`` of `x` under `spec`, shaped like ``spec.scale_shape(x.shape)``."""
  spec = as_spec(spec)
  xv, axes = grouped_view(jnp.asarray(x, jnp.float32), spec)
  return scale_from_range(*find_range(xv, axes, spec), spec)


# --------------------------------------------------------------------------- step 3/4: map
def _encode(xv, scale, zero_point, spec: QuantSpec, noise=None):
  """Floats (grouped view) to stored codes."""
  info = spec.info
  v = xv / scale.astype(jnp.float32)
  if info.kind == "int":
    rounded = jnp.round(v) if noise is None else jnp.floor(v + noise)
    if zero_point is not None:
      rounded = rounded + zero_point.astype(jnp.float32)
    return jnp.clip(rounded, *spec.int_range).astype(info.storage)
  if info.kind == "float":
    return jnp.clip(v, info.qmin, info.qmax).astype(info.storage)
  # codebook: index of the nearest level
  idx = jnp.searchsorted(jnp.asarray(_NF4_MIDPOINTS), jnp.clip(v, -1.0, 1.0))
  return idx.astype(jnp.uint8)


def _qdq_range(xv, lo, hi, spec: QuantSpec):
  """Quantize-dequantize `xv` with the scale that the range ``[lo, hi]`` gives."""
  scale, zero_point = scale_from_range(lo, hi, spec)
  return decode(_encode(xv, scale, zero_point, spec), scale, zero_point, spec)


def _in_range_mask(xv, scale, zero_point, spec: QuantSpec):
  """True where `xv` lies inside the representable range (the STE passes gradient there)."""
  info = spec.info
  v = xv / scale.astype(jnp.float32)
  if info.kind == "int":
    if zero_point is not None:
      v = v + zero_point.astype(jnp.float32)
    lo, hi = spec.int_range
    # Codes within half a step of the bounds round onto them: not clipped.
    return (v >= lo - 0.5) & (v <= hi + 0.5)
  bound = 1.0 if info.kind == "codebook" else info.qmax
  return jnp.abs(v) <= bound * (1.0 + 1e-6)


def _noise(key, shape, spec: QuantSpec):
  if spec.rounding != "stochastic":
    return None
  if key is None:
    raise ValueError(
      f"Spec {spec} rounds stochastically and needs a PRNG key: pass key=jax.random.key(...)."
    )
  return jax.random.uniform(key, shape, jnp.float32)


def _given_or_computed(xv, axes, spec, scale, zero_point):
  if scale is None:
    return scale_from_range(*find_range(xv, axes, spec), spec)
  scale = stored_scale(jnp.asarray(scale, jnp.float32), spec)
  if zero_point is None and not spec.symmetric:
    raise ValueError(f"Spec {spec} is asymmetric: pass zero_point together with scale.")
  return scale, zero_point


def quantize(
  x: jax.typing.ArrayLike,
  spec: SpecLike,
  *,
  key: jax.Array | None = None,
  scale: jax.Array | None = None,
  zero_point: jax.Array | None = None,
  pack: bool = True,
  path: str = "x",
  batch_dims: int = 0,
) -> QArray:
  """Quantizes `x` to a `QArray` (steps 1–4).

  Args:
    x: a real floating array of any shape.
    spec: a `QuantSpec` or its string form.
    key: PRNG key, required for stochastic rounding.
    scale, zero_point: a static (calibrated) scale to use instead of the range of `x`;
      shaped like ``spec.scale_shape(x.shape)``.
    pack: store 4-bit codes two per byte (``uint8[..., ceil(n/2)]``).
    path: the parameter path named in error messages.
    batch_dims: leading axes of `x` that index a stack (of layers): every slice is quantized
      on its own, as ``jax.vmap`` would (`scale`, `zero_point` and `key` then carry them too).
  """
  spec = as_spec(spec)
  check_input(x, path)
  x = jnp.asarray(x)
  check_finite(x, path)
  if batch_dims:
    one = lambda xi, ki, si, zi: quantize(
      xi, spec, key=ki, scale=si, zero_point=zi, pack=pack, path=path, batch_dims=batch_dims - 1
    )
    return jax.vmap(one)(x, _split_key(key, x.shape[0]), scale, zero_point)
  check_group_size(spec, x.shape, path)
  dtype = np.dtype(x.dtype)
  if spec.is_cast:
    return QArray(x.astype(spec.info.storage), None, None, spec, dtype)
  xv, axes = grouped_view(x.astype(jnp.float32), spec)
  scale, zero_point = _given_or_computed(xv, axes, spec, scale, zero_point)
  q = _encode(xv, scale, zero_point, spec, _noise(key, xv.shape, spec)).reshape(x.shape)
  return from_codes(q, scale, zero_point, trailing_axes(spec, x.ndim), dtype, pack)


def _split_key(key: jax.Array | None, n: int) -> jax.Array | None:
  return None if key is None else jax.random.split(key, n)


def trailing_axes(spec: QuantSpec, ndim: int) -> QuantSpec:
  """`spec` with an explicit axis counted from the end (``channel@0`` of a 2-D tensor becomes
  ``channel@-2``), so that it still names the same axis once batch axes are prepended
  (`jax.vmap`, stacked layers)."""
  if spec.axis is None or spec.axis < 0 or spec.granularity == "tensor" or ndim == 0:
    return spec
  return dataclasses.replace(spec, axis=spec.resolved_axis(ndim) - ndim)


# --------------------------------------------------------------------------- fake quant
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ste_qdq(spec: QuantSpec, xv, scale, zero_point, noise):
  return decode(_encode(xv, scale, zero_point, spec, noise), scale, zero_point, spec)


def _ste_qdq_fwd(spec, xv, scale, zero_point, noise):
  out = _ste_qdq(spec, xv, scale, zero_point, noise)
  return out, (_in_range_mask(xv, scale, zero_point, spec), scale, zero_point, noise)


def _ste_qdq_bwd(spec, res, g):
  mask, scale, zero_point, noise = res
  zeros = lambda a: None if a is None else jnp.zeros_like(a)
  return (jnp.where(mask, g, 0.0), zeros(scale), zeros(zero_point), zeros(noise))


_ste_qdq.defvjp(_ste_qdq_fwd, _ste_qdq_bwd)


@jax.custom_vjp
def _ste_cast(x, dtype_probe):
  return x.astype(dtype_probe.dtype).astype(x.dtype)


_ste_cast.defvjp(
  lambda x, probe: (_ste_cast(x, probe), probe),
  lambda probe, g: (g, jnp.zeros_like(probe)),
)


def fake_quant(
  x: jax.Array,
  spec: SpecLike,
  *,
  key: jax.Array | None = None,
  scale: jax.Array | None = None,
  zero_point: jax.Array | None = None,
  batch_dims: int = 0,
) -> jax.Array:
  """``dequantize(quantize(x))`` in `x`'s dtype, with a straight-through gradient.

  The gradient is the identity where `x` rounds onto the grid without clipping,
  ``(qmin - z - 1/2)Δ <= x <= (qmax - z + 1/2)Δ``, and zero where it is clipped; the scale is
  treated as a constant (``stop_gradient``). `batch_dims` leading axes are a stack whose slices
  are quantized on their own (see `quantize`).
  """
  spec = as_spec(spec)
  check_input(x)
  if batch_dims:
    one = lambda xi, ki, si, zi: fake_quant(
      xi, spec, key=ki, scale=si, zero_point=zi, batch_dims=batch_dims - 1
    )
    return jax.vmap(one)(x, _split_key(key, x.shape[0]), scale, zero_point)
  if spec.is_cast:
    return _ste_cast(x, jnp.zeros((), spec.info.storage))
  xv, axes = grouped_view(jnp.asarray(x).astype(jnp.float32), spec)
  scale, zero_point = jax.lax.stop_gradient(_given_or_computed(xv, axes, spec, scale, zero_point))
  out = _ste_qdq(spec, xv, scale, zero_point, _noise(key, xv.shape, spec))
  return out.reshape(x.shape).astype(x.dtype)


def quantization_error(x: jax.Array, q: QArray) -> dict[str, float]:
  """Relative error ``||x - x̂|| / ||x||`` and SNR ``10 log10(||x||² / ||x - x̂||²)`` in dB."""
  ref = np.asarray(jax.device_get(x), np.float64)
  err = ref - np.asarray(jax.device_get(dequantize(q, jnp.float32)), np.float64)
  signal, noise = float(np.sum(ref * ref)), float(np.sum(err * err))
  rel = math.sqrt(noise / signal) if signal > 0 else 0.0
  snr = 10 * math.log10(signal / noise) if noise > 0 else math.inf
  return {"rel_error": rel, "snr_db": snr}


def quantize_float_zero(x: jax.Array, spec: SpecLike, *, pack: bool = True) -> QArray:
  """Min-max round to nearest with a *float* zero point (llama.cpp's Q4_1; HQQ's start).

  Per scale group ``lo, hi = min x, max x`` (zero need not lie inside), ``Δ = (hi − lo) /
  (qmax − qmin)`` rounded to the nearest stored scale, ``z = qmin − lo / Δ`` kept in float32,
  codes ``clip(round(x / Δ + z))``: ``x ≈ (q − z)·Δ``. Unlike an integer zero point, ``z`` is
  not rounded, so the grid starts exactly at ``lo``. Needs an asymmetric integer spec.
  """
  spec = as_spec(spec)
  if spec.info.kind != "int" or spec.symmetric:
    raise ValueError(f"quantize_float_zero needs an asymmetric integer spec, got {spec}.")
  check_input(x)
  xv, axes = grouped_view(jnp.asarray(x, jnp.float32), spec)
  lo, hi = jnp.min(xv, axes, keepdims=True), jnp.max(xv, axes, keepdims=True)
  info = spec.info
  step = (hi - lo) * (1.0 / (info.qmax - info.qmin))
  step = jnp.where(step >= _TINY, step, 1.0)
  finfo = jnp.finfo(spec.scale_storage)
  scale = jnp.clip(step, float(finfo.smallest_normal), float(finfo.max)).astype(spec.scale_storage)
  zero = (info.qmin - lo / scale.astype(jnp.float32)).astype(jnp.float32)
  q = jnp.clip(jnp.round(xv / scale.astype(jnp.float32) + zero), *spec.int_range)
  q = q.astype(info.storage).reshape(jnp.shape(x))
  return from_codes(q, scale, zero, trailing_axes(spec, jnp.ndim(x)), jnp.asarray(x).dtype, pack)


# --------------------------------------------------------------------------- explicit axes
def quantize_along(
  x: jax.Array,
  spec: SpecLike,
  axes: tuple[int, ...],
  *,
  scale: jax.Array | None = None,
  zero_point: jax.Array | None = None,
):
  """``(codes, scale, zero_point)`` with one scale per slice over `axes` (keepdims).

  Used for activations, whose scale groups follow the contraction rather than the spec's
  granularity: per token means "reduce over the contracting axes" whatever their position.
  """
  spec = as_spec(spec)
  xf = jnp.asarray(x).astype(jnp.float32)
  scale, zero_point = _given_or_computed(xf, tuple(axes), spec, scale, zero_point)
  return _encode(xf, scale, zero_point, spec), scale, zero_point


def fake_quant_along(
  x: jax.Array,
  spec: SpecLike,
  axes: tuple[int, ...],
  *,
  scale: jax.Array | None = None,
  zero_point: jax.Array | None = None,
) -> jax.Array:
  """`fake_quant` with one scale per slice over `axes`; straight-through gradient."""
  spec = as_spec(spec)
  xf = jnp.asarray(x).astype(jnp.float32)
  scale, zero_point = jax.lax.stop_gradient(
    _given_or_computed(xf, tuple(axes), spec, scale, zero_point)
  )
  return _ste_qdq(spec, xf, scale, zero_point, None).astype(x.dtype)


def static_act_scale(stats: dict, spec: SpecLike):
  """``(scale, zero_point)`` of a static (calibrated) activation quantizer from its stats."""
  spec = as_spec(spec)
  lo, hi = calibration.act_range(stats, spec, functools.partial(_qdq_range, spec=spec))
  return scale_from_range(lo, hi, spec)
