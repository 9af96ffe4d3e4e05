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

import functools
import math
import statistics

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxquant import calibration
from jaxquant.packing import pack_4bit, unpack_4bit
from jaxquant.qarray import QArray
from jaxquant.spec import QuantSpec, SpecLike, as_spec, check_group_size

_TINY = float(np.finfo(np.float32).tiny)


def _nf4_code() -> np.ndarray:
  """The 16 NF4 levels (Dettmers et al., 2023): quantiles of N(0, 1) scaled to [-1, 1].

  8 positive levels at quantiles ``linspace(δ, 1/2, 9)[:-1]``, 7 negative ones at
  ``linspace(δ, 1/2, 8)[:-1]``, and an exact zero, with ``δ = 0.9677083``.
  """
  offset = 0.9677083
  inv_cdf = statistics.NormalDist().inv_cdf
  positive = [inv_cdf(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
  negative = [-inv_cdf(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
  levels = np.sort(np.array(positive + [0.0] + negative))
  return (levels / levels.max()).astype(np.float32)


NF4_CODE = _nf4_code()
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
  view = x.reshape(x.shape[:axis] + (n // spec.group_size, spec.group_size) + x.shape[axis + 1 :])
  return view, (axis + 1,)


def find_range(xv: jax.Array, axes: tuple[int, ...], spec: QuantSpec):
  """``(lo, hi)`` over `axes` by the spec's calibration method."""
  if spec.calibration == "percentile":
    return calibration.percentile_range(xv, axes, spec.percentile, spec.symmetric)
  full = (
      calibration.minmax_range(xv, axes)
      if not spec.symmetric
      else calibration.absmax_range(xv, axes)
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


def scale_from_range(lo: jax.Array, hi: jax.Array, spec: QuantSpec):
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
  zero_point = jnp.clip(info.qmin - jnp.round(lo / scale), info.qmin, info.qmax)
  return scale, zero_point.astype(info.storage)


def compute_scale(x: jax.Array, spec: SpecLike):
  """``(scale, zero_point)`` of `x` under `spec`, shaped like ``spec.scale_shape(x.shape)``."""
  spec = as_spec(spec)
  xv, axes = grouped_view(jnp.asarray(x, jnp.float32), spec)
  return scale_from_range(*find_range(xv, axes, spec), spec)


# --------------------------------------------------------------------------- step 3/4: map
def _int_bounds(spec: QuantSpec) -> tuple[float, float]:
  info = spec.info
  return (-info.qmax, info.qmax) if spec.symmetric else (info.qmin, info.qmax)


def _encode(xv, scale, zero_point, spec: QuantSpec, noise=None):
  """Floats (grouped view) to stored codes."""
  info = spec.info
  v = xv / scale
  if info.kind == "int":
    rounded = jnp.round(v) if noise is None else jnp.floor(v + noise)
    if zero_point is not None:
      rounded = rounded + zero_point.astype(jnp.float32)
    return jnp.clip(rounded, *_int_bounds(spec)).astype(info.storage)
  if info.kind == "float":
    return jnp.clip(v, info.qmin, info.qmax).astype(info.storage)
  # codebook: index of the nearest level
  idx = jnp.searchsorted(jnp.asarray(_NF4_MIDPOINTS), jnp.clip(v, -1.0, 1.0))
  return idx.astype(jnp.uint8)


def _qdq_range(xv, lo, hi, spec: QuantSpec):
  """Quantize-dequantize `xv` with the scale that the range ``[lo, hi]`` gives."""
  scale, zero_point = scale_from_range(lo, hi, spec)
  return _decode(_encode(xv, scale, zero_point, spec), scale, zero_point, spec)


def _decode(codes, scale, zero_point, spec: QuantSpec):
  """Stored codes (grouped view) to float32."""
  if spec.info.kind == "codebook":
    levels = jnp.asarray(NF4_CODE)[codes.astype(jnp.int32)]
  else:
    levels = codes.astype(jnp.float32)
  if zero_point is not None:
    levels = levels - zero_point.astype(jnp.float32)
  return levels * scale


def _in_range_mask(xv, scale, zero_point, spec: QuantSpec):
  """True where `xv` lies inside the representable range (the STE passes gradient there)."""
  info = spec.info
  v = xv / scale
  if info.kind == "int":
    if zero_point is not None:
      v = v + zero_point.astype(jnp.float32)
    lo, hi = _int_bounds(spec)
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
    x: jax.Array,
    spec: SpecLike,
    *,
    key: jax.Array | None = None,
    scale: jax.Array | None = None,
    zero_point: jax.Array | None = None,
    pack: bool = True,
    path: str = "x",
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
  """
  spec = as_spec(spec)
  check_input(x, path)
  x = jnp.asarray(x)
  check_finite(x, path)
  check_group_size(spec, x.shape, path)
  shape, dtype = tuple(x.shape), np.dtype(x.dtype)
  if spec.is_cast:
    return QArray(x.astype(spec.info.storage), None, None, spec, shape, dtype, False)
  xv, axes = grouped_view(x.astype(jnp.float32), spec)
  scale, zero_point = _given_or_computed(xv, axes, spec, scale, zero_point)
  codes = _encode(xv, scale, zero_point, spec, _noise(key, xv.shape, spec)).reshape(shape)
  packed = pack and spec.info.packed
  if packed:
    codes = pack_4bit(codes)
  return QArray(codes, scale, zero_point, spec, shape, dtype, packed)


def codes(q: QArray) -> jax.Array:
  """The unpacked integer codes of `q` in its logical shape."""
  stored = q.stored_shape
  c = q.values
  if q.packed:
    n = stored[-1] if stored else 1
    c = unpack_4bit(c, n, q.spec.info.signed).reshape(stored)
  return c if q.perm is None else jnp.transpose(c, tuple(np.argsort(q.perm)))


def dequantize(q: QArray, dtype=None) -> jax.Array:
  """``(values - zero_point) * scale`` in the logical shape, as `dtype` (default: original)."""
  dtype = q.dtype if dtype is None else dtype
  if q.spec.is_cast:
    return q.values.astype(dtype)
  c = codes(q)
  if q.spec.granularity == "group" and q.ndim:
    axis = q.spec.resolved_axis(q.ndim)
    g = q.spec.group_size
    c = c.reshape(q.shape[:axis] + (q.shape[axis] // g, g) + q.shape[axis + 1 :])
  return _decode(c, q.scale, q.zero_point, q.spec).reshape(q.shape).astype(dtype)


# --------------------------------------------------------------------------- fake quant
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ste_qdq(spec: QuantSpec, xv, scale, zero_point, noise):
  return _decode(_encode(xv, scale, zero_point, spec, noise), scale, zero_point, spec)


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
) -> jax.Array:
  """``dequantize(quantize(x))`` in `x`'s dtype, with a straight-through gradient.

  The gradient is the identity where `x` rounds onto the grid without clipping,
  ``(qmin - z - 1/2)Δ <= x <= (qmax - z + 1/2)Δ``, and zero where it is clipped; the scale is
  treated as a constant (``stop_gradient``).
  """
  spec = as_spec(spec)
  check_input(x)
  if spec.is_cast:
    return _ste_cast(x, jnp.zeros((), spec.info.storage))
  xv, axes = grouped_view(jnp.asarray(x).astype(jnp.float32), spec)
  scale, zero_point = jax.lax.stop_gradient(
      _given_or_computed(xv, axes, spec, scale, zero_point)
  )
  out = _ste_qdq(spec, xv, scale, zero_point, _noise(key, xv.shape, spec))
  return out.reshape(x.shape).astype(x.dtype)


def quantization_error(x: jax.Array, q: QArray) -> dict[str, float]:
  """Relative error ``||x - x̂|| / ||x||`` and SNR ``10 log10(||x||² / ||x - x̂||²)`` in dB."""
  x = np.asarray(jax.device_get(x), np.float64)
  err = x - np.asarray(jax.device_get(dequantize(q, jnp.float32)), np.float64)
  signal, noise = float(np.sum(x * x)), float(np.sum(err * err))
  rel = math.sqrt(noise / signal) if signal > 0 else 0.0
  snr = 10 * math.log10(signal / noise) if noise > 0 else math.inf
  return {"rel_error": rel, "snr_db": snr}


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

