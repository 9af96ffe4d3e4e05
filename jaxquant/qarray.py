"""`QArray`: a quantized tensor as a pytree, and how to read it back.

The array children (`values`, `scale`, `zero_point`) are what `jit`, `vmap`, `scan`,
`tree_map`, sharding and checkpoints see. Every shape is derived from them: a QArray carries
no static shape, so one that `jax.vmap` batched or `lax.scan` sliced stays true. The static
metadata (spec, original dtype, packing, layout) is what no batching changes.

Leading axes beyond what the spec describes are batch axes (a stack of layers): the spec's
axes count from the end (`quantize` stores explicit axes as negative ones), and `perm`
permutes only the trailing axes.
"""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxquant.packing import pack_4bit, unpack_4bit
from jaxquant.spec import NF4_CODE, QuantSpec


@dataclasses.dataclass(frozen=True)
class QArray:
  """A quantized tensor: ``x ≈ (values - zero_point) * scale``.

  Attributes:
    values: the stored codes. int8/uint8 integers, FP8 floats, NF4 indices, or bf16 for the
      cast format; 4-bit formats with ``packed=True`` hold ``uint8[..., ceil(n/2)]``.
    scale: stored in the spec's scale dtype, broadcastable to the logical shape (to the
      grouped view ``shape[:a] + (n // G, G) + shape[a+1:]`` for group granularity); None for
      casts.
    zero_point: the codes of 0.0 (the storage dtype), or float zero points (HQQ), with the
      shape of `scale`; None when symmetric.
    spec: the `QuantSpec` the tensor was quantized with.
    dtype: the dtype `dequantize` returns by default (the original one).
    packed: whether two 4-bit codes share each byte of `values`.
    pad: codes of padding at the end of the packed axis (1 when its length is odd).
    perm: None when `values` holds the codes in logical axis order; otherwise the trailing
      ``len(perm)`` axes of `values` hold ``transpose(codes, perm)`` (packed along its own last
      axis), e.g. ``(1, 0)`` for a ``[in, out]`` kernel stored ``[out, in]``, the
      contraction-minor layout integer dots are fastest with on CPU
      (`jaxquant.ops.serving_layout`). Scales keep the logical layout.
  """

  values: jax.Array
  scale: jax.Array | None
  zero_point: jax.Array | None
  spec: QuantSpec
  dtype: np.dtype
  packed: bool = False
  pad: int = 0
  perm: tuple[int, ...] | None = None

  def __post_init__(self):
    object.__setattr__(self, "dtype", np.dtype(self.dtype))
    if self.perm is not None:
      object.__setattr__(self, "perm", _trailing_perm(self.perm))
    if _is_array_like(self.values) and all(
      c is None or _is_array_like(c) for c in (self.scale, self.zero_point)
    ):
      validate(self)

  # ----------------------------------------------------------------- shapes (derived)
  @property
  def stored_shape(self) -> tuple[int, ...]:
    """The logical shape in the axis order of `values` (before packing)."""
    shape = tuple(self.values.shape)
    if self.packed:
      shape = shape[:-1] + (2 * shape[-1] - self.pad,)
    return shape

  @property
  def shape(self) -> tuple[int, ...]:
    """The logical (dequantized) shape."""
    stored = self.stored_shape
    if self.perm is None:
      return stored
    lead = len(stored) - len(self.perm)
    inverse = np.argsort(self.perm)
    return stored[:lead] + tuple(stored[lead + int(a)] for a in inverse)

  @property
  def axis_order(self) -> tuple[int, ...]:
    """The logical axis each axis of `values` holds (the identity unless `perm` is set)."""
    ndim = self.ndim
    if self.perm is None:
      return tuple(range(ndim))
    lead = ndim - len(self.perm)
    return tuple(range(lead)) + tuple(lead + a for a in self.perm)

  @property
  def ndim(self) -> int:
    return len(self.values.shape)

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
      "QArray supports only q[...]; dequantize it first to index (jaxquant.dequantize(q)), "
      "or slice every child alike: jax.tree.map(lambda a: a[i], q)."
    )

  def dequantize(self, dtype=None) -> jax.Array:
    return dequantize(self, dtype)

  def __repr__(self) -> str:
    try:
      shape: object = self.shape
    except (AttributeError, TypeError):
      shape = "?"
    return (
      f"QArray(spec='{self.spec}', shape={shape}, dtype={self.dtype.name}, "
      f"values={getattr(self.values, 'dtype', '?')}{list(getattr(self.values, 'shape', []))}"
      f"{', packed' if self.packed else ''}{f', perm={self.perm}' if self.perm else ''})"
    )


