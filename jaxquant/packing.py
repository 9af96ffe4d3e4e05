"""Two 4-bit values per byte.

Values are packed along the last axis: element ``2i`` goes to the low nibble of byte ``i`` and
element ``2i + 1`` to the high nibble; an odd last axis is padded with one zero. The packed
array of an ``[..., n]`` tensor is ``uint8[..., ceil(n / 2)]``, so 4-bit weights cost exactly
half a byte each in memory and on disk.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def pack_4bit(values: jax.Array) -> jax.Array:
  """Packs int8 values in [-8, 7] (or uint8 in [0, 15]) into ``uint8[..., ceil(n/2)]``."""
  if values.ndim == 0:
    values = values[None]
  n = values.shape[-1]
  if n % 2:
    values = jnp.pad(values, [(0, 0)] * (values.ndim - 1) + [(0, 1)])
  nibbles = (values.astype(jnp.int32) & 0xF).astype(jnp.uint8)
  low, high = nibbles[..., 0::2], nibbles[..., 1::2]
  return low | (high << 4)


def unpack_4bit(packed: jax.Array, n: int, signed: bool) -> jax.Array:
  """Inverse of `pack_4bit`: ``uint8[..., ceil(n/2)]`` to int8 (signed) or uint8 ``[..., n]``."""
  low = packed & 0xF
  high = packed >> 4
  both = jnp.stack([low, high], axis=-1).reshape(packed.shape[:-1] + (-1,))[..., :n]
  if not signed:
    return both.astype(jnp.uint8)
  as_int = both.astype(jnp.int8)
  return jnp.where(as_int >= 8, as_int - 16, as_int).astype(jnp.int8)


def to_native_int4(values: jax.Array) -> jax.Array:
  """int8 values in [-8, 7] as XLA's native ``int4`` dtype (for backends that take it)."""
  return values.astype(jnp.int4)
