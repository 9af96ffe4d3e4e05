"""Checkpoints made elsewhere: plain safetensors files (Flax or PyTorch layout) as Flax-style
parameter trees."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import safetensors

from jaxquant.io import SAFETENSORS_DTYPES, read_header

# Conv/linear weight layouts: PyTorch stores [out, in, *kernel]; Flax [*kernel, in, out].
_TORCH_TO_FLAX_AXES = {2: (1, 0), 3: (2, 1, 0), 4: (2, 3, 1, 0), 5: (2, 3, 4, 1, 0)}


def read_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of a safetensors file as NumPy arrays (bf16 and FP8 included)."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path} does not exist.")
  read_header(path)  # clear error for truncated or foreign files
  try:
    raw = safetensors.deserialize(path.read_bytes())
  except safetensors.SafetensorError as e:
    raise ValueError(f"{path} is truncated or corrupt ({e}).") from None
  return {
    name: np.frombuffer(bytes(t["data"]), SAFETENSORS_DTYPES[t["dtype"]]).reshape(t["shape"]).copy()
    for name, t in raw
  }


def torch_to_flax(name: str, value: np.ndarray) -> tuple[str, np.ndarray]:
  """Renames and transposes one PyTorch tensor to Flax conventions.

  ``*.weight`` of Linear/Conv layers becomes ``kernel`` (``[in, out]``, ``[*k, in, out]``),
  of embeddings ``embedding`` (unchanged), of norms ``scale``; ``layer.N`` becomes ``layer_N``.
  """
  parts = re.sub(r"\.(\d+)(?=\.|$)", r"_\1", name).split(".")
  leaf = parts[-1]
  if leaf == "weight":
    if value.ndim == 1 or "norm" in parts[-2].lower():
      leaf = "scale"
    elif "embed" in parts[-2].lower():
      leaf = "embedding"
    else:
      leaf, value = "kernel", np.transpose(value, _TORCH_TO_FLAX_AXES[value.ndim])
  return "/".join(parts[:-1] + [leaf]), np.ascontiguousarray(value)


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
