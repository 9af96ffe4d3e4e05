"""Checkpoints: quantized pytrees as safetensors files with a self-describing header.

Every tensor is stored in its own dtype (int8, packed uint8 for 4-bit formats, FP8, bf16,
float32), so the file is as large as the theory says plus a small JSON header. The header's
``__metadata__["jaxquant"]`` entry records, per leaf, its tree path, the spec string, logical
shape and dtype, and the library version. Writes go to a temporary file in the same folder
that is renamed into place, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors
from safetensors import TensorSpec

from jaxquant._version import __version__
from jaxquant.qarray import QArray, in_stored_order
from jaxquant.spec import QuantSpec

FORMAT_NAME = "jaxquant"
FORMAT_VERSION = 1
DEFAULT_FILENAME = "model.safetensors"

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


def _resolve(path: str | os.PathLike) -> Path:
  path = Path(path)
  return path / DEFAULT_FILENAME if path.is_dir() else path


def _encode_key(key) -> list:
  if isinstance(key, jax.tree_util.SequenceKey):
    return ["seq", key.idx]
  if isinstance(key, jax.tree_util.DictKey):
    return ["dict", key.key if isinstance(key.key, int) else str(key.key)]
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
  return np.ascontiguousarray(arr)


def save(path: str | os.PathLike, tree) -> Path:
  """Writes `tree` (arrays and QArrays in dicts/lists, or NNX State) atomically; returns the file.

  `path` is a file, or an existing folder (the file is then ``model.safetensors`` in it).
  Everything is validated and converted before the first byte is written.
  """
  target = _resolve(path)
  arrays: dict[str, np.ndarray] = {}
  entries: list[dict[str, Any]] = []
  for keys, leaf in _flat_leaves(tree):
    name = "/".join(str(k[1]) for k in keys)
    if name in arrays or any(name == e["name"] for e in entries):
      raise ValueError(f"{name}: two leaves share this path; rename one before saving.")
    entry: dict[str, Any]
    if isinstance(leaf, QArray):
      entry = {
        "name": name,
        "keys": keys,
        "kind": "qarray",
        "spec": str(leaf.spec),
        "shape": list(leaf.shape),
        "dtype": np.dtype(leaf.dtype).name,
        "packed": leaf.packed,
        "children": [],
      }
      if leaf.perm is not None:
        entry["perm"] = list(leaf.perm)
      for child in _CHILDREN:
        value = getattr(leaf, child)
        if value is not None:
          arrays[f"{name}#{child}"] = _as_numpy(value, f"{name} ({child})")
          entry["children"].append(child)
    else:
      arrays[name] = _as_numpy(leaf, name)
      entry = {"name": name, "keys": keys, "kind": "array"}
    entries.append(entry)
  header = {
    "format": FORMAT_NAME,
    "format_version": FORMAT_VERSION,
    "version": __version__,
    "leaves": entries,
  }
  specs = {
    k: TensorSpec(dtype=a.dtype.name, shape=a.shape, data_ptr=a.ctypes.data, data_len=a.nbytes)
    for k, a in arrays.items()
  }
  return atomic_write(
    target,
    lambda tmp: safetensors.serialize_file(specs, tmp, metadata={FORMAT_NAME: json.dumps(header)}),
  )


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
  """Writes `path` by ``write(tmp)`` into a temporary file beside it, synced, then renamed into
  place: readers see the old file or the whole new one, and a failed write leaves no debris.
  The file gets ordinary permissions (`regular_file_mode`), not mkstemp's 0600."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
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
  return path


def regular_file_mode() -> int:
  """The mode `open()` gives a new file: ``0o666`` less the process umask."""
  umask = os.umask(0)
  os.umask(umask)
  return 0o666 & ~umask


def read_header(path: str | os.PathLike) -> dict:
  """The safetensors JSON header of `path` (raises ValueError if it is not safetensors)."""
  path = _resolve(path)
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
      return json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
      raise ValueError(f"{path} is not a safetensors file (unreadable header).") from None


def _jaxquant_header(path: Path) -> dict:
  meta = read_header(path).get("__metadata__") or {}
  if FORMAT_NAME not in meta:
    raise ValueError(
      f"{path} is a safetensors file but not a jaxquant checkpoint (no '{FORMAT_NAME}' "
      "header). Read it as a parameter tree with jaxquant.interop.load_safetensors_params "
      "(layout='torch' for PyTorch weights), then quantize that with jaxquant.quantize_params."
    )
  header = json.loads(meta[FORMAT_NAME])
  if header.get("format_version", 0) > FORMAT_VERSION:
    raise ValueError(
      f"{path} was written by jaxquant {header.get('version')} in checkpoint format "
      f"{header['format_version']}; this jaxquant ({__version__}) reads format "
      f"{FORMAT_VERSION}. Upgrade jaxquant."
    )
  return header


def load(path: str | os.PathLike):
  """Reads a checkpoint written by `save`: nested dicts (lists where saved) of jax arrays and
  QArrays. NNX users restore a model with ``nnx.replace_by_pure_dict(state, load(path))``."""
  path = _resolve(path)
  header = _jaxquant_header(path)
  try:
    raw = dict(safetensors.deserialize(path.read_bytes()))
  except safetensors.SafetensorError as e:
    raise ValueError(
      f"{path} is truncated or corrupt ({e}); re-create it with jaxquant.save."
    ) from None
  tensors = {
    name: np.frombuffer(bytes(t["data"]), SAFETENSORS_DTYPES[t["dtype"]]).reshape(t["shape"])
    for name, t in raw.items()
  }
  leaves = []
  for entry in header["leaves"]:
    name = entry["name"]
    leaf: jax.Array | QArray
    try:
      if entry["kind"] == "array":
        leaf = jnp.asarray(tensors[name])
      else:
        children = {c: jnp.asarray(tensors[f"{name}#{c}"]) for c in entry["children"]}
        leaf = _qarray_from_entry(entry, children, path)
    except KeyError as e:
      raise ValueError(
        f"{path}: tensor {e} listed in the header is missing; file is corrupt."
      ) from None
    leaves.append((entry["keys"], leaf))
  return _unflatten(leaves)


def _qarray_from_entry(entry: dict, children: dict[str, jax.Array], path: Path) -> QArray:
  """The QArray a header entry describes, checked against the shape it records."""
  shape, perm = tuple(entry["shape"]), tuple(entry["perm"]) if entry.get("perm") else None
  packed = bool(entry["packed"])
  stored = in_stored_order(shape, perm)
  pad = stored[-1] % 2 if packed and stored else 0
  values = children.get("values")
  if values is None:
    raise ValueError(
      f"{path}: {entry['name']}: the header lists no stored codes (values); the file is corrupt."
    )
  try:
    q = QArray(
      values,
      children.get("scale"),
      children.get("zero_point"),
      QuantSpec.parse(entry["spec"]),
      np.dtype(entry["dtype"]),
      packed,
      pad,
      perm,
    )
  except (ValueError, TypeError) as e:
    raise ValueError(f"{path}: {entry['name']}: {e}; the file is corrupt.") from None
  if q.shape != shape:
    raise ValueError(
      f"{path}: {entry['name']}: the header says shape {list(shape)} but the stored codes "
      f"give {list(q.shape)}; the file is corrupt."
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
