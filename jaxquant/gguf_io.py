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
import mmap
import os
from pathlib import Path
from typing import Any

import gguf
import jax.numpy as jnp
import numpy as np

from jaxquant.io import atomic_write
from jaxquant.qarray import QArray, codes, from_codes
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
  """A read GGUF file: `metadata` (key → Python value), its value `types` (key → GGUF value
  type names, ``["ARRAY", "STRING"]`` for a list of strings) and `tensors` by name, in file
  order."""

  path: Path
  metadata: dict[str, Any]
  tensors: dict[str, GGUFTensor]
  types: dict[str, list[str]] = dataclasses.field(default_factory=dict)

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
  except Exception as e:  # bad magic, a truncated header or tensor table: gguf raises anything
    raise ValueError(
      f"{path} is not a readable GGUF file or is truncated ({type(e).__name__}: {e})."
    ) from None
  metadata, types = {}, {}
  for key, field in reader.fields.items():
    if key.startswith("GGUF."):
      continue
    metadata[key] = field.contents()
    types[key] = [t.name for t in field.types]
  tensors = {}
  for t in reader.tensors:
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    tensors[t.name] = GGUFTensor(t.name, t.tensor_type.name, shape, t.data)
  return GGUFFile(path, metadata, tensors, types)


def release_pages(file: GGUFFile) -> None:
  """Drops the pages of `file`'s memory map from this process's resident set (they stay in the
  page cache and are read again on the next access), so reading a large file tensor by tensor
  keeps the RSS at one tensor rather than growing to the file's size."""
  for t in file.tensors.values():
    mapping = getattr(t.data, "_mmap", None) or getattr(t.data.base, "_mmap", None)
    if isinstance(mapping, mmap.mmap):
      mapping.madvise(mmap.MADV_DONTNEED)
    return  # one mapping holds every tensor


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
  default = axis == -2  # a group spec's default axis: say it the way a user writes it
  return QuantSpec(fmt, "group", BLOCK, None if default else axis, symmetric, scale_dtype="f16")


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


# --------------------------------------------------------------------------- writing
#: The exact spec each exportable block type holds (groups of 32 along the input axis).
EXPORT_SPECS = {
  "Q8_0": "int8:g32:scale=f16",
  "Q4_0": "int4:g32:scale=f16",
  "Q4_1": "uint4:g32:asym:scale=f16",
}


class NotExportable(ValueError):
  """A QArray no GGUF block type holds exactly (the message names the nearest spec)."""


def _nearest(spec: QuantSpec) -> str:
  if spec.info.bits == 8:
    return "Q8_0 holds int8:g32:scale=f16"
  if spec.symmetric:
    return "Q4_0 holds int4:g32:scale=f16"
  return "Q4_1 holds uint4:g32:asym:scale=f16 (float zero point: the recipe step rtn.float_zero)"


def export_type(q: QArray, name: str = "x") -> str:
  """The GGUF block type that holds the 2-D kernel `q` (``[in, out]``, groups along in) exactly:
  ``Q8_0``, ``Q4_0`` or ``Q4_1``; raises `NotExportable` naming `name` and the nearest spec."""
  spec = q.spec
  shape = tuple(q.shape)
  why = None
  if len(shape) != 2:
    why = f"a {len(shape)}-D tensor"
  elif spec.granularity != "group" or spec.group_size != BLOCK:
    why = f"{spec.granularity} scales (GGUF blocks are groups of {BLOCK})"
  elif spec.resolved_axis(2) != 0:
    why = "groups along the output axis (GGUF blocks run along the input axis)"
  elif spec.format == "int8" and spec.symmetric:
    kind = "Q8_0"
  elif spec.format == "int4" and spec.symmetric:
    kind = "Q4_0"
  elif spec.format == "uint4" and not spec.symmetric:
    kind = "Q4_1"
  else:
    why = f"format {spec.format}{'' if spec.symmetric else ' asymmetric'}"
  if why is None:
    scale = np.asarray(q.scale, np.float32)
    if not np.array_equal(scale.astype(np.float16).astype(np.float32), scale):
      why = "scales that float16 does not hold exactly"
  if why is not None:
    raise NotExportable(
      f"{name}: spec {spec} has {why}, which no GGUF block type holds exactly. Nearest: "
      f"{_nearest(spec)}; quantize with that, or export with requantize=True (it reports the "
      "error it adds)."
    )
  return kind


