"""Checkpoints: quantized pytrees as safetensors files with a self-describing, checked header.

Every tensor is stored in its own dtype (int8, packed uint8 for 4-bit formats, FP8, bf16,
float32), so the file is as large as the theory says plus a small JSON header. The header's
``__metadata__["jaxquant"]`` entry records, per leaf, its tree path, the spec string, logical
shape and dtype, and per stored tensor its dtype, shape and CRC-32; ``jaxquant_crc32`` is the
CRC-32 of that entry itself. `load` checks all of it against the file before returning anything:
a flipped bit, a relabelled dtype or a permuted shape is a `ValueError` naming the file and the
tensor, never a silently different tree.

Writes go to one temporary file beside the target (``.NAME.PID.XXXXXXXX.tmp``), synced and
renamed into place, so readers see the old file or the whole new one; a failed save removes its
temporary, and the next save of the same target removes those left by a killed process.

`save_streamed` writes the same file from leaves made one at a time (`quantize_streamed`:
read, quantize and write tensor by tensor, memory one tensor); `save_orbax` / `load_orbax` keep
sharded trees (multi-process too) as Orbax checkpoints, restored straight into other shardings.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import tempfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors
from safetensors import TensorSpec

from jaxquant._version import __version__
from jaxquant.numerics import check_finite, check_scale_range, quantize
from jaxquant.qarray import QArray, in_stored_order, qarray_sharding
from jaxquant.rules import Rule
from jaxquant.spec import QuantSpec
from jaxquant.transforms import Plan, PlanRow, map_leaves, named_leaves, plan, progress_bar

FORMAT_NAME = "jaxquant"
#: 2 adds per-tensor CRC-32s and the header's own; format 1 files still load (unverified).
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
DEFAULT_FILENAME = "model.safetensors"
HEADER_CRC_KEY = f"{FORMAT_NAME}_crc32"

#: safetensors dtype names and the NumPy dtypes they hold.
SAFETENSORS_DTYPES = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "BF16": ml_dtypes.bfloat16,
  "F8_E4M3": ml_dtypes.float8_e4m3fn,
  "F8_E5M2": ml_dtypes.float8_e5m2,
  "I64": np.int64,
  "I32": np.int32,
  "I16": np.int16,
  "I8": np.int8,
  "U64": np.uint64,
  "U32": np.uint32,
  "U16": np.uint16,
  "U8": np.uint8,
  "BOOL": np.bool_,
}
_STORABLE = frozenset(np.dtype(d) for d in SAFETENSORS_DTYPES.values())
_CHILDREN = ("values", "scale", "zero_point")
_TMP_SUFFIX = ".tmp"
_REMAKE = "re-create it with jaxquant.save"
log = logging.getLogger(__name__)


def checkpoint_file(path: str | os.PathLike) -> Path:
  """The file `save`/`load` use for `path`: ``path/model.safetensors`` when `path` is an
  existing folder or ends with a separator, else `path` itself."""
  text = os.fspath(path)
  path = Path(path)
  if path.is_dir() or text.endswith(("/", os.sep)):
    return path / DEFAULT_FILENAME
  return path


def _encode_key(key) -> list:
  if isinstance(key, jax.tree_util.SequenceKey):
    return ["seq", key.idx]
  if isinstance(key, jax.tree_util.DictKey):
    k = key.key
    if isinstance(k, bool) or not isinstance(k, (str, int)):
      raise TypeError(
        f"dict key {k!r} ({type(k).__name__}): checkpoint keys must be str or int to load back "
        "as the same tree; rename it before saving."
      )
    return ["dict", k]
  if isinstance(key, jax.tree_util.GetAttrKey):
    return ["dict", key.name]
  return ["dict", str(getattr(key, "key", key))]


def _flat_leaves(tree) -> list[tuple[list, Any]]:
  if hasattr(tree, "to_pure_dict"):  # nnx.State
    tree = tree.to_pure_dict()
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, QArray))
  return [([_encode_key(k) for k in kp], leaf) for kp, leaf in flat]


def _as_numpy(x, path: str) -> np.ndarray:
  try:
    arr = np.asarray(jax.device_get(x))
  except Exception as e:
    raise TypeError(f"{path}: cannot store a {type(x).__name__} in a checkpoint ({e}).") from None
  if arr.dtype not in _STORABLE:
    what = type(x).__name__ if arr.dtype == object or arr.dtype.kind in "US" else arr.dtype
    raise TypeError(
      f"{path}: cannot store a {what} in a checkpoint; leaves must be numeric arrays or "
      "QArrays. Remove it from the tree (or convert it) before saving."
    )
  return arr if arr.flags.c_contiguous else arr.copy(order="C")  # keeps 0-d arrays 0-d


def _safetensors_name(dtype: np.dtype) -> str:
  return next(k for k, v in SAFETENSORS_DTYPES.items() if np.dtype(v) == dtype)


def crc32(data: bytes | np.ndarray) -> int:
  """CRC-32 (zlib's) of the bytes of `data` (an array: its C-order bytes), unsigned."""
  if isinstance(data, np.ndarray):
    return zlib.crc32(np.ascontiguousarray(data).reshape(-1).view(np.uint8).data) & 0xFFFFFFFF
  return zlib.crc32(data) & 0xFFFFFFFF


def _stored_tensors(tree) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
  """The tensors `save` writes, by name, and the header's leaf entries; rejects collisions."""
  arrays: dict[str, np.ndarray] = {}
  owners: dict[str, str] = {}
  entries: list[dict[str, Any]] = []

  def add(stored: str, leaf: str, value: np.ndarray) -> None:
    if stored == "__metadata__":
      raise ValueError(f"{leaf}: '__metadata__' is reserved by safetensors; rename the leaf.")
    if stored in arrays:
      raise ValueError(
        f"{leaf}: stored as tensor '{stored}', which leaf {owners[stored]} also uses (a QArray "
        "keeps its parts as NAME#values, NAME#scale, NAME#zero_point); rename one before saving."
      )
    arrays[stored], owners[stored] = value, leaf

  for keys, leaf in _flat_leaves(tree):
    name = "/".join(str(k[1]) for k in keys)
    if any(name == e["name"] for e in entries):
      raise ValueError(f"{name}: two leaves share this path; rename one before saving.")
    entry = _leaf_entry(name, keys, leaf)
    for stored, value in _stored_parts(name, leaf):
      add(stored, name, value)
    entries.append(entry)
  return arrays, entries


def _leaf_entry(name: str, keys: list, leaf) -> dict[str, Any]:
  """The header entry of one leaf (concrete, or abstract: `jax.ShapeDtypeStruct` children)."""
  if not isinstance(leaf, QArray):
    return {"name": name, "keys": keys, "kind": "array"}
  entry = {
    "name": name,
    "keys": keys,
    "kind": "qarray",
    "spec": str(leaf.spec),
    "shape": list(leaf.shape),
    "dtype": np.dtype(leaf.dtype).name,
    "packed": leaf.packed,
    "children": [c for c in _CHILDREN if getattr(leaf, c) is not None],
  }
  if leaf.perm is not None:
    entry["perm"] = list(leaf.perm)
  return entry


def _stored_parts(name: str, leaf) -> list[tuple[str, np.ndarray]]:
  """``[(stored tensor name, C-contiguous array)]`` of a concrete leaf, checked storable (and a
  QArray's scale and zero point finite)."""
  if not isinstance(leaf, QArray):
    return [(name, _as_numpy(leaf, name))]
  parts = []
  for child in _CHILDREN:
    value = getattr(leaf, child)
    if value is None:
      continue
    stored = _as_numpy(value, f"{name} ({child})")
    if child != "values" and not _finite(stored):
      raise ValueError(
        f"{name}: its {child} holds inf or NaN, so its values are lost; quantize it again "
        "from finite weights (jaxquant.quantize_params reports the source leaf)."
      )
    parts.append((f"{name}#{child}", stored))
  return parts


def save(path: str | os.PathLike, tree) -> Path:
  """Writes `tree` (arrays and QArrays in dicts/lists, or NNX State) atomically; returns the file.

  `path` is a file, or a folder (an existing one, or any path ending with ``/``; it is created)
  holding ``model.safetensors``. A symlink is followed: the file it points to is replaced and the
  link kept. Every leaf is validated and converted, and tensor names checked for collisions,
  before the first byte is written.
  """
  target = checkpoint_file(path)
  if target.is_symlink():
    target = target.resolve()
  arrays, entries = _stored_tensors(tree)
  tensors = {
    k: {"dtype": _safetensors_name(a.dtype), "shape": list(a.shape), "crc32": crc32(a)}
    for k, a in arrays.items()
  }
  metadata = _metadata(entries, tensors)
  specs = {
    k: TensorSpec(dtype=a.dtype.name, shape=a.shape, data_ptr=a.ctypes.data, data_len=a.nbytes)
    for k, a in arrays.items()
  }
  return atomic_write(target, lambda tmp: safetensors.serialize_file(specs, tmp, metadata=metadata))


def _metadata(entries: list[dict[str, Any]], tensors: dict[str, dict]) -> dict[str, str]:
  """The safetensors ``__metadata__`` of a checkpoint: the jaxquant header and its CRC-32."""
  header = {
    "format": FORMAT_NAME,
    "format_version": FORMAT_VERSION,
    "version": __version__,
    "leaves": entries,
    "tensors": tensors,
  }
  text = json.dumps(header)
  return {FORMAT_NAME: text, HEADER_CRC_KEY: str(crc32(text.encode()))}


@dataclasses.dataclass(frozen=True)
class _Slot:
  """Where one stored tensor goes: its leaf, dtype, shape and byte span in the data section."""

  leaf: str
  dtype: np.dtype
  shape: tuple[int, ...]
  begin: int
  end: int


def _abstract_parts(name: str, leaf) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
  """``[(stored name, dtype, shape)]`` of an abstract or concrete leaf."""
  if isinstance(leaf, QArray):
    children = [(c, getattr(leaf, c)) for c in _CHILDREN if getattr(leaf, c) is not None]
    parts = [(f"{name}#{c}", v) for c, v in children]
  else:
    parts = [(name, leaf)]
  out = []
  for stored, v in parts:
    dtype = np.dtype(v.dtype)
    if dtype not in _STORABLE:
      raise TypeError(f"{stored}: cannot store a {dtype} in a checkpoint.")
    out.append((stored, dtype, tuple(int(d) for d in np.shape(v))))
  return out


def _stream_slots(layout) -> tuple[list[tuple[str, dict]], dict[str, _Slot]]:
  """The header entries of `layout`'s leaves (in tree order) and every stored tensor's slot,
  laid out back to back in that order; rejects reserved, shared and duplicate names."""
  entries: list[tuple[str, dict]] = []
  slots: dict[str, _Slot] = {}
  end = 0
  for keys, leaf in _flat_leaves(layout):
    name = "/".join(str(k[1]) for k in keys)
    if any(name == n for n, _ in entries):
      raise ValueError(f"{name}: two leaves share this path; rename one before saving.")
    entries.append((name, _leaf_entry(name, keys, leaf)))
    for stored, dtype, shape in _abstract_parts(name, leaf):
      if stored == "__metadata__" or stored in slots:
        raise ValueError(f"{name}: stored as tensor '{stored}', which is reserved or taken.")
      nbytes = math.prod(shape) * dtype.itemsize
      slots[stored] = _Slot(name, dtype, shape, end, end + nbytes)
      end += nbytes
  return entries, slots


def _safetensors_header(metadata: dict[str, str], slots: dict[str, _Slot]) -> bytes:
  table: dict[str, Any] = {"__metadata__": metadata}
  for k, s in slots.items():
    table[k] = {
      "dtype": _safetensors_name(s.dtype),
      "shape": list(s.shape),
      "data_offsets": [s.begin, s.end],
    }
  return json.dumps(table, separators=(",", ":")).encode()


_MAX_CRC = 0xFFFFFFFF  # the widest CRC-32 in decimal: the header's space is sized with it


def save_streamed(
  path: str | os.PathLike,
  layout,
  leaf_for: Callable[[str], Any],
  *,
  progress: bool | Callable = False,
) -> Path:
  """Writes the checkpoint of a tree made one leaf at a time: memory holds one leaf.

  `layout` is the tree with abstract leaves (`jax.ShapeDtypeStruct`s, QArrays of them:
  `jax.eval_shape` of a quantizer gives one); ``leaf_for(name)`` makes the leaf at '/'-path
  `name` (a NumPy/jax array or QArray), which must match its layout exactly. Leaves are made in
  tree order and each is written, CRC'd and dropped before the next.

  The file is what `save` writes of the whole tree (same jaxquant header, byte for byte, so
  `load` returns the same tree), written in one pass into `atomic_write`'s temporary: the
  layout fixes every tensor's data offsets, so the data section is written first, starting
  past a header space sized for every CRC-32 at its widest (10 digits); the header with the
  real CRCs then goes at the front, padded to that space with spaces (JSON whitespace, as
  safetensors pads its own headers to 8 bytes). Only the padding can differ from `save`'s file
  (and the order of the data section, which the header indexes).
  """
  target = checkpoint_file(path)
  if target.is_symlink():
    target = target.resolve()
  entries, slots = _stream_slots(layout)
  crcs = dict.fromkeys(slots, _MAX_CRC)

  def header(crc: dict[str, int]) -> bytes:
    tensors = {
      k: {"dtype": _safetensors_name(s.dtype), "shape": list(s.shape), "crc32": crc[k]}
      for k, s in slots.items()
    }
    meta = _metadata([e for _, e in entries], tensors)
    if crc is crcs:
      meta[HEADER_CRC_KEY] = str(_MAX_CRC)
    return _safetensors_header(meta, slots)

  reserved = -(-len(header(crcs)) // 8) * 8
  by_leaf: dict[str, list[str]] = {}
  for k, s in slots.items():
    by_leaf.setdefault(s.leaf, []).append(k)

  def write(tmp: str) -> None:
    done: dict[str, int] = {}
    with open(tmp, "wb") as f:
      for name, entry in progress_bar(entries, "writing", progress):
        leaf = leaf_for(name)
        if _leaf_entry(name, entry["keys"], leaf) != entry:
          raise ValueError(f"{name}: the leaf made does not match its layout.")
        parts = _stored_parts(name, leaf)
        del leaf
        if [k for k, _ in parts] != by_leaf.get(name, []):
          raise ValueError(f"{name}: the leaf made stores other tensors than its layout.")
        for k, a in parts:
          s = slots[k]
          if a.dtype != s.dtype or a.shape != s.shape:
            raise ValueError(
              f"{k}: made as {a.dtype}{list(a.shape)}, but its layout says "
              f"{s.dtype}{list(s.shape)}."
            )
          f.seek(8 + reserved + s.begin)
          f.write(a.reshape(-1).view(np.uint8).data)
          done[k] = crc32(a)
        del parts
      head = header(done)
      f.seek(0)
      f.write(len(head.ljust(reserved)).to_bytes(8, "little") + head.ljust(reserved))

  return atomic_write(target, write)


#: ``quantizer(w, row)``: the QArray of float array `w` by its plan row (spec, batch_dims, path).
LeafQuantizer = Callable[[Any, PlanRow], QArray]


def round_to_nearest(w, row: PlanRow) -> QArray:
  """`numerics.quantize` of `w` by `row`, as `jaxquant.quantize_params` does it, compiled once
  per spec and shape: one fused pass over `w`, so no full-size temporaries (the same codes and
  scales as eager mode; checks of the values are the caller's, as under `jit`)."""
  if row.spec is None:
    raise ValueError(f"{row.path}: the plan keeps this leaf; there is nothing to quantize.")
  return _compiled_quantize(row.spec, row.batch_dims)(w)


@functools.lru_cache(maxsize=64)
def _compiled_quantize(spec: QuantSpec, batch_dims: int) -> Callable[[Any], QArray]:
  return jax.jit(functools.partial(quantize, spec=spec, batch_dims=batch_dims))


def quantize_streamed(
  path: str | os.PathLike,
  shapes,
  read: Callable[[str], np.ndarray],
  rules: Sequence[Rule] | Plan,
  *,
  quantizer: LeafQuantizer | None = None,
  on_leaf: Callable[[str, np.ndarray, Any], None] | None = None,
  progress: bool | Callable = False,
) -> tuple[Path, Plan]:
  """Quantizes a tree tensor by tensor into a checkpoint at `path`; returns it and the plan.

  `shapes` is the float tree with `jax.ShapeDtypeStruct` leaves (nothing read); ``read(name)``
  gives the array at '/'-path `name`. Each leaf is read, checked (finite, within its spec's
  scale range), quantized by `quantizer` (round to nearest by default) when the plan says so,
  passed to ``on_leaf(name, source, result)`` and written (`save_streamed`), so host memory
  holds one source tensor and its result at a time, never the model. The file equals what
  ``save(path, quantize_params(tree, rules))`` writes (`load` gives the same tree) for the
  default quantizer, and what ``save`` of the data-free recipe's result writes for its own.

  Only data-free quantization streams: methods that need calibration data (GPTQ, AWQ,
  SmoothQuant, mixed precision) run the model, so they need the whole tree in memory.
  """
  quantizer = quantizer or round_to_nearest
  p = rules if isinstance(rules, Plan) else plan(shapes, rules)
  p.check()
  p.warn_unused()
  rows = {r.path: r for r in p.rows}
  named = dict(named_leaves(shapes))

  def abstract(name: str):
    row, leaf = rows[name], named[name]
    if row.spec is None:
      return jax.ShapeDtypeStruct(row.shape, leaf.dtype)
    return jax.eval_shape(lambda w: quantizer(w, row), jax.ShapeDtypeStruct(row.shape, leaf.dtype))

  layout = map_leaves(lambda name, _: abstract(name), shapes)

  def leaf_for(name: str):
    row, w = rows[name], read(name)
    if tuple(np.shape(w)) != row.shape or np.dtype(w.dtype) != np.dtype(named[name].dtype):
      raise ValueError(
        f"{name}: read as {np.dtype(w.dtype)}{list(np.shape(w))}, expected "
        f"{np.dtype(named[name].dtype)}{list(row.shape)}."
      )
    out: Any = w
    if row.spec is not None:
      check_finite(w, name)
      check_scale_range(w, row.spec, name, row.batch_dims)
      out = quantizer(w, row)
    if on_leaf is not None:
      on_leaf(name, w, out)
    return out

  return save_streamed(path, layout, leaf_for, progress=progress), p


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
  """Writes `path` by ``write(tmp)`` into one temporary file beside it (``.NAME.PID.*.tmp``),
  synced, then renamed into place: readers see the old file or the whole new one, a failed write
  removes its temporary, and temporaries of this target left by dead processes are removed
  first. Concurrent writers of one target each rename a complete file; the last one wins. The
  file gets ordinary permissions (`regular_file_mode`), not mkstemp's 0600."""
  path = Path(path)
  if path.is_dir():
    raise IsADirectoryError(f"{path} is a folder; give a file name to write to.")
  path.parent.mkdir(parents=True, exist_ok=True)
  remove_stale_temporaries(path)
  fd, tmp = tempfile.mkstemp(
    dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=_TMP_SUFFIX
  )
  os.close(fd)
  try:
    write(tmp)
    with open(tmp, "rb") as f:
      os.fsync(f.fileno())
    os.chmod(tmp, regular_file_mode())
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise
  _sync_folder(path.parent)
  return path


def _sync_folder(folder: Path) -> None:
  try:
    fd = os.open(folder, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
  """Removes ``.NAME.PID.*.tmp`` files beside `path` whose writing process no longer runs
  (a save killed mid-write); returns what it removed. Live writers' files are kept."""
  path = Path(path)
  prefix = f".{path.name}."
  removed: list[Path] = []
  try:
    candidates = list(path.parent.iterdir())
  except OSError:
    return removed
  for p in candidates:
    rest = p.name[len(prefix) :]
    if not (p.name.startswith(prefix) and p.name.endswith(_TMP_SUFFIX)):
      continue
    pid = rest.split(".", 1)[0]
    if not pid.isdigit() or _pid_alive(int(pid)) or not p.is_file():
      continue
    p.unlink(missing_ok=True)
    removed.append(p)
  if removed:
    log.info("removed %d temporary file(s) of an interrupted save of %s", len(removed), path)
  return removed


def regular_file_mode() -> int:
  """The mode `open()` gives a new file: ``0o666`` less the process umask."""
  umask = os.umask(0)
  os.umask(umask)
  return 0o666 & ~umask


def _corrupt(path: Path, what: str) -> ValueError:
  return ValueError(f"{path}: {what}; the file is corrupt or not a checkpoint: {_REMAKE}.")


def read_header(path: str | os.PathLike) -> dict:
  """The safetensors JSON header of `path` (raises ValueError if it is not safetensors)."""
  header, _ = _read_index(checkpoint_file(path))
  return header


def _read_index(path: Path) -> tuple[dict, int]:
  """The safetensors header of `path`, checked for sound structure, and where its data starts.

  Every tensor entry has a known dtype, a shape of non-negative ints and data offsets that match
  its size; together they tile the data section exactly."""
  if path.is_dir():
    raise ValueError(f"{path} is a folder without {DEFAULT_FILENAME}.")
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise ValueError(f"{path} is truncated or not a safetensors file (only {len(head)} bytes).")
    n = int.from_bytes(head, "little")
    size = os.fstat(f.fileno()).st_size
    if n > size - 8:
      raise ValueError(
        f"{path} is truncated or not a safetensors file: its header claims {n} bytes but the "
        f"file has {size}. Re-create it with jaxquant.save."
      )
    try:
      header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
      raise ValueError(f"{path} is not a safetensors file (unreadable header).") from None
  if not isinstance(header, dict):
    raise ValueError(f"{path} is not a safetensors file (its header is not a JSON object).")
  meta = header.get("__metadata__", {})
  if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
    raise _corrupt(path, "its __metadata__ is not a map of strings")
  spans = []
  for name, t in header.items():
    if name != "__metadata__":
      spans.append((_tensor_span(path, name, t), name))
  end = 0
  for (begin, stop), name in sorted(spans):
    if begin != end:
      raise _corrupt(path, f"tensor {name} starts at byte {begin}, expected {end}")
    end = stop
  if end != size - 8 - n:
    what = "truncated" if end > size - 8 - n else "longer than its tensors"
    raise ValueError(
      f"{path} is {what}: its tensors take {end} bytes but {size - 8 - n} follow the header. "
      f"The file is corrupt: {_REMAKE}."
    )
  return header, 8 + n


def _tensor_span(path: Path, name: str, t) -> tuple[int, int]:
  if not (isinstance(t, dict) and {"dtype", "shape", "data_offsets"} <= t.keys()):
    raise _corrupt(path, f"tensor {name} lacks dtype, shape or data_offsets")
  dtype, shape, offsets = t["dtype"], t["shape"], t["data_offsets"]
  if dtype not in SAFETENSORS_DTYPES:
    raise ValueError(
      f"{path}: tensor {name} has dtype {dtype!r}, which jaxquant does not read (it reads "
      f"{', '.join(SAFETENSORS_DTYPES)}). Convert that tensor, or {_REMAKE}."
    )
  ints = [shape, offsets]
  if not all(isinstance(v, list) and all(type(i) is int and i >= 0 for i in v) for v in ints):
    raise _corrupt(path, f"tensor {name} has a malformed shape or data_offsets")
  if len(offsets) != 2 or offsets[0] > offsets[1]:
    raise _corrupt(path, f"tensor {name} has data_offsets {offsets}")
  nbytes = math.prod(shape) * np.dtype(SAFETENSORS_DTYPES[dtype]).itemsize
  if offsets[1] - offsets[0] != nbytes:
    raise _corrupt(
      path, f"tensor {name} of {dtype}{shape} needs {nbytes} bytes but spans {offsets}"
    )
  return offsets[0], offsets[1]


def _jaxquant_header(path: Path, index: dict) -> dict:
  """The jaxquant header of a checked safetensors `index`, its own checksum verified."""
  meta = index.get("__metadata__") or {}
  if FORMAT_NAME not in meta:
    raise ValueError(
      f"{path} is a safetensors file but not a jaxquant checkpoint (no '{FORMAT_NAME}' "
      "header). Read it as a parameter tree with jaxquant.interop.load_safetensors_params "
      "(layout='torch' for PyTorch weights), then quantize that with jaxquant.quantize_params."
    )
  text = meta[FORMAT_NAME]
  stored_crc = meta.get(HEADER_CRC_KEY)
  if stored_crc is not None and stored_crc != str(crc32(text.encode())):
    raise _corrupt(path, "the jaxquant header does not match its checksum")
  try:
    header = json.loads(text)
  except json.JSONDecodeError:
    raise _corrupt(path, "the jaxquant header is not valid JSON") from None
  version = header.get("format_version") if isinstance(header, dict) else None
  if type(version) is not int:
    raise _corrupt(path, "the jaxquant header has no format version")
  if version > FORMAT_VERSION:
    raise ValueError(
      f"{path} was written by jaxquant {header.get('version')} in checkpoint format "
      f"{version}; this jaxquant ({__version__}) reads formats up to {FORMAT_VERSION}. "
      "Upgrade jaxquant to read it."
    )
  if version not in READABLE_VERSIONS:
    raise ValueError(
      f"{path} is in checkpoint format {version}, which no released jaxquant wrote; this "
      f"jaxquant reads formats {', '.join(map(str, READABLE_VERSIONS))}. {_REMAKE.capitalize()}."
    )
  if version >= 2 and stored_crc is None:
    raise _corrupt(path, f"the format-{version} header lacks its checksum ({HEADER_CRC_KEY})")
  return header


def _check_tensor_table(path: Path, header: dict, index: dict) -> None:
  """Format 2: the stored tensors are exactly those the jaxquant header lists, with its dtypes
  and shapes (which catches a relabelled dtype or a permuted shape)."""
  table = header.get("tensors")
  if not isinstance(table, dict):
    raise _corrupt(path, "the jaxquant header has no tensor table")
  stored = {k for k in index if k != "__metadata__"}
  if stored != table.keys():
    odd = sorted(stored ^ table.keys())[0]
    raise _corrupt(path, f"tensor {odd} is in one of the two headers only")
  for name, want in table.items():
    got = index[name]
    if not (isinstance(want, dict) and type(want.get("crc32")) is int):
      raise _corrupt(path, f"tensor {name} has no CRC-32 in the jaxquant header")
    if not isinstance(want, dict) or [got["dtype"], got["shape"]] != [
      want.get("dtype"),
      want.get("shape"),
    ]:
      raise _corrupt(
        path,
        f"tensor {name} is stored as {got['dtype']}{got['shape']} but the jaxquant header says "
        f"{want.get('dtype') if isinstance(want, dict) else want}"
        f"{want.get('shape') if isinstance(want, dict) else ''}",
      )


def _read_tensor(f, path: Path, name: str, t: dict, start: int, want_crc: int | None):
  begin, end = t["data_offsets"]
  buf = np.empty(end - begin, np.uint8)
  f.seek(start + begin)
  if f.readinto(buf.data) != buf.size:
    raise ValueError(f"{path} is truncated (tensor {name}); the file is corrupt: {_REMAKE}.")
  if want_crc is not None and crc32(buf) != want_crc:
    raise _corrupt(path, f"tensor {name} does not match its checksum (changed on disk)")
  return buf.view(SAFETENSORS_DTYPES[t["dtype"]]).reshape(t["shape"])


class SafetensorsFile:
  """Any safetensors file, read lazily: its header (checked on opening), each tensor's shape
  and dtype, and one tensor at a time by name (bf16 and FP8 included)."""

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    if not self.path.is_file():
      raise FileNotFoundError(f"{self.path} does not exist.")
    self.index, self.start = _read_index(self.path)

  @property
  def names(self) -> list[str]:
    """Tensor names in file order."""
    spans = sorted((t["data_offsets"][0], n) for n, t in self.index.items() if n != "__metadata__")
    return [n for _, n in spans]

  def shape_dtype(self, name: str) -> jax.ShapeDtypeStruct:
    t = self.index[name]
    return jax.ShapeDtypeStruct(tuple(t["shape"]), np.dtype(SAFETENSORS_DTYPES[t["dtype"]]))

  def read(self, name: str) -> np.ndarray:
    """Tensor `name` (one read of its bytes into a fresh array)."""
    if name not in self.index or name == "__metadata__":
      raise KeyError(f"{self.path} has no tensor {name!r}.")
    with open(self.path, "rb") as f:
      return _read_tensor(f, self.path, name, self.index[name], self.start, None)


def iter_safetensors(path: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
  """The tensors of any safetensors file, one at a time in file order (``(name, array)``; bf16
  and FP8 included): memory holds one tensor, not the file. The header is checked first."""
  file = SafetensorsFile(path)
  with open(file.path, "rb") as f:
    for name in file.names:
      yield name, _read_tensor(f, file.path, name, file.index[name], file.start, None)


def load(path: str | os.PathLike, *, verify: bool = True):
  """Reads a checkpoint written by `save`: nested dicts (lists where saved) of jax arrays and
  QArrays (64-bit leaves as NumPy arrays unless ``jax_enable_x64``, so no value is cut to 32
  bits). NNX users restore a model with ``nnx.replace_by_pure_dict(state, load(path))``. Keys
  are str or int; tuples come back as lists, and ``None`` or empty containers are not stored.

  The header is validated against the stored tensors before anything is returned; with
  `verify` (default) every tensor's CRC-32 is checked too (``verify=False``: a trusted, faster
  load). Tensors are read one at a time, so memory peaks near the file's size plus its largest
  tensor. Any inconsistency is one `ValueError` naming the file and the leaf."""
  path = checkpoint_file(path)
  index, start = _read_index(path)
  header = _jaxquant_header(path, index)
  if header["format_version"] >= 2:
    _check_tensor_table(path, header, index)
  entries = header.get("leaves")
  if not isinstance(entries, list):
    raise _corrupt(path, "the jaxquant header lists no leaves")
  checked = [_checked_entry(path, e, index) for e in entries]
  used = {_stored_name(e, c) for e in checked for c in (e.get("children") or [None])}
  stray = sorted(set(index) - used - {"__metadata__"})
  if stray:
    raise _corrupt(path, f"tensor {stray[0]} belongs to no leaf of the header")
  table = header.get("tensors", {})
  leaves: list[tuple[list, Any]] = []
  with open(path, "rb") as f:

    def read(name: str) -> np.ndarray:
      want = table[name]["crc32"] if verify and name in table else None
      return _read_tensor(f, path, name, index[name], start, want)

    for entry in checked:
      leaves.append((entry["keys"], _leaf(path, entry, read)))
  try:
    return _unflatten(leaves)
  except (TypeError, KeyError, IndexError) as e:
    raise _corrupt(path, f"the leaves' tree paths conflict ({e})") from None


def _stored_name(entry: dict, child: str | None) -> str:
  return entry["name"] if entry["kind"] == "array" else f"{entry['name']}#{child}"


def _checked_entry(path: Path, entry, index: dict) -> dict:
  """`entry` if it is a well-formed leaf entry whose tensors are in the file, else ValueError."""
  name = entry.get("name") if isinstance(entry, dict) else None
  where = f"leaf {name}" if isinstance(name, str) else "a leaf entry"
  try:
    keys = entry["keys"]
    if not (
      isinstance(keys, list)
      and all(
        isinstance(k, list)
        and len(k) == 2
        and (k[0], type(k[1])) in {("dict", str), ("dict", int), ("seq", int)}
        for k in keys
      )
      and name == "/".join(str(k[1]) for k in keys)
    ):
      raise ValueError("its tree path does not match its name")
    if entry["kind"] == "array":
      needed = [name]
    elif entry["kind"] == "qarray":
      children = entry["children"]
      if not (isinstance(children, list) and set(children) <= set(_CHILDREN)):
        raise ValueError(f"unknown parts {children}")
      if "values" not in children:
        raise ValueError("the header lists no stored codes (values)")
      needed = [f"{name}#{c}" for c in children]
      QuantSpec.parse(entry["spec"])
      if not jnp.issubdtype(np.dtype(entry["dtype"]), jnp.floating):  # bf16, FP8 included
        raise ValueError(f"dtype {entry['dtype']!r} is not a floating dtype")
      if not isinstance(entry["packed"], bool):
        raise ValueError("'packed' is not a bool")
      if not all(type(i) is int and i >= 0 for i in entry["shape"]):
        raise ValueError(f"bad shape {entry['shape']}")
    else:
      raise ValueError(f"unknown kind {entry['kind']!r}")
  except (KeyError, TypeError, AttributeError, ValueError) as e:
    raise _corrupt(path, f"{where}: malformed header entry ({type(e).__name__}: {e})") from None
  for t in needed:
    if t not in index:
      raise _corrupt(path, f"{where}: tensor {t} listed in the header is missing")
  return entry


def _finite(a: np.ndarray) -> bool:
  return a.dtype.kind != "f" or bool(np.isfinite(a.astype(np.float32)).all())


def _leaf(
  path: Path, entry: dict, read: Callable[[str], np.ndarray]
) -> jax.Array | np.ndarray | QArray:
  name = entry["name"]
  if entry["kind"] == "array":
    value = read(name)
    if value.dtype.itemsize == 8 and not jax.config.read("jax_enable_x64"):
      return value.copy()  # NumPy keeps 64-bit values exactly; jax would cut them to 32 bits
    return jnp.asarray(value)
  children = {c: read(f"{name}#{c}") for c in entry["children"]}
  for c in ("scale", "zero_point"):
    v = children.get(c)
    if v is not None and not _finite(v):
      raise _corrupt(path, f"leaf {name}: its stored {c} holds inf or NaN")
  return _qarray_from_entry(entry, {c: jnp.asarray(v) for c, v in children.items()}, path)


def _qarray_from_entry(entry: dict, children: dict[str, jax.Array], path: Path) -> QArray:
  """The QArray a header entry describes, checked against the shape it records."""
  shape, perm = tuple(entry["shape"]), tuple(entry["perm"]) if entry.get("perm") else None
  packed = bool(entry["packed"])
  try:
    stored = in_stored_order(shape, perm)
    pad = stored[-1] % 2 if packed and stored else 0
    q = QArray(
      children["values"],
      children.get("scale"),
      children.get("zero_point"),
      QuantSpec.parse(entry["spec"]),
      np.dtype(entry["dtype"]),
      packed,
      pad,
      perm,
    )
  except (ValueError, TypeError, IndexError) as e:
    raise _corrupt(path, f"leaf {entry['name']}: {e}") from None
  if q.shape != shape:
    raise _corrupt(
      path,
      f"leaf {entry['name']}: the header says shape {list(shape)} but the stored codes give "
      f"{list(q.shape)}",
    )
  return q


def _unflatten(leaves: list[tuple[list, Any]]):
  root: dict = {}
  for keys, leaf in leaves:
    if not keys:
      return leaf
    node = root
    for _, k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1][1]] = leaf
  seq_paths = {
    tuple(k[1] for k in keys[:i]) for keys, _ in leaves for i, k in enumerate(keys) if k[0] == "seq"
  }
  return _lists_where_saved(root, (), seq_paths)


def _lists_where_saved(node, prefix: tuple, seq_paths: set):
  if not isinstance(node, dict):
    return node
  children = {k: _lists_where_saved(v, prefix + (k,), seq_paths) for k, v in node.items()}
  if prefix in seq_paths:
    return [children[i] for i in sorted(children)]
  return children


# --------------------------------------------------------------------------- Orbax
ORBAX_LAYOUT = "jaxquant_layout"
ORBAX_ARRAYS = "arrays"
#: ``sharding(path, shape)``: the sharding of the logical leaf at '/'-path `path` (a QArray's
#: children follow it, `qarray_sharding`), or None for one device.
LeafSharding = Callable[[str, tuple[int, ...]], jax.sharding.Sharding | None]


def _orbax():
  import orbax.checkpoint as ocp  # a core dependency (through flax), loaded only when used

  return ocp


def _orbax_checkpointer():
  """A checkpointer of the two items: the arrays (Orbax's standard handler) and the layout."""
  ocp = _orbax()
  handler = ocp.CompositeCheckpointHandler(
    **{ORBAX_ARRAYS: ocp.StandardCheckpointHandler(), ORBAX_LAYOUT: ocp.JsonCheckpointHandler()}
  )
  return ocp.Checkpointer(handler)


def save_orbax(path: str | os.PathLike, tree) -> Path:
  """Saves `tree` (arrays and QArrays, sharded or not, across processes too) as an Orbax
  checkpoint folder at `path`: the stored tensors as one flat tree of arrays (``t0``, ``t1``,
  ...) and, beside them, the jaxquant layout (every leaf's tree path, and a QArray's spec,
  dtype, packing and permutation: the header entries of `save`; each tensor's dtype and
  shape), so `load_orbax` needs no template. Orbax writes into a temporary folder and renames
  it when complete (atomic); every process calls it, as Orbax requires. Returns the folder."""
  ocp = _orbax()
  path = Path(path).absolute()
  arrays: dict[str, Any] = {}
  entries, tensors = [], {}
  for keys, leaf in _flat_leaves(tree):
    name = "/".join(str(k[1]) for k in keys)
    entries.append(_leaf_entry(name, keys, leaf))
    for value in _children(leaf):
      key = f"t{len(arrays)}"
      arrays[key] = value if isinstance(value, jax.Array) else np.asarray(value)
      dtype = np.dtype(arrays[key].dtype)
      if dtype not in _STORABLE:
        raise TypeError(f"{name}: cannot store a {dtype} in a checkpoint.")
      tensors[key] = {"dtype": _safetensors_name(dtype), "shape": list(arrays[key].shape)}
  layout = {"format": FORMAT_NAME, "version": __version__, "leaves": entries, "tensors": tensors}
  with _orbax_checkpointer() as checkpointer:
    checkpointer.save(
      path,
      ocp.args.Composite(
        **{ORBAX_ARRAYS: ocp.args.StandardSave(arrays), ORBAX_LAYOUT: ocp.args.JsonSave(layout)}
      ),
    )
  return path


def orbax_layout(path: str | os.PathLike) -> dict:
  """The jaxquant layout `save_orbax` stored beside the arrays of checkpoint `path`."""
  ocp = _orbax()
  if not Path(path).is_dir():
    raise FileNotFoundError(f"{path}: no such Orbax checkpoint folder.")
  try:
    with _orbax_checkpointer() as checkpointer:
      got = checkpointer.restore(
        Path(path).absolute(), ocp.args.Composite(**{ORBAX_LAYOUT: ocp.args.JsonRestore()})
      )
    layout = got[ORBAX_LAYOUT]
  except (KeyError, FileNotFoundError, ValueError):
    layout = None
  if not isinstance(layout, dict) or layout.get("format") != FORMAT_NAME:
    raise ValueError(
      f"{path}: an Orbax checkpoint without a jaxquant layout; save it with save_orbax."
    )
  return layout


def abstract_orbax(path: str | os.PathLike, sharding: LeafSharding | None = None):
  """The tree checkpoint `path` holds, unread: `jax.ShapeDtypeStruct` leaves (QArrays of them)
  with the shardings ``sharding(path, logical shape)`` gives (None: the first device)."""
  return _abstract_tree(orbax_layout(path), sharding, Path(path))


def _abstract_tree(layout: dict, sharding: LeafSharding | None, path: Path):
  stored = {
    k: jax.ShapeDtypeStruct(tuple(t["shape"]), np.dtype(SAFETENSORS_DTYPES[t["dtype"]]))
    for k, t in layout["tensors"].items()
  }
  names = iter(layout["tensors"])
  leaves = []
  for entry in layout["leaves"]:
    leaf: Any
    if entry["kind"] == "array":
      leaf = _abstract_array(entry["name"], stored[next(names)], sharding)
    else:
      parts = {c: stored[next(names)] for c in _CHILDREN if c in entry["children"]}
      leaf = _abstract_qarray(entry, parts, sharding, path)
    leaves.append((entry["keys"], leaf))
  return _unflatten(leaves)


def _first_device() -> jax.sharding.Sharding:
  return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _abstract_array(name: str, value, sharding: LeafSharding | None) -> jax.ShapeDtypeStruct:
  s = sharding(name, tuple(value.shape)) if sharding else None
  return jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=s or _first_device())


def _abstract_qarray(entry: dict, parts: dict, sharding: LeafSharding | None, path: Path) -> QArray:
  """A QArray of abstract children, placed after its logical tensor's sharding."""
  q = _qarray_from_entry(entry, parts, path)
  s = sharding(entry["name"], q.shape) if sharding else None
  if isinstance(s, jax.sharding.NamedSharding):
    placed = qarray_sharding(q, s)
    each = {c: getattr(placed, c) for c in parts}
  else:
    each = dict.fromkeys(parts, s or _first_device())
  children: dict[str, Any] = {
    c: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=each[c]) for c, v in parts.items()
  }
  return dataclasses.replace(q, **children)


