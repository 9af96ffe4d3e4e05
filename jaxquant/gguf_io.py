"""GGUF files (llama.cpp's format) read with the `gguf` package: metadata, every tensor as
float32, and the block formats a `QuantSpec` can say exactly as `QArray`s, with no float detour.

GGUF stores a matrix ``ne = [in, out]`` as ``out`` rows of ``in`` values, i.e. the PyTorch
``[out, in]`` layout; its block formats quantize runs of 32 values along ``in``:

=======  ==========================  ========================================================
format   block (32 values)           as a QArray (Flax kernel ``[in, out]``, groups along in)
=======  ==========================  ========================================================
Q8_0     f16 ``d``, 32 int8 ``q``     ``int8:g32:scale=f16``, ``x = q·d``
Q4_0     f16 ``d``, 32 nibbles ``q``  ``int4:g32:scale=f16``, codes ``q − 8``: ``x = (q − 8)·d``
Q4_1     f16 ``d``, f16 ``m``, nibbles  ``uint4:g32:asym:scale=f16``, a *float* zero point
                                      ``z = −m / d`` (float32): ``x = (q − z)·d = q·d + m``
=======  ==========================  ========================================================

Q4_1's float minimum is kept as the float zero point HQQ already uses (no new format): the
codes and the f16 scales are ggml's, bit for bit, and ``(q − z)·d`` differs from ggml's
``q·d + m`` by float32 rounding only (a few ulp of the block's range). An *integer* zero point
could not say it: ``m / d`` is not an integer, so rounding it shifts the whole grid.
Nibble order: value ``j < 16`` of a block is the low nibble of byte ``j``, ``j + 16`` the high.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import gguf
import jax.numpy as jnp
import numpy as np

from jaxquant.qarray import QArray, from_codes
from jaxquant.spec import QuantSpec

BLOCK = 32
#: How each directly readable block format is said as a spec, for ``[..., in, out]`` kernels
#: (groups along the input axis, -2) and for ``[..., rows, in]`` tables (axis -1).
QUANT_SPECS = {
  "Q8_0": ("int8", True),
  "Q4_0": ("int4", True),
  "Q4_1": ("uint4", False),
}
FLOAT_TYPES = ("F32", "F16")


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
  """One tensor: `name`, ggml type name (``Q4_1``, ``F32``, ...), logical `shape` in NumPy
  order (``[out, in]`` for a matrix: ggml's ``ne`` reversed) and the raw `data` view."""

  name: str
  type: str
  shape: tuple[int, ...]
  data: np.ndarray


@dataclasses.dataclass(frozen=True)
class GGUFFile:
  """A read GGUF file: `metadata` (key → Python value) and `tensors` by name, in file order."""

  path: Path
  metadata: dict[str, Any]
  tensors: dict[str, GGUFTensor]

  def __getitem__(self, name: str) -> GGUFTensor:
    if name not in self.tensors:
      raise KeyError(f"{self.path} has no tensor {name!r} ({len(self.tensors)} tensors).")
    return self.tensors[name]


def read_gguf(path: str | os.PathLike) -> GGUFFile:
  """Metadata and tensor views of a GGUF file (memory-mapped: nothing is copied yet)."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such GGUF file.")
  try:
    reader = gguf.GGUFReader(path)
  except (ValueError, OSError) as e:  # bad magic, truncated header
    raise ValueError(f"{path} is not a readable GGUF file ({e}).") from None
  metadata = {}
  for key, field in reader.fields.items():
    if key.startswith("GGUF."):
      continue
    metadata[key] = field.contents()
  tensors = {}
  for t in reader.tensors:
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    tensors[t.name] = GGUFTensor(t.name, t.tensor_type.name, shape, t.data)
  return GGUFFile(path, metadata, tensors)


def to_float(t: GGUFTensor) -> np.ndarray:
  """Tensor `t` as float32 in its logical shape (any ggml type `gguf` can dequantize)."""
  if t.type in FLOAT_TYPES:
    return np.asarray(t.data, np.float32).reshape(t.shape)
  qtype = gguf.GGMLQuantizationType[t.type]
  return gguf.quants.dequantize(np.asarray(t.data), qtype).astype(np.float32).reshape(t.shape)


def block_fields(t: GGUFTensor) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
  """``(codes, d, m)`` of a Q8_0/Q4_0/Q4_1 tensor ``[..., n]``: integer codes ``[..., n]``
  (int8 for Q8_0, 0..15 as uint8 for the 4-bit ones), f16 scales ``[..., n / 32]`` and, for
  Q4_1, the f16 minimums (else None)."""
  if t.type not in QUANT_SPECS:
    raise ValueError(f"{t.name}: {t.type} blocks are not read directly; use to_float.")
  n = t.shape[-1]
  rows = np.asarray(t.data).reshape(-1, n // BLOCK, t.data.shape[-1] // (n // BLOCK))
  d = rows[..., 0:2].copy().view(np.float16)[..., 0]
  m = None
  if t.type == "Q8_0":
    codes = rows[..., 2:].copy().view(np.int8)
  else:
    start = 2
    if t.type == "Q4_1":
      m = rows[..., 2:4].copy().view(np.float16)[..., 0]
      start = 4
    nibbles = rows[..., start:]
    codes = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1)
  lead = t.shape[:-1]
  shape = lead + (n // BLOCK,)
  return (
    codes.reshape(lead + (n,)),
    d.reshape(shape),
    None if m is None else m.reshape(shape),
  )


def block_spec(t: GGUFTensor, axis: int) -> QuantSpec:
  """The spec that says `t`'s block format exactly, groups of 32 along `axis`."""
  fmt, symmetric = QUANT_SPECS[t.type]
  return QuantSpec(fmt, "group", BLOCK, axis, symmetric, scale_dtype="f16")


def to_qarray(t: GGUFTensor, layout: str = "flax", rows: np.ndarray | None = None) -> QArray:
  """A Q8_0/Q4_0/Q4_1 tensor as a `QArray` with ggml's codes and scales.

  ``layout="flax"``: a matrix as the kernel ``[in, out]`` (groups along axis -2);
  ``"torch"``: as stored, ``[out, in]`` (groups along -1, e.g. an embedding table).
  `rows`, if given, reorders the output rows first (``W[rows]``), exactly.
  """
  if layout not in ("flax", "torch"):
    raise ValueError(f"layout must be 'flax' or 'torch', got {layout!r}.")
  codes, d, m = block_fields(t)
  if rows is not None:
    codes, d, m = codes[rows], d[rows], None if m is None else m[rows]
  d32 = d.astype(np.float32)
  zero = None
  if t.type == "Q4_0":
    codes = codes.astype(np.int8) - 8
  elif t.type == "Q4_1":
    assert m is not None  # block_fields returns the minimums of Q4_1
    # A constant block has d = 0 and every value m: say it as scale |m|, zero point -sign(m).
    m32 = m.astype(np.float32)
    flat = d32 == 0
    d = np.where(flat, np.where(m32 == 0, 1.0, np.abs(m32)), d32).astype(np.float16)
    zero = np.where(flat, -np.sign(m32), -m32 / d.astype(np.float32)).astype(np.float32)
  if layout == "flax" and codes.ndim == 2:
    codes, d, zero = codes.T, d.T[:, None, :], None if zero is None else zero.T[:, None, :]
    axis = -2
  else:
    d, zero = d[..., None], None if zero is None else zero[..., None]
    axis = -1
  spec = block_spec(t, axis)
  return from_codes(
    jnp.asarray(codes, spec.info.storage),
    jnp.asarray(d, jnp.float16),
    None if zero is None else jnp.asarray(zero),
    spec,
    jnp.float32,
  )
