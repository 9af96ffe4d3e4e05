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

Every finite input gives finite output, up to the largest float32: a range wider than float32
(``hi − lo`` of ±3.4e38) is split, ``x / Δ`` does not underflow for ``Δ`` past ``1 / tiny``,
and grid points beyond the largest value of the tensor's dtype (an asymmetric grid reaches half
a step past ``hi``) saturate there (`qarray.saturate`). A 16-bit scale that cannot hold the
range is an error (`check_scale`), never a silent clip.
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
from jaxquant.qarray import (
  QArray,
  codes,
  decode,
  dequantize,
  from_codes,
  saturate,
  split_axis,
)
from jaxquant.spec import NF4_CODE, QuantSpec, SpecLike, as_spec, check_group_size

__all__ = [
  "abs_max",
  "check_finite",
  "check_input",
  "check_nonempty",
  "check_scale",
  "check_scale_range",
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
  "scale_limit",
  "static_act_scale",
  "stored_scale",
]

_TINY = float(np.finfo(np.float32).tiny)
# Scales past 2**64 are divided by 2**64 (with the values) before `x / Δ`: XLA divides by a
# broadcast divisor as a multiplication by its reciprocal, and ``1 / Δ`` is subnormal (flushed
# to zero) for ``Δ > 1 / tiny ≈ 8.5e37``, e.g. the NF4 scale of a 1e38.
_BIG_SCALE = 2.0**64
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
  """ValueError if a concrete `x` holds NaN or Inf (skipped for traced values).

  A `jax.Array` is checked where it lives (a sharded one shard by shard, reduced on device):
  only the flag, and the counts when it fails, come back to the host.
  """
  if isinstance(x, jax.core.Tracer):
    return
  if isinstance(x, jax.Array):
    if bool(jax.device_get(jnp.all(jnp.isfinite(x)))):
      return
    n_nan = int(jax.device_get(jnp.sum(jnp.isnan(x))))
    n_inf = int(jax.device_get(jnp.sum(jnp.isinf(x))))
  else:
    arr = np.asarray(x, dtype=np.float32)
    n_nan, n_inf = int(np.isnan(arr).sum()), int(np.isinf(arr).sum())
  if n_nan or n_inf:
    raise ValueError(
      f"{path}: contains {n_nan} NaN and {n_inf} Inf values; quantizing it would spread them "
      "over its whole scale group. Repair the tensor, or exclude this path with a rule "
      "whose weight spec is None."
    )


def abs_max(x) -> float:
  """``max |x|`` as a Python float; a `jax.Array` is reduced on its devices (no host copy)."""
  if isinstance(x, jax.Array):
    return float(jax.device_get(jnp.max(jnp.abs(x.astype(jnp.float32)))))
  return float(np.max(np.abs(np.asarray(x, np.float32))))


def check_nonempty(x, path: str = "x") -> None:
  """ValueError if `x` has no elements: there is no range to take a scale from."""
  shape = tuple(np.shape(x))
  if math.prod(shape) == 0:
    raise ValueError(
      f"{path}: cannot quantize an empty array (shape {shape}): it has no values to take a "
      "scale from. Leave it as it is: quantize_params, fake_quant_params and plan keep "
      "zero-size parameters unchanged."
    )


def scale_limit(spec: QuantSpec) -> float:
  """The widest range the spec's stored scale covers: ``max |x|`` (symmetric) or
  ``max x − min x`` (asymmetric) at the scale dtype's largest finite value ``Δmax``, i.e.
  ``Δmax · qmax``, ``Δmax`` for NF4, ``Δmax · (qmax − qmin)`` with a zero point."""
  info = spec.info
  dmax = float(ml_dtypes.finfo(spec.scale_storage).max)
  if not spec.symmetric:
    return dmax * (info.qmax - info.qmin)
  return dmax * (1.0 if info.kind == "codebook" else info.qmax)


def _scale_error(x, spec: QuantSpec, path: str) -> ValueError:
  """The error for a range that `spec`'s 16-bit scale cannot hold."""
  amax = abs_max(x)
  dtype = spec.scale_storage
  covers = "max |x|" if spec.symmetric else "max x − min x"
  wider = ("bf16", "f32") if spec.scale_dtype == "f16" else ("f32",)
  fixes = " or ".join(f"scale={d} ('{dataclasses.replace(spec, scale_dtype=d)}')" for d in wider)
  return ValueError(
    f"{path}: max |x| = {amax:.6g} does not fit {spec}: a {dtype.name} scale holds at most "
    f"{float(ml_dtypes.finfo(dtype).max):.6g}, which covers {covers} <= "
    f"{scale_limit(spec):.6g} per scale group, and a clipped scale would silently distort "
    f"this tensor. Use {fixes}."
  )