def _children(leaf) -> list:
  """The arrays a leaf stores, in stored order (a QArray's children that are not None)."""
  if not isinstance(leaf, QArray):
    return [leaf]
  return [getattr(leaf, c) for c in _CHILDREN if getattr(leaf, c) is not None]


def load_orbax(path: str | os.PathLike, sharding: LeafSharding | None = None):
  """Restores a `save_orbax` checkpoint straight into its target shardings: every leaf (a
  QArray's children after the logical tensor's sharding, `qarray_sharding`) is read onto the
  devices ``sharding(path, logical shape)`` names, on any mesh shape, whatever mesh saved it
  (None: the first device). Arrays and QArrays come back bit for bit."""
  ocp = _orbax()
  layout = orbax_layout(path)
  abstract = _abstract_tree(layout, sharding, Path(path))
  flat = [child for _, leaf in _flat_leaves(abstract) for child in _children(leaf)]
  targets = dict(zip(layout["tensors"], flat, strict=True))
  with _orbax_checkpointer() as checkpointer:
    got = checkpointer.restore(
      Path(path).absolute(),
      ocp.args.Composite(**{ORBAX_ARRAYS: ocp.args.StandardRestore(targets)}),
    )
  arrays = iter(got[ORBAX_ARRAYS][k] for k in layout["tensors"])

  def fill(leaf):
    if isinstance(leaf, QArray):
      children = {c: next(arrays) if getattr(leaf, c) is not None else None for c in _CHILDREN}
      return dataclasses.replace(leaf, **children)
    return next(arrays)

  return jax.tree.map(fill, abstract, is_leaf=lambda x: isinstance(x, QArray))