def _q4_1_minimums(name: str, d: np.ndarray, zero: np.ndarray) -> np.ndarray:
  """Q4_1's f16 minimums ``m = −z·d``; raises unless f16 holds them to float32 rounding."""
  m = -zero.astype(np.float64) * d.astype(np.float64)
  m16 = m.astype(np.float16)
  tol = 2.0**-20 * np.maximum(np.abs(m), 15 * np.abs(d.astype(np.float64)))
  if not (np.abs(m16.astype(np.float64) - m) <= tol).all():
    raise NotExportable(
      f"{name}: its zero points give block minimums −z·scale that float16 does not hold, so Q4_1 "
      "would shift the grid. Quantize with the recipe step rtn.float_zero (minimums in float16) "
      "or export with requantize=True."
    )
  return m16


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
  """``[rows, n]`` values 0..15 → ``[rows, n/32, 16]`` bytes: value j low nibble, j+16 high."""
  b = q.astype(np.uint8).reshape(q.shape[0], -1, 2, BLOCK // 2)
  return b[:, :, 0] | (b[:, :, 1] << 4)


def block_bytes(
  q: QArray, name: str = "x", rows: np.ndarray | None = None
) -> tuple[str, np.ndarray]:
  """``(type, raw)``: the 2-D kernel `q` ``[in, out]`` as GGUF blocks, ``raw`` uint8
  ``[out, bytes per row]`` (ggml's matrix ``[out, in]``); `rows` reorders the output rows
  first (``W[rows]``). The inverse of `to_qarray`; raises `NotExportable` when inexact."""
  kind = export_type(q, name)
  c = np.asarray(codes(q)).T  # [out, in]
  d = np.asarray(q.scale, np.float32)[:, 0, :].T.astype(np.float16)  # [out, in / 32]
  zero = None if q.zero_point is None else np.asarray(q.zero_point, np.float32)[:, 0, :].T
  if rows is not None:
    c, d, zero = c[rows], d[rows], None if zero is None else zero[rows]
  out, nb = d.shape
  head = [d.reshape(out, nb, 1).view(np.uint8)]
  if kind == "Q8_0":
    body = c.astype(np.int8).reshape(out, nb, BLOCK).view(np.uint8)
  elif kind == "Q4_0":
    body = _pack_nibbles(c.astype(np.int16) + 8)
  else:
    m = _q4_1_minimums(name, d, np.zeros_like(d, np.float32) if zero is None else zero)
    head.append(m.reshape(out, nb, 1).view(np.uint8))
    body = _pack_nibbles(c)
  raw = np.concatenate([*head, body], axis=-1).reshape(out, -1)
  return kind, np.ascontiguousarray(raw)


def requantize_bytes(w: np.ndarray, kind: str) -> np.ndarray:
  """A float matrix ``[out, in]`` quantized to GGUF `kind` by the `gguf` package (its reference
  quantizers): raw uint8 ``[out, bytes per row]``."""
  qtype = gguf.GGMLQuantizationType[kind]
  return np.asarray(gguf.quants.quantize(np.ascontiguousarray(w, np.float32), qtype))


@dataclasses.dataclass(frozen=True)
class OutTensor:
  """A tensor to write: GGUF `name`, ggml `type` (``F32``, ``F16``, ``Q8_0``, ...) and `data`:
  a float array in its logical NumPy shape, or for block types raw uint8 ``[rows, bytes]``."""

  name: str
  type: str
  data: np.ndarray


def write_gguf(
  path: str | os.PathLike,
  arch: str,
  metadata: dict[str, Any],
  types: dict[str, list[str]],
  tensors: list[OutTensor],
) -> Path:
  """Writes a GGUF file atomically: `metadata` (typed by `types`, as `read_gguf` returns them;
  ``general.architecture`` comes from `arch`) and `tensors` in order."""
  missing = [k for k in metadata if k not in types]
  if missing:
    raise ValueError(f"metadata {missing[0]!r} has no GGUF value type; give it in `types`.")

  def write(tmp: str) -> None:
    writer = gguf.GGUFWriter(tmp, arch)
    for key, value in metadata.items():
      if key == "general.architecture":
        continue
      vt = [gguf.GGUFValueType[t] for t in types[key]]
      writer.add_key_value(key, value, vt[0], sub_type=vt[1] if len(vt) > 1 else None)
    for t in tensors:
      if t.type in FLOAT_TYPES:
        dtype = np.float32 if t.type == "F32" else np.float16
        writer.add_tensor(t.name, np.ascontiguousarray(t.data, dtype))
      else:
        qtype = gguf.GGMLQuantizationType[t.type]
        writer.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

  return atomic_write(path, write)