jax.tree_util.register_dataclass(
  QArray,
  data_fields=["values", "scale", "zero_point"],
  meta_fields=["spec", "dtype", "packed", "pad", "perm"],
)


def in_stored_order(logical: tuple, perm: tuple[int, ...] | None) -> tuple:
  """`logical` (a shape, or per-axis entries such as a partition spec) in the axis order of a
  QArray's `values` whose trailing axes are permuted by `perm`."""
  if perm is None:
    return tuple(logical)
  lead = len(logical) - len(perm)
  return tuple(logical[:lead]) + tuple(logical[lead + a] for a in perm)


def _trailing_perm(perm) -> tuple[int, ...] | None:
  """`perm` without its leading axes that stay in place (they are batch axes to a slice):
  ``(0, 2, 1)`` -> ``(1, 0)``; the identity -> None."""
  perm = tuple(int(a) for a in perm)
  while perm and perm[0] == 0 and sorted(perm) == list(range(len(perm))):
    perm = tuple(a - 1 for a in perm[1:])
  return perm or None


def _is_array_like(x) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype")


def grouped_shape(shape: tuple[int, ...], spec: QuantSpec) -> tuple[int, ...]:
  """The shape one scale per element broadcasts against: `shape` itself, or for ``group``
  granularity along axis ``a`` of size n, ``shape[:a] + (n // G, G) + shape[a+1:]``."""
  if spec.granularity != "group" or not shape:
    return tuple(shape)
  a, g = spec.resolved_axis(len(shape)), int(spec.group_size or 1)
  return shape[:a] + (shape[a] // g, g) + shape[a + 1 :]


def split_axis(x: jax.Array, axis: int, group: int) -> jax.Array:
  """`x` with axis ``a`` of size n reshaped to ``(n // G, G)``. Under an explicitly sharded
  mesh the group axis keeps the split of axis ``a`` when its devices divide the group count,
  and is gathered otherwise (a reshape must say its output sharding there)."""
  n = x.shape[axis]
  shape = x.shape[:axis] + (n // group, group) + x.shape[axis + 1 :]
  sharding = getattr(jax.typeof(x), "sharding", None)
  spec = tuple(getattr(sharding, "spec", ()) or ())
  part = spec[axis] if axis < len(spec) else None
  if part is None or not isinstance(sharding, jax.sharding.NamedSharding):
    return x.reshape(shape)
  names = part if isinstance(part, tuple) else (part,)
  ways = math.prod(sharding.mesh.shape[a] for a in names)
  kept = part if (n // group) % ways == 0 else None
  spec = spec + (None,) * (x.ndim - len(spec))
  out = jax.sharding.PartitionSpec(*spec[:axis], kept, None, *spec[axis + 1 :])
  return jax.lax.reshape(x, shape, out_sharding=jax.sharding.NamedSharding(sharding.mesh, out))


def validate(q: QArray) -> None:
  """Raises ValueError unless `q`'s children agree with each other and with its spec."""
  spec, info = q.spec, q.spec.info
  where = f"QArray({spec})"
  if not isinstance(spec, QuantSpec):
    raise TypeError(f"QArray spec must be a QuantSpec, got {spec!r}.")
  if q.packed and not info.packed:
    raise ValueError(f"{where}: only 4-bit formats pack two codes a byte.")
  if q.pad not in (0, 1) or (q.pad and not q.packed):
    raise ValueError(f"{where}: pad={q.pad} (1 only for a packed odd last axis).")
  want = np.dtype(np.uint8) if q.packed else info.storage
  if np.dtype(q.values.dtype) != want:
    raise ValueError(f"{where}: values are {np.dtype(q.values.dtype).name}, expected {want.name}.")
  if (q.perm is not None and sorted(q.perm) != list(range(len(q.perm)))) or (
    q.perm is not None and len(q.perm) > q.ndim
  ):
    raise ValueError(f"{where}: perm {q.perm} is not a permutation of trailing axes.")
  if spec.is_cast:
    if q.scale is not None or q.zero_point is not None:
      raise ValueError(f"{where}: a cast keeps no scale or zero point.")
    return
  if q.scale is None:
    raise ValueError(f"{where}: a scale is required.")
  if spec.symmetric and q.zero_point is not None:
    raise ValueError(f"{where}: a symmetric spec keeps no zero point.")
  if not spec.symmetric and q.zero_point is None:
    raise ValueError(f"{where}: an asymmetric spec needs a zero point.")
  if not jnp.issubdtype(q.scale.dtype, jnp.floating):
    raise ValueError(f"{where}: scale must be floating, got {np.dtype(q.scale.dtype).name}.")
  view = grouped_shape(q.shape, spec)
  scale_shape = tuple(q.scale.shape)
  if len(scale_shape) != len(view) or any(s not in (1, v) for s, v in zip(scale_shape, view)):
    raise ValueError(
      f"{where}: scale shape {scale_shape} does not broadcast against the codes "
      f"{'grouped ' if view != q.shape else ''}shape {view}."
    )
  if q.zero_point is not None and tuple(q.zero_point.shape) != scale_shape:
    raise ValueError(
      f"{where}: zero point shape {tuple(q.zero_point.shape)} differs from the scale's "
      f"{scale_shape}."
    )


def from_codes(
  codes: jax.Array, scale, zero_point, spec: QuantSpec, dtype, pack: bool = True
) -> QArray:
  """A QArray from unpacked codes in logical order (packed two a byte when 4-bit and `pack`)."""
  if not (pack and spec.info.packed and codes.ndim):
    return QArray(codes, scale, zero_point, spec, dtype)
  return QArray(pack_4bit(codes), scale, zero_point, spec, dtype, True, codes.shape[-1] % 2)


# --------------------------------------------------------------------------- reading back
def codes(q: QArray) -> jax.Array:
  """The unpacked integer codes of `q` in its logical shape."""
  stored = q.stored_shape
  c = q.values
  if q.packed:
    c = unpack_4bit(c, stored[-1] if stored else 1, q.spec.info.signed).reshape(stored)
  if q.perm is None:
    return c
  lead = len(stored) - len(q.perm)
  inverse = tuple(range(lead)) + tuple(lead + int(a) for a in np.argsort(q.perm))
  return jnp.transpose(c, inverse)


def decode(codes: jax.Array, scale, zero_point, spec: QuantSpec) -> jax.Array:
  """Stored codes (grouped view) to float32: ``(level(codes) - zero_point) * scale``."""
  if spec.info.kind == "codebook":
    levels = jnp.asarray(NF4_CODE)[codes.astype(jnp.int32)]
  else:
    levels = codes.astype(jnp.float32)
  if zero_point is not None:
    levels = levels - zero_point.astype(jnp.float32)
  return levels * scale.astype(jnp.float32)


def saturate(y: jax.Array, original, dtype=None) -> jax.Array:
  """Float32 `y` clipped to the finite range of the `original` dtype, then cast to `dtype`
  (default `original`).

  A grid point can lie past the largest finite value of the tensor's own dtype: an asymmetric
  grid reaches ``(qmax − z)·Δ``, up to half a step beyond ``hi`` (a float16 65504 would read
  back as inf). Every value the tensor held lies within that range, so the clip only lowers
  the error; NaN (from an inf 16-bit scale, see `numerics.stored_scale`) stays NaN.
  """
  dtype = original if dtype is None else dtype
  if not jnp.issubdtype(original, jnp.floating):
    return y.astype(dtype)
  bound = min(float(jnp.finfo(original).max), float(jnp.finfo(jnp.float32).max))
  return jnp.clip(y, -bound, bound).astype(dtype)


def dequantize(q: QArray, dtype=None) -> jax.Array:
  """``(values - zero_point) * scale`` in the logical shape, as `dtype` (default: original),
  saturated at the original dtype's largest finite value (`saturate`)."""
  dtype = q.dtype if dtype is None else dtype
  if q.spec.is_cast:
    return q.values.astype(dtype)
  shape = q.shape
  c = codes(q)
  if q.spec.granularity == "group" and shape:
    c = split_axis(c, q.spec.resolved_axis(len(shape)), int(q.spec.group_size or 1))
  return saturate(decode(c, q.scale, q.zero_point, q.spec).reshape(shape), q.dtype, dtype)


# --------------------------------------------------------------------------- export
def _serialize_meta(meta) -> bytes:
  spec, dtype, packed, pad, perm = meta
  fields = {
    "spec": str(spec),
    "dtype": np.dtype(dtype).name,
    "packed": packed,
    "pad": pad,
    "perm": None if perm is None else list(perm),
  }
  return json.dumps(fields).encode()


def _deserialize_meta(data: bytes):
  fields = json.loads(data)
  perm = None if fields["perm"] is None else tuple(fields["perm"])
  return (
    QuantSpec.parse(fields["spec"]),
    np.dtype(fields["dtype"]),
    bool(fields["packed"]),
    int(fields["pad"]),
    perm,
  )


# Lets `jax.export` serialize functions that take or return QArrays.
jax.export.register_pytree_node_serialization(
  QArray,
  serialized_name="jaxquant.QArray",
  serialize_auxdata=_serialize_meta,
  deserialize_auxdata=_deserialize_meta,
)


def is_qarray(x) -> bool:
  return isinstance(x, QArray)


def _splits(size: int, part, mesh) -> bool:
  """Whether an axis of `size` can be split over the mesh axes `part` (evenly, and not 1)."""
  if part is None or size <= 1:
    return False
  names = part if isinstance(part, tuple) else (part,)
  ways = math.prod(mesh.shape[n] for n in names)
  return size % ways == 0


def qarray_sharding(q: QArray, sharding: NamedSharding) -> QArray:
  """Shardings for `q`'s children that follow a sharding of its logical tensor.

  `sharding` partitions the logical ``shape``; the result is a QArray whose children are
  `NamedSharding`s, usable as ``jax.device_put(q, qarray_sharding(q, s))`` or as `jit`'s
  ``out_shardings``. Values follow the logical partition (a packed last axis is split the same
  way, in bytes); a scale axis is split where the scale varies along it and replicated where it
  has size 1, so every device holds the scales of exactly the values it holds. A group axis
  with fewer groups than devices along it (or a count they do not divide) is replicated: each
  device then holds every group's scales of its columns.
  """
  ndim = q.ndim
  logical = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
  spec = q.spec
  if spec.granularity == "group" and ndim:
    axis = spec.resolved_axis(ndim)
    view = logical[:axis] + (logical[axis], None) + logical[axis + 1 :]
  else:
    view = logical

  def for_child(child, child_spec):
    if child is None:
      return None
    parts = tuple(
      p if _splits(d, p, sharding.mesh) else None for p, d in zip(child_spec, child.shape)
    )
    return NamedSharding(sharding.mesh, PartitionSpec(*parts))

  stored = in_stored_order(logical, q.perm)
  return dataclasses.replace(
    q,
    values=for_child(q.values, stored),
    scale=for_child(q.scale, view),
    zero_point=for_child(q.zero_point, view),
  )
