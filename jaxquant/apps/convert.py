"""One converter between the formats a Llama-family model lives in.

Sources: a GGUF file (``smollm2`` for the packaged one; Q8_0/Q4_0/Q4_1 kernels stay the file's
codes, exactly), a Hugging Face folder (``config.json`` + safetensors), or a jaxquant
checkpoint written by ``jaxquant quantize`` (its ``report.json`` names the model it came from).
Destinations, by name: ``*.gguf`` (llama.cpp; `llama.export_gguf`) or a jaxquant checkpoint
(a folder, or a ``.safetensors`` file: `jaxquant.save`, plus ``report.json`` so every command
reads it back). Everything is read and converted before the destination is written.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxquant import io
from jaxquant.apps.models import llama
from jaxquant.gguf_io import release_pages, to_float
from jaxquant.interop import LazyParams, nest, safetensors_files, torch_to_flax_name
from jaxquant.io import LeafQuantizer, SafetensorsFile, round_to_nearest
from jaxquant.ptq.steps import RTN
from jaxquant.qarray import QArray
from jaxquant.recipes import Recipe
from jaxquant.transforms import PlanRow


@dataclasses.dataclass(frozen=True)
class Source:
  """A read model: its `cfg`, `params` (QArray leaves where quantized), the `model` name that
  ``--model`` takes for it, and the GGUF file whose metadata and tokenizer it carries, if any."""

  cfg: llama.LlamaConfig
  params: dict
  model: str
  gguf: str | None
  recipe: str


def _gguf_path(model: str) -> str:
  return str(llama.smollm2_path()) if model == "smollm2" else model


def read_source(src: str) -> Source:
  """The model at `src`: ``smollm2``, a ``.gguf`` file, a Hugging Face folder or a jaxquant
  checkpoint folder (with ``report.json``)."""
  path = Path(src)
  if src == "smollm2" or src.endswith(".gguf"):
    if not Path(_gguf_path(src)).is_file():
      raise FileNotFoundError(f"{src}: no such GGUF file.")
    cfg, params = llama.load_gguf(_gguf_path(src), quantized=True)
    return Source(cfg, params, src, _gguf_path(src), "gguf")
  if (path / "config.json").is_file():
    cfg, params = llama.load_hf(path)
    return Source(cfg, params, src, None, "fp32")
  report_file = path / "report.json"
  if report_file.is_file():
    try:
      report = json.loads(report_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"{report_file}: not JSON ({e}); re-make it with quantize.") from None
    if not isinstance(report, dict):
      raise ValueError(f"{report_file}: not a report (a JSON object); re-make it with quantize.")
    model = str(report.get("model", ""))
    if not (
      model == "smollm2" or model.endswith(".gguf") or (Path(model) / "config.json").is_file()
    ):
      raise ValueError(
        f"{src}: its report names model {model!r}, which is not a Llama-family source "
        "(smollm2, a .gguf file or a Hugging Face folder) that this machine has."
      )
    if model == "smollm2" or model.endswith(".gguf"):
      cfg = llama.gguf_config(_gguf_path(model))
      gguf = _gguf_path(model)
    else:
      cfg, gguf = (
        llama.LlamaConfig.from_hf(json.loads((Path(model) / "config.json").read_text())),
        None,
      )
    params = io.load(path)
    llama.check_params(params, llama.param_shapes(cfg), src)
    return Source(cfg, params, model, gguf, str(report.get("recipe", "checkpoint")))
  raise FileNotFoundError(
    f"{src}: not smollm2, a .gguf file, a Hugging Face folder (config.json) or a jaxquant "
    "checkpoint folder (report.json, from `jaxquant quantize`)."
  )


def destination_kind(dst: str) -> str:
  """``"gguf"`` for ``*.gguf``, else ``"jaxquant"`` (a folder or a ``.safetensors`` file)."""
  return "gguf" if dst.lower().endswith(".gguf") else "jaxquant"


def exact_rules(params: dict) -> list[dict[str, Any]]:
  """One rule per QArray leaf, its exact path and spec (what `report.json` records)."""
  rules = []
  for p, leaf in jax.tree_util.tree_leaves_with_path(
    params, is_leaf=lambda x: isinstance(x, QArray)
  ):
    if isinstance(leaf, QArray):
      path = "/".join(str(k.key) for k in p)
      rules.append({"pattern": f"^{re.escape(path)}$", "weight": str(leaf.spec)})
  return rules


def convert(
  source: Source,
  dst: str | os.PathLike,
  *,
  metadata_from: str | None = None,
  requantize: bool = False,
  float_type: str = "F32",
  table_type: str = "F32",
) -> tuple[Path, dict[str, float]]:
  """Writes `source` to `dst`; returns the file and the error requantized leaves gained."""
  dst = str(dst)
  if destination_kind(dst) == "gguf":
    meta = metadata_from or source.gguf
    if meta is None:
      raise ValueError(
        f"{dst}: a GGUF file needs the metadata and tokenizer of a GGUF model; {source.model} "
        "has none. Give one with --metadata-from FILE.gguf (the same tokenizer and shapes)."
      )
    return llama.export_gguf(
      dst,
      source.cfg,
      source.params,
      _gguf_path(meta),
      requantize=requantize,
      float_type=float_type,
      table_type=table_type,
    )
  folder = Path(dst) if not dst.endswith(".safetensors") else Path(dst).parent
  target = Path(dst) / io.DEFAULT_FILENAME if folder == Path(dst) else Path(dst)
  file = io.save(target, source.params)
  report = {
    "model": source.model,
    "recipe": source.recipe,
    "rules": exact_rules(source.params),
    "file": str(file),
    "file_bytes": file.stat().st_size,
    "converted_from": source.model,
  }
  text = json.dumps(report, indent=1)
  io.atomic_write(folder / "report.json", lambda tmp: Path(tmp).write_text(text))
  return file, {}


# --------------------------------------------------------------------------- streamed sources
def lazy_gguf_params(path: str) -> tuple[llama.LlamaConfig, LazyParams]:
  """The float params `llama.load_gguf` gives, unread: the file is memory-mapped and each
  tensor dequantized (Q/K rows reordered, kernels transposed) only when asked, its pages then
  released from the resident set (`gguf_io.release_pages`)."""
  file = llama.gguf_file(path)
  cfg = llama.LlamaConfig.from_gguf(file.metadata, file.tensors)
  names = {llama.gguf_param_path(n): n for n in file.tensors}
  shapes = {}
  for target, name in names.items():
    shape = file.tensors[name].shape
    shapes[target] = jax.ShapeDtypeStruct(
      shape[::-1] if target.endswith("kernel") else shape, np.float32
    )

  def read(target: str) -> np.ndarray:
    name = names[target]
    w = to_float(file.tensors[name])
    rows = llama.gguf_rows(cfg, name)
    if rows is not None:
      w = w[rows]
    w = np.array(w.T if target.endswith("kernel") else w, order="C")  # a copy, off the map
    release_pages(file)
    return w

  return cfg, LazyParams(nest(shapes, path), read)


def lazy_hf_params(folder: str) -> tuple[llama.LlamaConfig, LazyParams]:
  """The float32 params `llama.load_hf` gives, unread: each tensor is read from its shard
  (cast to float32, PyTorch layouts transposed) only when asked; shapes checked against the
  model first."""
  path = Path(folder)
  cfg = llama.LlamaConfig.from_hf(json.loads((path / "config.json").read_text()))
  sources: dict[str, tuple[SafetensorsFile, str, tuple[int, ...] | None]] = {}
  shapes = {}
  for file in map(SafetensorsFile, safetensors_files(path)):
    for name in file.names:
      short = name.removeprefix("model.")
      if short == "lm_head.weight" and cfg.tie_embeddings:
        continue
      shape = file.shape_dtype(name).shape
      target, axes = torch_to_flax_name(short, len(shape))
      sources[target] = (file, name, axes)
      flax_shape = tuple(shape[a] for a in axes) if axes is not None else tuple(shape)
      shapes[target] = jax.ShapeDtypeStruct(flax_shape, np.float32)
  tree = nest(shapes, folder)
  llama.check_params(tree, llama.param_shapes(cfg), folder)

  def read(target: str) -> np.ndarray:
    file, name, axes = sources[target]
    w = file.read(name).astype(np.float32)
    return w if axes is None else np.ascontiguousarray(np.transpose(w, axes))

  return cfg, LazyParams(tree, read)


def streamable(recipe: Recipe) -> bool:
  """Whether `recipe` quantizes tensor by tensor: no selector and no step that needs data
  (round to nearest, HQQ); GPTQ, AWQ, SmoothQuant and mixed precision need the model."""
  selectors, smoothers, _ = recipe.build()
  return not (selectors or smoothers or recipe.needs_data)


def recipe_quantizer(recipe: Recipe) -> LeafQuantizer:
  """The per-tensor quantizer of a `streamable` recipe, as its data-free run applies it: the
  recipe's quantizer on the kernels it takes (not stacked), round to nearest elsewhere; each
  compiled once per spec and shape."""
  _, _, quantizer = recipe.build()
  if isinstance(quantizer, RTN) and not quantizer.float_zero:
    return round_to_nearest

  compiled = functools.lru_cache(maxsize=64)(
    lambda spec: jax.jit(lambda w: quantizer(w, None, spec)[0])
  )

  def one(w, row: PlanRow) -> QArray:
    if row.spec is not None and row.batch_dims == 0 and quantizer.eligible(row.spec, row.shape):
      return compiled(row.spec)(w)
    return round_to_nearest(w, row)

  return one
