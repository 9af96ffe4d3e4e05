"""What the Pallas kernels share: a 2-D integer `QArray` as kernel operands, nibble arithmetic.

A Dense kernel ``[K, N]`` quantized to int8 / uint8 / int4 / uint4 reaches a kernel as:

* ``codes``: int8, in the QArray's stored layout (no copy): ``[K, N]`` (``perm=None``) or
  ``[N, K]`` (``perm=(1, 0)``, contraction-minor). 4-bit codes stay packed two a byte along
  the stored last axis (element ``2i`` in the low nibble), the bytes reinterpreted as int8
  (a bitcast) so that arithmetic shifts sign-extend each nibble.
* ``scale``, ``zero``: ``[G, N]`` with ``G = K / group`` groups along the contraction (``G = 1``
  for per-channel or per-tensor scales), in their stored dtypes.

The kernels compute ``out[m, n] = Σ_k x[m, k] (q[k, n] − z[k // g, n]) s[k // g, n]``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from jaxquant.qarray import QArray

INT_FORMATS = ("int8", "uint8", "int4", "uint4")


@dataclasses.dataclass(frozen=True)
class Layout:
  """The static facts of `KernelWeights` (hashable; what a kernel body specializes on).

  Attributes:
    k, n: the logical shape ``[K, N]``.
    group: contraction elements per scale (``K`` when the scale is constant along it).
    packed: two 4-bit codes per byte.
    signed: codes are signed (int8 / int4) rather than unsigned (uint8 / uint4).
    minor: codes stored ``[N, K]`` (contraction-minor, ``perm=(1, 0)``).
    has_zero: zero points are kept (asymmetric).
  """

  k: int
  n: int
  group: int
  packed: bool
  signed: bool
  minor: bool
  has_zero: bool

  @property
  def groups(self) -> int:
    return self.k // self.group


@dataclasses.dataclass(frozen=True)
class KernelWeights:
  """A 2-D integer QArray as kernel operands (see the module docstring).

  Attributes:
    codes: int8 ``[K, N]`` / ``[N, K]`` (minor), or packed ``[K, N/2]`` / ``[N, K/2]``.
    scale: ``[G, N]`` scales (stored dtype).
    zero: ``[G, N]`` zero points (codes or floats), or None when symmetric.
    layout: the static facts.
  """

  codes: jax.Array
  scale: jax.Array
  zero: jax.Array | None
  layout: Layout


def weights_reason(q: object) -> str | None:
  """Why `q` cannot reach a Pallas kernel as `KernelWeights` (None when it can)."""
  if not isinstance(q, QArray):
    return "weights are not a QArray"
  spec = q.spec
  if spec.format not in INT_FORMATS:
    return f"weights are {spec.format}, not one of {'/'.join(INT_FORMATS)}"
  if q.ndim != 2:
    return f"weights are {q.ndim}-D, not a 2-D [K, N] kernel"
  if q.perm not in (None, (1, 0)):
    return f"codes stored with perm={q.perm}"
  if q.pad:
    return "packed codes padded (odd stored last axis)"
  if spec.granularity == "token":
    return "weight scales per token"
  if spec.granularity == "channel" and spec.resolved_axis(2) != 1:
    return "weight scales per input channel (they vary along the contraction)"
  if spec.granularity == "group" and spec.resolved_axis(2) != 0:
    return "weight groups along the output axis, not the contraction"
  return None


def weights_layout(q: QArray) -> Layout:
  """The static `Layout` of `q` (which `weights_reason` accepts), from its metadata only."""
  k, n = q.shape
  spec = q.spec
  group = int(spec.group_size or k) if spec.granularity == "group" else k
  return Layout(
    k, n, group, q.packed, spec.info.signed, q.perm is not None, q.zero_point is not None
  )


def kernel_weights(q: QArray) -> KernelWeights:
  """`q` (which `weights_reason` accepts) as kernel operands; only bitcasts and reshapes."""
  layout = weights_layout(q)
  g, n = layout.groups, layout.n

  def grid(a: jax.Array) -> jax.Array:  # [1, N] / [1, 1] / [G, 1, N] -> [G, N]
    return jnp.broadcast_to(a.reshape(g, -1), (g, n))

  scale = grid(q.scale) if q.scale is not None else jnp.ones((1, n), jnp.float32)
  zero = grid(q.zero_point) if q.zero_point is not None else None
  c = q.values
  if q.packed or c.dtype == jnp.uint8:
    c = lax.bitcast_convert_type(c, jnp.int8)
  return KernelWeights(c, scale, zero, layout)


def nibbles(b: jax.Array, signed: bool) -> tuple[jax.Array, jax.Array]:
  """int8 bytes to their (low, high) nibbles as int32 codes: signed ones by arithmetic
  shifts (``(v << 28) >> 28`` and ``v >> 4``), unsigned ones by masks."""
  v = b.astype(jnp.int32)
  if signed:
    return (v << 28) >> 28, v >> 4
  return v & 0xF, (v >> 4) & 0xF


def unpack_nibbles(b: jax.Array, signed: bool) -> jax.Array:
  """int8 bytes ``[..., c]`` to int32 codes ``[..., 2c]``, low nibble first (as `packing`)."""
  low, high = nibbles(b, signed)
  return jnp.stack([low, high], axis=-1).reshape(b.shape[:-1] + (2 * b.shape[-1],))


def unsigned_codes(b: jax.Array, signed: bool) -> jax.Array:
  """int8 bytes holding 8-bit codes to int32 (unsigned codes read back as 0..255)."""
  v = b.astype(jnp.int32)
  return v if signed else v & 0xFF


def pick_block(size: int, choices: tuple[int, ...]) -> int | None:
  """The first of `choices` that divides `size` (None if none does)."""
  return next((c for c in choices if size % c == 0), None)
