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
import json
import os
import re
from pathlib import Path
from typing import Any

import jax

from jaxquant import io
from jaxquant.apps.models import llama
from jaxquant.qarray import QArray


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
