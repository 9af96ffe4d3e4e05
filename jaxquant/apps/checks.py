"""What the command line checks before any work: output paths, checkpoints against the model
they are run on, and how an error is told (one line for the user's mistakes).

    check_output("out/q", "dir", overwrite=False)    # UsageError now, not after quantizing
    check_checkpoint("out/q", "smollm2", llm_shapes())  # paths and shapes, from headers
    user_message(error)                              # one line, or None for a bug
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp

from jaxquant import io, transforms
from jaxquant.apps.models import llama, minilm
from jaxquant.rules import Rule

Shapes = dict[str, tuple[int, ...]]


class UsageError(ValueError):
  """Input the user must fix (a path, an option, a checkpoint): one ``error:`` line, exit 2."""


def one_line(text: str) -> str:
  """`text` with every run of whitespace (newlines included) made one space."""
  return " ".join(text.split())


# --------------------------------------------------------------------------- output paths
def check_output(
  path: str | os.PathLike,
  kind: Literal["file", "dir"],
  overwrite: bool = False,
  what: str = "--out",
) -> Path:
  """`path` if a command can write it as a `kind` there, else `UsageError`; creates nothing.

  A file or a folder with files in it is replaced only with `overwrite`; missing folders on
  the way are fine (the command makes them) if the nearest existing one is writable.
  """
  path = Path(path)
  if path.is_dir():
    if kind == "file":
      raise UsageError(f"{what} {path} is a folder; give a file name in it or elsewhere.")
    if not overwrite and any(path.iterdir()):
      raise UsageError(
        f"{what} {path} is a folder with files in it; pass --overwrite to replace the files "
        "this command writes there, or give a new folder."
      )
    _check_writable(path, path, what)
    return path
  if path.exists() or path.is_symlink():
    if kind == "dir":
      raise UsageError(f"{what} {path} is a file; give a folder (new, or empty).")
    if not overwrite:
      raise UsageError(f"{what} {path} exists; pass --overwrite to replace it, or give a new name.")
  parent = _nearest_existing(path.parent)
  if not parent.is_dir():
    raise UsageError(f"{what} {path}: {parent} is a file, not a folder; choose a path outside it.")
  _check_writable(parent, path, what)
  return path


def _nearest_existing(folder: Path) -> Path:
  while not folder.exists() and folder != folder.parent:
    folder = folder.parent
  return folder


def _check_writable(folder: Path, path: Path, what: str) -> None:
  """Creates and removes a probe file in `folder`: the test that a write there will work."""
  try:
    fd, probe = tempfile.mkstemp(dir=folder, prefix=".jaxquant-probe-")
  except OSError as e:
    raise UsageError(
      f"{what} {path}: cannot write in {folder} ({e.strerror}); check its permissions or "
      "choose another path."
    ) from None
  os.close(fd)
  os.unlink(probe)


# --------------------------------------------------------------------------- checkpoints
def checkpoint_shapes(path: str | os.PathLike) -> Shapes:
  """Parameter paths and logical shapes of a jaxquant checkpoint (file or folder), read from
  its header alone: ``{"encoder/layer_0/.../kernel": (384, 384), ...}``."""
  header = io.read_header(path)
  meta = (header.get("__metadata__") or {}).get(io.FORMAT_NAME)
  if meta is None:
    raise UsageError(
      f"{path} is not a jaxquant checkpoint (no '{io.FORMAT_NAME}' header); write one with "
      "`jaxquant quantize` or jaxquant.save."
    )
  try:
    leaves = json.loads(meta)["leaves"]
    return {
      e["name"]: tuple(e["shape"] if e["kind"] == "qarray" else header[e["name"]]["shape"])
      for e in leaves
    }
  except (ValueError, KeyError, TypeError) as e:
    raise UsageError(f"{path}: its jaxquant header is unreadable ({e}); write it again.") from None


def model_shapes(module: Any, *inputs: Any) -> Shapes:
  """Parameter paths and shapes that ``module.init(key, *inputs)`` makes, traced abstractly
  (no weights are made)."""
  tree = jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs))["params"]
  return {path: tuple(leaf.shape) for path, leaf in transforms.named_leaves(tree)}


def minilm_shapes() -> Shapes:
  """The parameters of the packaged all-MiniLM-L6-v2 (`minilm.MiniLM`)."""
  return model_shapes(minilm.MiniLM(minilm.load_config()), jnp.zeros((1, 8), jnp.int32))


def llm_shapes(gguf: str | None = None) -> Shapes:
  """The parameters of the Llama-family model in a GGUF file (default: SmolLM2), from its
  header (the tensors stay on disk; the header is parsed once a process)."""
  return model_shapes(llama.Llama(llama.gguf_config(gguf)), jnp.zeros((1, 1), jnp.int32))


def looks_like(shapes: Mapping[str, tuple[int, ...]]) -> str:
  """What model a parameter tree is, from its names: ``"a Llama-family LLM (30 layers, dim
  576)"``, ``"a MiniLM/BERT encoder (6 layers, dim 384)"``..."""
  kinds = (
    ("embeddings/word_embeddings/embedding", r"encoder/layer_(\d+)/", "a MiniLM/BERT encoder"),
    ("embed_tokens/embedding", r"layers_(\d+)/", "a Llama-family LLM"),
    ("embed/embedding", r"layers_(\d+)/", "the byte-level decoder"),
  )
  for embedding, layer, name in kinds:
    if embedding in shapes:
      layers = {m.group(1) for p in shapes if (m := re.match(layer, p))}
      return f"{name} ({len(layers)} layers, dim {shapes[embedding][-1]})"
  some = next(iter(shapes), "no parameters")
  return f"no model jaxquant knows ({len(shapes)} tensors, e.g. {some})"