def check_scale(scale, x, spec: QuantSpec, path: str = "x") -> None:
  """ValueError if a concrete stored `scale` of finite `x` is not finite: the range did not fit
  the spec's 16-bit scale dtype (`stored_scale` stores such a scale as inf). Skipped for traced
  scales."""
  if scale is None or spec.scale_dtype == "f32" or isinstance(scale, jax.core.Tracer):
    return
  if isinstance(scale, jax.Array):
    finite = bool(jax.device_get(jnp.all(jnp.isfinite(scale))))
  else:
    finite = bool(np.all(np.isfinite(np.asarray(scale, np.float32))))
  if not finite:
    raise _scale_error(x, spec, path)


def check_scale_range(x, spec: QuantSpec, path: str = "x", batch_dims: int = 0) -> None:
  """ValueError naming `path` if a concrete `x`'s range does not fit `spec`'s 16-bit scale,
  before any quantization: ``max |x|`` against `scale_limit` first, and the scales themselves
  only when that cannot tell (skipped for traced values and float32 scales)."""
  if spec.scale_dtype == "f32" or spec.is_cast or isinstance(x, jax.core.Tracer):
    return
  if math.prod(np.shape(x)) == 0:
    return
  amax = abs_max(x)  # on the array's own devices: only the number comes back
  reach = amax if spec.symmetric else 2.0 * amax  # max x − min x <= 2 max |x|, 0 in range
  if reach <= scale_limit(spec) * (1.0 - 2.0**-20):  # margin for the rounding of Δ
    return
  one = lambda xi: compute_scale(xi, spec)[0]
  for _ in range(batch_dims):
    one = jax.vmap(one)
  check_scale(one(jnp.asarray(x, jnp.float32)), x, spec, path)


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
  group = cast(int, spec.group_size)  # QuantSpec.__post_init__: a positive int for "group"
  view = split_axis(x, axis, group)
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
  """`scale` as the spec's scale dtype holds it: raised to at least the dtype's smallest
  normal, then rounded **up**, so that the stored scale never clips the range it was computed
  from (a range too small for the dtype gets its smallest normal scale: fewer levels, never a
  zero scale). A scale beyond the dtype's largest finite value (float16: 65504) becomes inf,
  never a clipped finite one: `quantize` raises for it on concrete values (`check_scale`), and
  under `jit` the group dequantizes to NaN, which `check_finite` and ``jax_debug_nans`` see."""
  dtype = spec.scale_storage
  if dtype == np.float32:
    return scale
  finfo = ml_dtypes.finfo(dtype)
  scale = jnp.maximum(scale, float(finfo.smallest_normal))
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
  scale = _span(lo, hi, 1.0 / (info.qmax - info.qmin))
  scale = stored_scale(jnp.where(scale >= _TINY, scale, 1.0), spec)
  zero_point = jnp.clip(info.qmin - jnp.round(_divide(lo, scale)), info.qmin, info.qmax)
  return scale, zero_point.astype(info.storage)


def _span(lo: jax.Array, hi: jax.Array, c: float) -> jax.Array:
  """``(hi − lo) · c``, as ``hi · c − lo · c`` where ``hi − lo`` overflows float32."""
  wide = hi - lo
  return jnp.where(jnp.isfinite(wide), wide * c, hi * c - lo * c)


def _divide(x: jax.Array, scale: jax.Array) -> jax.Array:
  """``x / Δ`` in float32, also for ``Δ`` whose reciprocal is subnormal (see `_BIG_SCALE`)."""
  scale = scale.astype(jnp.float32)
  shrink = jnp.where(scale > _BIG_SCALE, 1.0 / _BIG_SCALE, 1.0)
  return (x * shrink) / (scale * shrink)


def compute_scale(x: jax.Array, spec: SpecLike) -> tuple[jax.Array, jax.Array | None]:
  """``(scale, zero_point)`` of `x` under `spec`, shaped like ``spec.scale_shape(x.shape)``."""
  spec = as_spec(spec)
  check_nonempty(x)
  xv, axes = grouped_view(jnp.asarray(x, jnp.float32), spec)
  return scale_from_range(*find_range(xv, axes, spec), spec)


