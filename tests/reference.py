"""A plain NumPy quantizer, written independently of jaxquant, to test against.

Follows the textbook recipe: range per scale group, scale, round half to even, clip.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

INT_RANGES = {"int8": (-128, 127), "uint8": (0, 255), "int4": (-8, 7), "uint4": (0, 15)}


def scale_groups(x: np.ndarray, granularity: str, axis: int, group: int | None):
  """Returns (view, reduce_axes) where each scale covers one slice over reduce_axes."""
  nd = x.ndim
  axis = axis % nd
  if granularity == "tensor":
    return x, tuple(range(nd))
  if granularity == "channel":
    return x, tuple(a for a in range(nd) if a != axis)
  if granularity == "token":
    return x, (axis,)
  shape = x.shape[:axis] + (x.shape[axis] // group, group) + x.shape[axis + 1 :]
  return x.reshape(shape), (axis + 1,)


def stored(scale: np.ndarray, dtype) -> np.ndarray:
  """The scale as a `dtype` holds it (clipped into its normal range, rounded up), as float32."""
  info = ml_dtypes.finfo(dtype)
  clipped = np.clip(scale, np.float32(info.smallest_normal), np.float32(info.max))
  nearest = clipped.astype(dtype)
  # the next value up of a positive finite 16-bit float is the next bit pattern
  up = (
    (nearest.view(np.uint16) + np.uint16(1)).view(dtype) if nearest.dtype.itemsize == 2 else nearest
  )
  out = np.where(nearest.astype(np.float32) < clipped, up, nearest)
  return out.astype(np.float32)


def ref_quantize(
  x, fmt, granularity="channel", axis=-1, group=None, symmetric=True, scale_dtype=np.float32
):
  """(codes, scale, zero_point, dequantized) for integer formats; all float32 arithmetic, the
  scale rounded to `scale_dtype` before it is used."""
  x = np.asarray(x, np.float32)
  qmin, qmax = INT_RANGES[fmt]
  view, axes = scale_groups(x, granularity, axis, group)
  lo = np.minimum(view.min(axis=axes, keepdims=True), 0).astype(np.float32)
  hi = np.maximum(view.max(axis=axes, keepdims=True), 0).astype(np.float32)
  tiny = np.finfo(np.float32).tiny
  if symmetric:
    amax = np.maximum(-lo, hi)
    scale = (amax * np.float32(1.0 / qmax)).astype(np.float32)
    scale = stored(np.where(scale >= tiny, scale, np.float32(1)), scale_dtype)
    zero = np.zeros_like(scale)
    q = np.clip(np.round(view / scale), -qmax, qmax)
  else:
    scale = ((hi - lo) * np.float32(1.0 / (qmax - qmin))).astype(np.float32)
    scale = stored(np.where(scale >= tiny, scale, np.float32(1)), scale_dtype)
    zero = np.clip(qmin - np.round(lo / scale), qmin, qmax).astype(np.float32)
    q = np.clip(np.round(view / scale) + zero, qmin, qmax)
  deq = ((q - zero) * scale).reshape(x.shape)
  return q.reshape(x.shape), scale, zero, deq
