"""Checkpoints made elsewhere: plain safetensors files (Flax or PyTorch layout) as Flax-style
parameter trees."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxquant.io import LeafQuantizer, SafetensorsFile, iter_safetensors, quantize_streamed
from jaxquant.rules import Rule
from jaxquant.transforms import Plan

# Conv/linear weight layouts: PyTorch stores [out, in, *kernel]; Flax [*kernel, in, out].
_TORCH_TO_FLAX_AXES = {2: (1, 0), 3: (2, 1, 0), 4: (2, 3, 1, 0), 5: (2, 3, 4, 1, 0)}


def read_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of a safetensors file as NumPy arrays (bf16 and FP8 included), read one at a
  time (`jaxquant.io.iter_safetensors`)."""
  return dict(iter_safetensors(path))


def torch_to_flax_name(name: str, ndim: int) -> tuple[str, tuple[int, ...] | None]:
  """``(Flax path, axes)`` of a PyTorch tensor `name` of rank `ndim`: what `torch_to_flax`
  does, without the data (`axes`: the transpose to apply, None for none)."""
  parts = re.sub(r"\.(\d+)(?=\.|$)", r"_\1", name).split(".")
  leaf, axes = parts[-1], None
  if leaf == "weight":
    if ndim == 1 or "norm" in parts[-2].lower():
      leaf = "scale"
    elif "embed" in parts[-2].lower():
      leaf = "embedding"
    elif ndim not in _TORCH_TO_FLAX_AXES:
      raise ValueError(
        f"{name}: a {ndim}-D weight has no Flax layout (PyTorch Linear/Conv weights are "
        f"{min(_TORCH_TO_FLAX_AXES)}- to {max(_TORCH_TO_FLAX_AXES)}-D); load it with layout='flax'."
      )
    else:
      leaf, axes = "kernel", _TORCH_TO_FLAX_AXES[ndim]
  return "/".join(parts[:-1] + [leaf]), axes


def torch_to_flax(name: str, value: np.ndarray) -> tuple[str, np.ndarray]:
  """Renames and transposes one PyTorch tensor to Flax conventions.

  ``*.weight`` of Linear/Conv layers becomes ``kernel`` (``[in, out]``, ``[*k, in, out]``),
  of embeddings ``embedding`` (unchanged), of norms ``scale``; ``layer.N`` becomes ``layer_N``.
  """
  key, axes = torch_to_flax_name(name, value.ndim)
  if axes is not None:
    value = np.transpose(value, axes)
  return key, np.ascontiguousarray(value)


def load_safetensors_params(path: str | os.PathLike, layout: str = "flax") -> dict:
  """A nested params dict from a plain safetensors file.

  Tensor names are split on '.' into the tree. ``layout="torch"`` converts PyTorch names and
  weight layouts to Flax ones (`torch_to_flax`); ``"flax"`` keeps tensors as they are.
  """
  if layout not in ("flax", "torch"):
    raise ValueError(f"layout must be 'flax' or 'torch', got {layout!r}.")
  tree: dict = {}
  for name, value in read_tensors(path).items():
    if layout == "torch":
      key, value = torch_to_flax(name, value)
      parts = key.split("/")
    else:
      parts = name.split(".")
    node = tree
    for p in parts[:-1]:
      node = node.setdefault(p, {})
      if not isinstance(node, dict):
        raise ValueError(f"{path}: tensor {name!r} nests under another tensor's name.")
    node[parts[-1]] = value
  return tree


def safetensors_files(path: str | os.PathLike) -> list[Path]:
  """The safetensors files of `path`: the file itself, or a folder's shards (those its
  ``model.safetensors.index.json`` maps, else every ``*.safetensors``)."""
  path = Path(path)
  if path.is_file():
    return [path]
  index = path / "model.safetensors.index.json"
  if index.is_file():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise ValueError(f"{index}: not a safetensors index ({type(e).__name__}: {e}).") from None
    files = [path / f for f in sorted(set(weight_map.values()))]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
      raise FileNotFoundError(
        f"{index} maps tensors to {missing[0]}, which is not in {path}; download every shard."
      )
    return files
  files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
  if not files:
    raise FileNotFoundError(f"{path}: no safetensors file, or a folder without *.safetensors.")
  return files


def nest(flat: dict[str, Any], where: str = "params") -> dict:
  """A nested dict from '/'-separated paths; ValueError when one path nests under another."""
  tree: dict = {}
  for name, value in flat.items():
    *parents, leaf = name.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
      if not isinstance(node, dict):
        raise ValueError(f"{where}: tensor {name!r} nests under another tensor's name.")
    if isinstance(node.get(leaf), dict):
      raise ValueError(f"{where}: tensor {name!r} nests under another tensor's name.")
    node[leaf] = value
  return tree


@dataclasses.dataclass(frozen=True)
class LazyParams:
  """A params tree not yet read: `shapes` (nested dicts of `jax.ShapeDtypeStruct`) and
  ``read(path)``, the array at a '/'-path (read from disk when asked, laid out as `shapes` says)."""

  shapes: dict
  read: Callable[[str], np.ndarray]


def lazy_safetensors_params(path: str | os.PathLike, layout: str = "flax") -> LazyParams:
  """`load_safetensors_params` of a file or a folder of shards, without reading any tensor:
  the same tree paths, shapes and dtypes, each tensor read (and transposed, for
  ``layout="torch"``) only when asked."""
  if layout not in ("flax", "torch"):
    raise ValueError(f"layout must be 'flax' or 'torch', got {layout!r}.")
  sources: dict[str, tuple[SafetensorsFile, str, tuple[int, ...] | None]] = {}
  shapes: dict[str, jax.ShapeDtypeStruct] = {}
  for file in map(SafetensorsFile, safetensors_files(path)):
    for name in file.names:
      sd = file.shape_dtype(name)
      axes = None
      if layout == "torch":
        key, axes = torch_to_flax_name(name, len(sd.shape))
      else:
        key = name.replace(".", "/")
      if key in sources:
        raise ValueError(f"{path}: two tensors give the parameter {key!r}.")
      shape = tuple(sd.shape[a] for a in axes) if axes is not None else tuple(sd.shape)
      sources[key] = (file, name, axes)
      shapes[key] = jax.ShapeDtypeStruct(shape, sd.dtype)

  def read(key: str) -> np.ndarray:
    file, name, axes = sources[key]
    value = file.read(name)
    return value if axes is None else np.ascontiguousarray(np.transpose(value, axes))

  return LazyParams(nest(shapes, str(path)), read)


def quantize_safetensors(
  src: str | os.PathLike,
  dst: str | os.PathLike,
  rules: Sequence[Rule] | Plan,
  *,
  layout: str = "flax",
  quantizer: LeafQuantizer | None = None,
  on_leaf: Callable[[str, np.ndarray, Any], None] | None = None,
  progress: bool | Callable = False,
) -> tuple[Path, Plan]:
  """Quantizes a plain safetensors checkpoint (a file, or a folder of shards) into a jaxquant
  checkpoint at `dst`, tensor by tensor (`jaxquant.io.quantize_streamed`): peak memory is
  about the largest tensor and its result, not the model. The file is what ``save(dst,
  quantize_params(load_safetensors_params(src, layout), rules))`` writes."""
  lazy = lazy_safetensors_params(src, layout)
  return quantize_streamed(
    dst, lazy.shapes, lazy.read, rules, quantizer=quantizer, on_leaf=on_leaf, progress=progress
  )