# --------------------------------------------------------------------------- step 3/4: map
def _encode(xv, scale, zero_point, spec: QuantSpec, noise=None):
  """Floats (grouped view) to stored codes."""
  info = spec.info
  v = _divide(xv, scale)
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
  v = _divide(xv, scale)
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

  Raises:
    ValueError: naming `path`, for an empty `x`, NaN or Inf in a concrete `x`, or a concrete
      range that the spec's 16-bit scale cannot hold (``float16`` tops out at 65504: ``max |x|``
      of 65504 for NF4, 8.3e6 for int8; the message gives the limit and suggests ``scale=bf16``
      or ``f32``). Under `jit` values are traced and nothing can raise: such a group's scale
      is stored as inf and dequantizes to NaN, never to silently clipped finite values.
  """
  spec = as_spec(spec)
  check_input(x, path)
  check_nonempty(x, path)
  x = jnp.asarray(x)
  if not 0 <= batch_dims < max(x.ndim, 1):
    raise ValueError(
      f"{path}: batch_dims={batch_dims} must be in [0, {max(x.ndim - 1, 0)}] for a "
      f"{x.ndim}-D array of shape {tuple(x.shape)} (the leading stacked axes; 0 for none)."
    )
  check_finite(x, path)
  q = _quantize(x, spec, key, scale, zero_point, pack, path, batch_dims)
  check_scale(q.scale, x, spec, path)
  return q


def _quantize(x, spec: QuantSpec, key, scale, zero_point, pack: bool, path: str, batch_dims: int):
  """`quantize` of a checked `x`."""
  if batch_dims:
    one = lambda xi, ki, si, zi: _quantize(xi, spec, ki, si, zi, pack, path, batch_dims - 1)
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
  are quantized on their own (see `quantize`). An empty `x` is returned as it is; a concrete
  range that a 16-bit scale cannot hold raises as in `quantize` (NaN under `jit`).
  """
  spec = as_spec(spec)
  check_input(x)
  if math.prod(jnp.shape(x)) == 0:
    return x
  if batch_dims:
    one = lambda xi, ki, si, zi: fake_quant(
      xi, spec, key=ki, scale=si, zero_point=zi, batch_dims=batch_dims - 1
    )
    return jax.vmap(one)(x, _split_key(key, x.shape[0]), scale, zero_point)
  if spec.is_cast:
    return _ste_cast(x, jnp.zeros((), spec.info.storage))
  xv, axes = grouped_view(jnp.asarray(x).astype(jnp.float32), spec)
  scale, zero_point = jax.lax.stop_gradient(_given_or_computed(xv, axes, spec, scale, zero_point))
  check_scale(scale, x, spec)
  out = _ste_qdq(spec, xv, scale, zero_point, _noise(key, xv.shape, spec))
  return saturate(out.reshape(x.shape), x.dtype)


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
  (qmax − qmin)`` rounded to the nearest stored scale (``lo`` first rounded to the scale dtype,
  as Q4_1 stores its minimum in float16), ``z = qmin − lo / Δ`` kept in float32,
  codes ``clip(round(x / Δ + z))``: ``x ≈ (q − z)·Δ``. Unlike an integer zero point, ``z`` is
  not rounded, so the grid starts exactly at ``lo``. Needs an asymmetric integer spec.
  """
  spec = as_spec(spec)
  if spec.info.kind != "int" or spec.symmetric:
    raise ValueError(f"quantize_float_zero needs an asymmetric integer spec, got {spec}.")
  check_input(x)
  check_nonempty(x)
  xv, axes = grouped_view(jnp.asarray(x, jnp.float32), spec)
  lo, hi = jnp.min(xv, axes, keepdims=True), jnp.max(xv, axes, keepdims=True)
  # the grid's start ``lo`` is stored as the scales are (Q4_1 keeps it in float16), so the
  # zero point says a minimum the scale dtype holds (``−z·Δ`` rounds back to it)
  stored_lo = lo.astype(spec.scale_storage).astype(jnp.float32)
  lo = jnp.where(jnp.isfinite(stored_lo), stored_lo, lo)  # beyond its range: kept as is
  info = spec.info
  step = _span(lo, hi, 1.0 / (info.qmax - info.qmin))
  step = jnp.where(step >= _TINY, step, 1.0)
  finfo = jnp.finfo(spec.scale_storage)
  # no upper clip: a range beyond the scale dtype gives an inf scale, which `check_scale` reports
  scale = jnp.maximum(step, float(finfo.smallest_normal)).astype(spec.scale_storage)
  check_scale(scale, x, spec)
  zero = (info.qmin - _divide(lo, scale)).astype(jnp.float32)
  q = jnp.clip(jnp.round(_divide(xv, scale) + zero), *spec.int_range)
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
  return saturate(_ste_qdq(spec, xf, scale, zero_point, None), x.dtype)


def static_act_scale(stats: dict, spec: SpecLike):
  """``(scale, zero_point)`` of a static (calibrated) activation quantizer from its stats."""
  spec = as_spec(spec)
  lo, hi = calibration.act_range(stats, spec, functools.partial(_qdq_range, spec=spec))
  return scale_from_range(lo, hi, spec)