def first_mismatch(got: Mapping[str, tuple], want: Mapping[str, tuple]) -> str | None:
  """The first path (in sorted order) where `got` differs from `want`, said in words."""
  for path in sorted(got.keys() | want.keys()):
    if path not in got:
      return f"it has no {path} (the model's is {list(want[path])})"
    if path not in want:
      return f"it has {path} {list(got[path])}, which the model lacks"
    if tuple(got[path]) != tuple(want[path]):
      return f"its {path} is {list(got[path])}, the model's is {list(want[path])}"
  return None


def read_report(folder: str | os.PathLike) -> dict:
  """The ``report.json`` that `jaxquant quantize` wrote beside a checkpoint, checked."""
  file = Path(folder) / "report.json"
  if not Path(folder).exists():
    raise UsageError(
      f"--checkpoint {folder}: no such folder; make one with `jaxquant quantize --out {folder}`."
    )
  if not file.is_file():
    raise UsageError(
      f"--checkpoint {folder} has no report.json; give a folder written by `jaxquant quantize`."
    )
  try:
    report = json.loads(file.read_text(encoding="utf-8"))
    if not isinstance(report.get("recipe"), str) or not isinstance(report.get("rules"), list):
      raise ValueError("no 'recipe' name or 'rules' list")
    for r in report["rules"]:
      Rule(**r)
  except (ValueError, AttributeError, TypeError) as e:
    raise UsageError(f"{file} is not a `jaxquant quantize` report ({e}); quantize again.") from None
  return report


def check_checkpoint(
  checkpoint: str | os.PathLike,
  model: str,
  expected: Mapping[str, tuple[int, ...]],
  report: dict | None = None,
  remedy: str = "",
) -> None:
  """Raises `UsageError` unless the parameters of `checkpoint` are those `model` expects (same
  paths and shapes), and, when its `report` names the model it came from, that is `model`.
  `remedy` ends the message (default: run the model it came from, or quantize `model`)."""
  if not Path(checkpoint).exists():
    raise UsageError(
      f"--checkpoint {checkpoint}: no such file or folder; make one with `jaxquant quantize`."
    )
  made_from = (report or {}).get("model")
  got = checkpoint_shapes(checkpoint)
  if got and all(p.startswith("params/") for p in got):  # a saved {"params": ...}
    got = {p.removeprefix("params/"): s for p, s in got.items()}
  problem = first_mismatch(got, expected)
  if problem is not None:
    source = f", quantized from --model {made_from}" if made_from else ""
    raise UsageError(
      f"--checkpoint {checkpoint} does not fit --model {model}: {problem}; the checkpoint "
      f"looks like {looks_like(got)}{source}. "
      + (remedy or f"Give the --model it was made from, or `jaxquant quantize --model {model}`.")
    )
  if made_from is not None and made_from != model:
    raise UsageError(
      f"--checkpoint {checkpoint} was quantized from --model {made_from}, not {model}; give "
      f"--model {made_from}, or quantize --model {model}."
    )


# --------------------------------------------------------------------------- errors
_OS_FIXES: tuple[tuple[type[OSError], str], ...] = (
  (PermissionError, "check its permissions or choose another path"),
  (IsADirectoryError, "give a file, not a folder"),
  (NotADirectoryError, "a part of that path is a file, not a folder"),
  (FileNotFoundError, "check the path"),
)


def user_message(error: BaseException) -> str | None:
  """The one-line message for an error the user can fix (`ValueError`, which `UsageError` and
  the library's checks of its input raise; `OSError`: missing, unreadable or unwritable
  paths), or None for anything else: a bug, to be shown with its traceback."""
  if isinstance(error, OSError):
    if error.filename is None:  # raised with a message of ours
      return one_line(str(error))
    fix = next((f for t, f in _OS_FIXES if isinstance(error, t)), "")
    where = f"{error.filename}" + (f" -> {error.filename2}" if error.filename2 else "")
    return f"{where}: {error.strerror or error}" + (f"; {fix}." if fix else ".")
  if isinstance(error, ValueError):
    return one_line(str(error))
  return None
