"""Checkpoints made elsewhere: plain safetensors files (Flax or PyTorch layout) as Flax-style
parameter trees."""

from __future__ import annotations

import os
import re

import numpy as np

from jaxquant.io import iter_safetensors

# Conv/linear weight layouts: PyTorch stores [out, in, *kernel]; Flax [*kernel, in, out].
_TORCH_TO_FLAX_AXES = {2: (1, 0), 3: (2, 1, 0), 4: (2, 3, 1, 0), 5: (2, 3, 4, 1, 0)}


def read_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of a safetensors file as NumPy arrays (bf16 and FP8 included), read one at a
  time (`jaxquant.io.iter_safetensors`)."""
  return dict(iter_safetensors(path))


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
    elif value.ndim not in _TORCH_TO_FLAX_AXES:
      raise ValueError(
        f"{name}: a {value.ndim}-D weight has no Flax layout (PyTorch Linear/Conv weights are "
        f"{min(_TORCH_TO_FLAX_AXES)}- to {max(_TORCH_TO_FLAX_AXES)}-D); load it with layout='flax'."
      )
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
