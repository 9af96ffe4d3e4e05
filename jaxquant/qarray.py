"""`QArray`: a quantized tensor as a pytree.

The array children (`values`, `scale`, `zero_point`) are what `jit`, `vmap`, `tree_map`,
sharding and checkpoints see; the spec, logical shape, original dtype and packing are static
metadata, so two QArrays with the same metadata share one compiled function.
"""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxquant.spec import QuantSpec


@dataclasses.dataclass(frozen=True)
class QArray:
  """A quantized tensor: ``x ≈ (values - zero_point) * scale``.

  Attributes:
    values: the stored codes. int8/uint8 integers, FP8 floats, NF4 indices, or bf16 for the
      cast format; 4-bit formats with ``packed=True`` hold ``uint8[..., ceil(n/2)]``.
    scale: stored in the spec's scale dtype (float32 unless ``scale=f16``/``bf16``), broadcastable
      to the logical shape (to the grouped view
      ``shape[:a] + (n // G, G) + shape[a+1:]`` for group granularity); None for casts.
    zero_point: integer codes of 0.0 with the shape of `scale`, or None when symmetric.
    spec: the `QuantSpec` the tensor was quantized with.
    shape: the logical (dequantized) shape.
    dtype: the dtype `dequantize` returns by default (the original one).
    packed: whether two 4-bit codes share each byte of `values`.
    perm: None when `values` holds the codes in logical axis order; otherwise `values` holds
      ``transpose(codes, perm)`` (packed along its own last axis), e.g. ``(1, 0)`` for a
      ``[in, out]`` kernel stored ``[out, in]``, the contraction-minor layout integer dots
      are fastest with on CPU (`jaxquant.ops.serving_layout`). Scales keep the logical layout.
  """

  values: jax.Array
  scale: jax.Array | None
  zero_point: jax.Array | None
  spec: QuantSpec
  shape: tuple[int, ...]
  dtype: np.dtype
  packed: bool = False
  perm: tuple[int, ...] | None = None

  @property
  def stored_shape(self) -> tuple[int, ...]:
    """The logical shape in the axis order of `values` (before packing)."""
    return self.shape if self.perm is None else tuple(self.shape[a] for a in self.perm)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def nbytes(self) -> int:
    """Bytes held by values, scale and zero point together."""
    return sum(
        math.prod(a.shape) * np.dtype(a.dtype).itemsize
        for a in (self.values, self.scale, self.zero_point)
        if a is not None
    )

  def __getitem__(self, key):
    """``q[...]`` is `q` itself, so layers that read ``self.kernel[...]`` receive the QArray."""
    if key is Ellipsis:
      return self
    raise TypeError(
        "QArray supports only q[...]; dequantize it first to index (jaxquant.dequantize(q))."
    )

  def dequantize(self, dtype=None) -> jax.Array:
    from jaxquant.numerics import dequantize  # numerics imports this module

    return dequantize(self, dtype)

  def __repr__(self) -> str:
    return (
        f"QArray(spec='{self.spec}', shape={self.shape}, dtype={np.dtype(self.dtype).name}, "
        f"values={getattr(self.values, 'dtype', '?')}{list(getattr(self.values, 'shape', []))}"
        f"{', packed' if self.packed else ''}{f', perm={self.perm}' if self.perm else ''})"
    )


jax.tree_util.register_dataclass(
    QArray,
    data_fields=["values", "scale", "zero_point"],
    meta_fields=["spec", "shape", "dtype", "packed", "perm"],
)


def _serialize_meta(meta) -> bytes:
  spec, shape, dtype, packed, perm = meta
  fields = [str(spec), list(shape), np.dtype(dtype).name, packed]
  return json.dumps(fields + ([list(perm)] if perm is not None else [])).encode()


def _deserialize_meta(data: bytes):
  spec, shape, dtype, packed, *perm = json.loads(data)
  perm = tuple(perm[0]) if perm else None
  return (QuantSpec.parse(spec), tuple(shape), np.dtype(dtype), packed, perm)


# Lets `jax.export` serialize functions that take or return QArrays.
jax.export.register_pytree_node_serialization(
    QArray,
    serialized_name="jaxquant.QArray",
    serialize_auxdata=_serialize_meta,
    deserialize_auxdata=_deserialize_meta,
)


def is_qarray(x) -> bool:
  return isinstance(x, QArray)


def qarray_sharding(q: QArray, sharding: NamedSharding) -> QArray:
  """Shardings for `q`'s children that follow a sharding of its logical tensor.

  `sharding` partitions the logical ``shape``; the result is a QArray whose children are
  `NamedSharding`s, usable as ``jax.device_put(q, qarray_sharding(q, s))`` or as `jit`'s
  ``out_shardings``. Values follow the logical partition (a packed last axis is split the same
  way, in bytes); a scale axis is split where the scale varies along it and replicated where it
  has size 1, so every device holds the scales of exactly the values it holds.
  """
  logical = tuple(sharding.spec) + (None,) * (q.ndim - len(sharding.spec))
  spec = q.spec
  if spec.granularity == "group" and q.ndim:
    axis = spec.resolved_axis(q.ndim)
    view = logical[:axis] + (logical[axis], None) + logical[axis + 1 :]
  else:
    view = logical

  def for_child(child, child_spec):
    if child is None:
      return None
    parts = tuple(p if d > 1 else None for p, d in zip(child_spec, child.shape))
    return NamedSharding(sharding.mesh, PartitionSpec(*parts))

  stored = logical if q.perm is None else tuple(logical[a] for a in q.perm)
  return dataclasses.replace(
      q,
      values=for_child(q.values, stored),
      scale=for_child(q.scale, view),
      zero_point=for_child(q.zero_point, view),
  )
