"""The ``jaxquant`` command line.

jaxquant quantize --model minilm --recipe int8 --out out/minilm-int8
jaxquant quantize --model weights.safetensors --layout torch --recipe int4:g128 --out q/
jaxquant plan --model minilm --recipe w4g128
jaxquant embed --model minilm --recipe w8a8 --sentences s.txt --out emb.npy
jaxquant eval --model minilm --recipes fp32,w8,w8a8,w4g128 --json results.json
jaxquant quantize --model smollm2 --recipe w4g64-gptq --calibration my.txt --out out/smol-w4
jaxquant eval --model smollm2 --recipes fp32,w8,w4g64-gptq --text held_out.txt --window 512
jaxquant generate --model smollm2 --checkpoint out/smol-w4 --prompt "The capital of France is"
jaxquant recipes
jaxquant export --model minilm --recipe w8a8 --out out/minilm-w8a8-export

Exit status 0: done; 2: bad input (one ``error:`` line on stderr; ``--debug`` adds the
traceback); 1: an internal error (with its traceback). Every output path is checked before
any work, and an existing output is replaced only with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import jax
import jax.numpy as jnp
import numpy as np
from rich.console import Console, JustifyMethod
from rich.table import Table

from jaxquant import export, interop, io, transforms
from jaxquant.apps import bench, checks, convert, data, evaluate, language, serving
from jaxquant.apps.checks import UsageError, check_output
from jaxquant.apps.models import llama, minilm
from jaxquant.apps.models.cache import CacheKind
from jaxquant.apps.models.decoder import Decoder
from jaxquant.numerics import quantization_error
from jaxquant.recipes import Recipe, apply_recipe, load_recipe, recipe_names, resolved_recipe
from jaxquant.rules import Rule

# Wide enough for full parameter paths when the output goes to a file or pipe.
console = Console() if sys.stdout.isatty() else Console(width=150)


LLM_HELP = "'smollm2' (the packaged GGUF), a Llama-family .gguf file or Hugging Face folder"


def is_llm(model: str) -> bool:
  """``smollm2``, a ``.gguf`` file or a Hugging Face model folder (config.json)."""
  return model == "smollm2" or model.endswith(".gguf") or (Path(model) / "config.json").is_file()


def _llm_source(model: str) -> dict:
  """`language.language_model` keywords for an LLM ``--model``."""
  if model == "smollm2":
    return {}
  if model.endswith(".gguf"):
    if not Path(model).is_file():
      raise FileNotFoundError(f"--model {model}: no such GGUF file.")
    return {"gguf": model}
  return {"hf": model}


def load_model_params(model: str, layout: str | None) -> tuple[dict, str]:
  """``(params, description)`` for ``minilm``, an LLM (`is_llm`) or a ``.safetensors`` file."""
  if model == "minilm":
    return minilm.load_params(), f"all-MiniLM-L6-v2 ({minilm.checkpoint_path()})"
  if is_llm(model):
    source = _llm_source(model)
    cfg, params, _ = language.load_source(**source)
    where = source.get("hf") or source.get("gguf") or llama.smollm2_path()
    return params, f"{where} ({cfg.layers} layers, dim {cfg.dim}; float32)"
  path = Path(model)
  if not path.is_file():
    raise FileNotFoundError(
      f"--model {model!r} is not 'minilm', {LLM_HELP}, or an existing .safetensors file."
    )
  meta = (io.read_header(path).get("__metadata__") or {}).get(io.FORMAT_NAME)
  if meta is not None:
    raise UsageError(
      f"--model {model}: already a jaxquant checkpoint (quantized leaves); quantize the float "
      "model it came from, or convert it with `jaxquant convert`."
    )
  return interop.load_safetensors_params(path, layout or "flax"), str(path)


def _write_text_atomic(path: Path, text: str) -> None:
  io.atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _write_json(path: str, obj) -> None:
  """`obj` as indented JSON at `path` (folders made), written atomically."""
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  _write_text_atomic(Path(path), json.dumps(obj, indent=1))


def plan_table(
  plan: transforms.Plan,
  extra: dict[str, dict[str, str]] | None = None,
  title: str = "plan",
  only_quantized: bool = False,
) -> Table:
  """`plan` as a `rich` table; `extra` maps path -> {column: text} for added columns."""
  extra = extra or {}
  columns = list(dict.fromkeys(c for cols in extra.values() for c in cols))
  table = Table(title=title, show_lines=False)
  table.add_column("path", overflow="fold")
  fixed_columns: list[tuple[str, JustifyMethod]] = [
    ("shape", "left"),
    ("spec", "left"),
    ("bytes", "right"),
    ("quantized", "right"),
  ]
  for name, justify in fixed_columns:
    table.add_column(name, justify=justify, no_wrap=True)
  for c in columns:
    table.add_column(c, justify="right")
  for r in plan.quantized if only_quantized else plan.rows:
    spec = str(r.spec) if r.spec is not None else (r.note or "-")
    cells = [
      r.path,
      "×".join(map(str, r.shape)) or "()",
      spec,
      transforms.human_bytes(r.bytes_before),
      transforms.human_bytes(r.bytes_after),
    ]
    table.add_row(*cells, *[extra.get(r.path, {}).get(c, "") for c in columns])
  return table


def _plan_for(args) -> tuple[dict, transforms.Plan, Recipe]:
  recipe = load_recipe(args.recipe)  # a bad recipe fails before the model is read
  calibration = getattr(args, "calibration", None)
  if calibration:  # a missing or empty file fails before any work
    data.read_text(calibration, "--calibration")
  if recipe.needs_data and args.model != "minilm" and not is_llm(args.model):
    raise ValueError(
      f"recipe {recipe.name!r} runs {recipe.step_names}, which need calibration data: the "
      f"command line calibrates MiniLM (--model minilm) and LLMs ({LLM_HELP}); from Python, "
      "pass your model and batches to jaxquant.apply_recipe, or use an rtn/hqq recipe here."
    )
  params, described = load_model_params(args.model, args.layout)
  plan = transforms.plan(params, recipe.rules)
  plan.check()
  console.print(f"[bold]model[/] {described}\n[bold]recipe[/] {recipe.name}: {recipe.description}")
  return params, plan, recipe


def cmd_plan(args) -> int:
  recipe = load_recipe(args.recipe)
  if args.model != "minilm" and convert.streamable(recipe):  # shapes only: nothing is read
    _, plan = _lazy_plan(args, recipe)
  else:
    _, plan, _ = _plan_for(args)
  console.print(plan_table(plan, title="plan (dry run)", only_quantized=not args.all))
  console.print(plan.summary())
  return 0


def _apply(args, recipe: Recipe, params, plan: transforms.Plan):
  data_set = None
  if recipe.needs_data:
    if is_llm(args.model):
      cfg, _, tokenizer = language.load_source(**_llm_source(args.model))
      text = data.read_text(args.calibration, "--calibration") if args.calibration else None
      data_set = language.calibration_set(cfg, tokenizer, text)
    else:
      sentences = _read_lines(args.calibration, "--calibration") if args.calibration else None
      data_set = evaluate.minilm_calibration(sentences)
  return apply_recipe(recipe, params, data_set, plan=plan, progress=True)


def cmd_quantize(args) -> int:
  out = check_output(args.out, "dir", args.overwrite)
  recipe = load_recipe(args.recipe)
  if args.model != "minilm" and convert.streamable(recipe):
    return _quantize_streamed(args, out, recipe)
  params, plan, recipe = _plan_for(args)
  start = time.perf_counter()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # unused rules are shown in the summary
    result = _apply(args, recipe, params, plan)
  qparams, plan = result.qparams, result.plan
  elapsed = time.perf_counter() - start
  originals = dict(transforms.named_leaves(result.reference))
  quantized = {r.path for r in plan.quantized}
  errors = {
    path: quantization_error(originals[path], leaf)
    for path, leaf in transforms.named_leaves(qparams)
    if path in quantized
  }
  out.mkdir(parents=True, exist_ok=True)
  file = io.save(out / io.DEFAULT_FILENAME, qparams)
  return _report_quantized(args, out, recipe, result, plan, errors, file, elapsed)


def _lazy_source(model: str, layout: str | None) -> tuple[interop.LazyParams, str]:
  """``(params unread, description)`` of a ``--model`` that streams: an LLM (`is_llm`) or a
  plain ``.safetensors`` file (or folder of shards)."""
  if is_llm(model):
    source = _llm_source(model)
    if "hf" in source:
      cfg, lazy = convert.lazy_hf_params(source["hf"])
      where = source["hf"]
    else:
      where = source.get("gguf") or str(llama.smollm2_path())
      cfg, lazy = convert.lazy_gguf_params(where)
    return lazy, f"{where} ({cfg.layers} layers, dim {cfg.dim}; float32, read tensor by tensor)"
  path = Path(model)
  if not (path.is_file() or path.is_dir()):
    raise FileNotFoundError(
      f"--model {model!r} is not 'minilm', {LLM_HELP}, or an existing .safetensors file."
    )
  for file in interop.safetensors_files(path):
    if (io.read_header(file).get("__metadata__") or {}).get(io.FORMAT_NAME) is not None:
      raise UsageError(
        f"--model {model}: already a jaxquant checkpoint (quantized leaves); quantize the float "
        "model it came from, or convert it with `jaxquant convert`."
      )
  return interop.lazy_safetensors_params(path, layout or "flax"), f"{path} (read tensor by tensor)"


def stream_error(w: np.ndarray, q) -> dict[str, float]:
  """`quantization_error` of `w` and its QArray `q` in one fused pass (float32 sums), so no
  full-size float copy is made."""
  signal, noise = (float(v) for v in _squared_sums(jnp.asarray(w), q))
  rel = math.sqrt(noise / signal) if signal > 0 else 0.0
  snr = 10 * math.log10(signal / noise) if noise > 0 else math.inf
  return {"rel_error": rel, "snr_db": snr}


@jax.jit
def _squared_sums(w: jax.Array, q) -> tuple[jax.Array, jax.Array]:
  """``(Σ w², Σ (w − ŵ)²)`` in float32."""
  x = w.astype(jnp.float32)
  e = x - q.dequantize(jnp.float32)
  return jnp.sum(x * x), jnp.sum(e * e)


def _lazy_plan(args, recipe: Recipe) -> tuple[interop.LazyParams, transforms.Plan]:
  """The unread ``--model`` and the recipe's checked plan of its shapes (nothing is read)."""
  lazy, described = _lazy_source(args.model, args.layout)
  plan = transforms.plan(lazy.shapes, recipe.rules)
  plan.check()
  console.print(f"[bold]model[/] {described}\n[bold]recipe[/] {recipe.name}: {recipe.description}")
  return lazy, plan


def _quantize_streamed(args, out: Path, recipe: Recipe) -> int:
  """`jaxquant quantize` with a data-free recipe: the source is read, quantized and written
  one tensor at a time (`jaxquant.io.quantize_streamed`), so memory holds one tensor."""
  if args.calibration:  # a missing or empty file fails before any work, as for other recipes
    data.read_text(args.calibration, "--calibration")
  lazy, plan = _lazy_plan(args, recipe)
  errors: dict[str, dict[str, float]] = {}

  def on_leaf(path: str, w: np.ndarray, q) -> None:
    if not isinstance(q, np.ndarray):
      errors[path] = stream_error(w, q)

  start = time.perf_counter()
  out.mkdir(parents=True, exist_ok=True)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # unused rules are shown in the summary
    file, plan = io.quantize_streamed(
      out / io.DEFAULT_FILENAME,
      lazy.shapes,
      lazy.read,
      plan,
      quantizer=convert.recipe_quantizer(recipe),
      on_leaf=on_leaf,
      progress=True,
    )
  elapsed = time.perf_counter() - start
  return _report_quantized(args, out, recipe, None, plan, errors, file, elapsed)


def _report_quantized(
  args, out: Path, recipe: Recipe, result, plan, errors: dict, file: Path, elapsed: float
) -> int:
  """Prints the per-tensor errors and sizes of a written checkpoint; writes ``report.json``
  and ``recipe.yaml`` beside it. `result` is `apply_recipe`'s (None: a streamed run)."""
  extra = {
    p: {"rel err": f"{e['rel_error']:.3%}", "SNR dB": f"{e['snr_db']:.1f}"}
    for p, e in errors.items()
  }
  console.print(
    plan_table(plan, extra, title=f"{recipe.name}: per-tensor error", only_quantized=not args.all)
  )
  file_bytes = file.stat().st_size
  matched_before = sum(r.bytes_before for r in plan.quantized)
  matched_after = sum(r.bytes_after for r in plan.quantized)
  kept = plan.bytes_after - matched_after
  worst = max(errors.values(), key=lambda e: e["rel_error"], default=None)
  console.print(plan.summary())
  if worst is not None:
    console.print(
      f"worst relative error {worst['rel_error']:.3%}; lowest SNR "
      f"{min(e['snr_db'] for e in errors.values()):.1f} dB; quantized in {elapsed:.1f} s"
    )
  if matched_before:
    console.print(
      f"file {file} : {file_bytes / 2**20:.2f} MiB; quantized tensors on disk "
      f"{(file_bytes - kept) / matched_before:.1%} of their float32 bytes (header included)"
    )
  report = {
    "model": args.model,
    "recipe": recipe.name,
    "rules": [r.to_dict() for r in plan.rules],
    "file": str(file),
    "file_bytes": file_bytes,
    "seconds": elapsed,
    "errors": errors,
    "plan": plan.to_dict(),
    "steps": [{n: o} for n, o in recipe.steps],
    "info": _report_info(result.info) if result is not None else {},
  }
  _write_text_atomic(out / "report.json", json.dumps(report, indent=1, default=_json_safe))
  if result is not None:
    recipe = resolved_recipe(recipe, result)
  _write_text_atomic(out / "recipe.yaml", recipe.to_yaml())  # reproduces this checkpoint
  console.print(f"recipe {out / 'recipe.yaml'} : {recipe.description or recipe.name}")
  return 0


def _report_info(info: dict) -> dict:
  """Per-step notes for report.json, without the bulky per-layer error tables."""
  return {
    step: {k: v for k, v in notes.items() if k != "errors"} if isinstance(notes, dict) else notes
    for step, notes in info.items()
  }


def _json_safe(x):
  if isinstance(x, float) and math.isinf(x):
    return "inf"
  return str(x)


def _read_lines(path: str, what: str = "--sentences") -> list[str]:
  sentences = [s for s in data.read_sentences(path, what) if s.strip()]
  if not sentences:
    raise ValueError(f"{what} {path} has no non-empty lines.")
  return sentences


def _checked_report(checkpoint: str, model: str, expected: Callable[[], checks.Shapes]) -> dict:
  """The report of a `jaxquant quantize` folder whose parameters fit `model`, whose shapes
  ``expected()`` gives (else UsageError)."""
  report = checks.read_report(checkpoint)
  checks.check_checkpoint(checkpoint, model, expected(), report)
  return report


def _encoder(args, report: dict | None):
  if report is not None:
    rules = tuple(Rule(**r) for r in report["rules"])
    recipe = Recipe(report["recipe"], rules, f"checkpoint {args.checkpoint}")
    return evaluate.minilm_encoder(recipe, qparams=io.load(args.checkpoint))
  return evaluate.minilm_encoder(args.recipe)


def _require_minilm(model: str) -> None:
  if model != "minilm":
    raise ValueError(
      f"--model {model!r}: embed and eval run the MiniLM encoder; use --model minilm."
    )


def cmd_embed(args) -> int:
  check_output(args.out, "file", args.overwrite)
  _require_minilm(args.model)
  sentences = _read_lines(args.sentences)
  report = None
  if args.checkpoint:
    report = _checked_report(args.checkpoint, args.model, checks.minilm_shapes)
  else:
    load_recipe(args.recipe)  # a bad recipe fails before the model is read
  encoder = _encoder(args, report)
  emb = encoder.encode(sentences)

  def write(tmp: str) -> None:
    with open(tmp, "wb") as f:  # a file object: np.save would add ".npy" to a name
      np.save(f, emb)

  out = io.atomic_write(args.out, write)
  console.print(
    f"{len(sentences)} embeddings [{emb.shape[0]}, {emb.shape[1]}] -> {out} ({encoder.name})"
  )
  return 0


LLM_RECIPES = "fp32,w8,w8a8,w4g64-asym,w4g64-gptq"
MINILM_RECIPES = "fp32,bf16,w8,w8a8,w8a8-static,w4g128,w4g128-asym,nf4"


def _recipe_names(text: str) -> list[str]:
  names = [r.strip() for r in text.split(",") if r.strip()]
  for name in names:  # fail on a bad name before any work
    load_recipe(name)
  if not names:
    raise ValueError("--recipes is empty.")
  return names


def _at_least(args, **minimums: int) -> None:
  """UsageError naming the first option (``max_windows`` is ``--max-windows``) below its
  minimum; options left unset (None) pass."""
  for name, low in minimums.items():
    value = getattr(args, name)
    if value is not None and value < low:
      option = ("-" if len(name) == 1 else "--") + name.replace("_", "-")
      raise UsageError(f"{option} must be at least {low}, got {value}.")


def cmd_eval(args) -> int:
  if args.json:
    check_output(args.json, "file", args.overwrite, "--json")
  _at_least(args, n=1, window=2, max_windows=1)
  if is_llm(args.model):
    return _eval_llm(args)
  if args.text or args.calibration:
    raise ValueError("--text and --calibration are for LLMs; MiniLM reads --sentences.")
  _require_minilm(args.model)
  names = [r.strip() for r in (args.recipes or MINILM_RECIPES).split(",") if r.strip()]
  for name in names:  # fail on a bad name before any work
    load_recipe(name)
  sentences = _read_lines(args.sentences) if args.sentences else data.evaluation_sentences(args.n)
  reference = evaluate.minilm_encoder("fp32")
  ref_emb, _ = evaluate.timed_encode(reference, sentences)
  rows: list[dict[str, Any]] = []
  for name in names:
    encoder = evaluate.minilm_encoder(name)
    emb, seconds = evaluate.timed_encode(encoder, sentences)
    rows.append(
      {
        "recipe": name,
        **evaluate.fidelity(ref_emb, emb),
        "weight_bytes": encoder.weight_bytes,
        "encoder_kernel_bytes": encoder.linear_bytes,
        "seconds": seconds,
      }
    )
    console.print(f"{name}: mean cosine {rows[-1]['mean_cosine']:.5f}", highlight=False)
  table = Table(title=f"all-MiniLM-L6-v2 on {len(sentences)} held-out sentences vs float32")
  for col in (
    "recipe",
    "mean cos",
    "min cos",
    "top-5 agree",
    "weights MiB",
    "kernels MiB",
    "embed s",
  ):
    table.add_column(col, justify="left" if col == "recipe" else "right", no_wrap=True)
  for r in rows:
    table.add_row(
      r["recipe"],
      f"{r['mean_cosine']:.5f}",
      f"{r['min_cosine']:.5f}",
      f"{r['top5_agreement']:.3f}",
      f"{r['weight_bytes'] / 2**20:.1f}",
      f"{r['encoder_kernel_bytes'] / 2**20:.2f}",
      f"{r['seconds']:.2f}",
    )
  console.print(table)
  if args.json:
    _write_json(args.json, {"sentences": len(sentences), "rows": rows})
  return 0


def _kv_kinds(text: str) -> list[CacheKind | None]:
  kinds: dict[str, list[CacheKind | None]] = {
    "float32": [None],
    "int8": ["int8"],
    "both": [None, "int8"],
  }
  if text not in kinds:
    raise ValueError(f"--kv must be float32, int8 or both, got {text!r}.")
  return kinds[text]


def _eval_llm(args) -> int:
  """Perplexity of each recipe on held-out text (the GPTQ paper's protocol)."""
  names = _recipe_names(args.recipes or LLM_RECIPES)
  kinds = _kv_kinds(args.kv)
  text = data.read_text(args.text, "--text") if args.text else data.evaluation_text()
  calibration = data.read_text(args.calibration, "--calibration") if args.calibration else None
  source = _llm_source(args.model)
  rows: list[dict] = []
  windows = None
  for name in names:
    lm = language.language_model(name, **source, calibration_text=calibration, progress=True)
    if windows is None:
      windows = language.token_windows(lm.encode(text), args.window, args.max_windows)
      console.print(
        f"{args.model}: {windows.shape[0]} windows of {args.window} tokens "
        f"({windows.shape[0] * (args.window - 1)} scored)",
        highlight=False,
      )
    for kv in kinds:
      got = language.perplexity(lm, windows, cache=kv, progress=True)
      rows.append(
        {
          "recipe": name,
          "kv_cache": kv or "float32",
          **got,
          "weight_bytes": lm.weight_bytes,
          "linear_bytes": lm.linear_bytes,
          "quantize_seconds": lm.quantize_seconds,
        }
      )
      console.print(f"{name} (KV {kv or 'float32'}): perplexity {got['ppl']:.3f}", highlight=False)
  ref = next((r for r in rows if r["recipe"] == "fp32" and r["kv_cache"] == "float32"), None)
  for r in rows:
    r["delta_vs_fp32"] = None if ref is None else r["ppl"] / ref["ppl"] - 1.0
  table = Table(title=f"{args.model}: perplexity, windows of {args.window} tokens")
  for col in ("recipe", "KV", "ppl", "Δ vs fp32", "weights MiB", "linear MiB", "quantize s"):
    table.add_column(col, justify="left" if col in ("recipe", "KV") else "right", no_wrap=True)
  for r in rows:
    delta = "" if r["delta_vs_fp32"] is None else f"{r['delta_vs_fp32']:+.2%}"
    table.add_row(
      r["recipe"],
      r["kv_cache"],
      f"{r['ppl']:.3f}",
      delta,
      f"{r['weight_bytes'] / 2**20:.1f}",
      f"{r['linear_bytes'] / 2**20:.1f}",
      f"{r['quantize_seconds']:.0f}",
    )
  console.print(table)
  if args.json:
    _write_json(args.json, {"model": args.model, "window": args.window, "rows": rows})
  return 0


def cmd_generate(args) -> int:
  if not is_llm(args.model):
    raise ValueError(f"--model {args.model!r}: generate runs an LLM ({LLM_HELP}).")
  _at_least(args, steps=1, repeats=1)
  if args.temperature < 0 or not math.isfinite(args.temperature):
    raise UsageError(f"--temperature must be 0 (greedy) or more, got {args.temperature}.")
  if not args.prompt.strip():
    raise UsageError("--prompt is empty; give the text to continue.")
  source = _llm_source(args.model)
  if args.checkpoint:
    if source.get("hf"):
      raise ValueError("--checkpoint with a Hugging Face --model is not supported; use --recipe.")
    _checked_report(args.checkpoint, args.model, lambda: checks.llm_shapes(source.get("gguf")))
    lm = language.load_checkpoint(args.checkpoint, source.get("gguf"))
  else:
    load_recipe(args.recipe)  # a bad name fails before the model is read
    calibration = data.read_text(args.calibration, "--calibration") if args.calibration else None
    lm = language.language_model(args.recipe, **source, calibration_text=calibration)
  got = language.generate_text(
    lm,
    args.prompt,
    args.steps,
    cache=args.cache,
    temperature=args.temperature,
    seed=args.seed,
    repeats=args.repeats,
  )
  console.print(f"[bold]{got['prompt']}[/]{got['text']}", highlight=False)
  console.print(
    f"{lm.name}, KV cache {args.cache}: prefill {got['prompt_tokens']} tokens at "
    f"{got['prefill_tps']:.1f} tokens/s, decode {args.steps} tokens at "
    f"{got['decode_tps']:.1f} tokens/s (batch 1, median of {args.repeats} after compiling)",
    highlight=False,
  )
  return 0


BENCH_FILES = ("bench_ops.md", "bench_ops.json", "bench_ops.png")


def cmd_bench(args) -> int:
  _at_least(args, repeats=1)
  for name in BENCH_FILES:
    check_output(Path(args.out) / name, "file", args.overwrite)
  rows = bench.run(
    args.quick,
    args.repeats,
    args.out,
    qwix=not args.no_qwix,
    progress=lambda line: console.print(line, highlight=False),
  )
  console.print(bench.markdown(rows), highlight=False)
  console.print(f"wrote {args.out}/bench_ops.md, .json, .png")
  return 0


def cmd_recipes(args) -> int:
  for name in recipe_names():
    recipe = load_recipe(name)
    console.print(f"[bold]{name}[/]: {recipe.description}")
  return 0


def _check_export_inputs(args) -> None:
  """Everything `export` reads, checked before the model is built."""
  load_recipe(args.recipe)
  if args.model == "minilm":
    if args.checkpoint or args.config:
      raise UsageError("--checkpoint and --config apply to --model decoder.")
    return
  cfg = serving.parse_decoder_config(args.config)
  if args.checkpoint:
    expected = checks.model_shapes(Decoder(cfg), jnp.zeros((1, 8), jnp.int32))
    model = f"decoder ({args.config or 'default config'})"
    remedy = "Give --config the sizes it was made with, or save this decoder's params."
    checks.check_checkpoint(args.checkpoint, model, expected, remedy=remedy)


def _platform_here() -> str:
  """This machine's platform as `jax.export` names it (``cpu``, ``cuda``, ``tpu``)."""
  backend = jax.default_backend()
  return "cuda" if backend == "gpu" else backend


def _reload_check(target: serving.ServeFunction, folder: Path) -> str:
  """Loads the artifact in `folder` and runs it here on the example against `target.fn`:
  how it went, in words (raises if the artifact does not load or does not run)."""
  served = export.load_exported(folder)
  here = _platform_here()
  if here not in served.platforms:
    return f"reloaded; not run here ({here} is not among its platforms)"
  got = np.asarray(served(*target.example))
  want = np.asarray(target.fn(target.variables, *target.example))
  return f"reloaded on {here}, max |diff| {float(np.max(np.abs(got - want))):.3g}"


def cmd_convert(args) -> int:
  kind = convert.destination_kind(args.dst)
  as_file = kind == "gguf" or args.dst.endswith(".safetensors")
  out = check_output(args.dst, "file" if as_file else "dir", args.overwrite, "DST")
  if args.dst.endswith(".safetensors"):  # its report.json goes beside it
    check_output(Path(args.dst).parent / "report.json", "file", args.overwrite, "DST's report")
  if kind != "gguf" and (args.requantize or args.metadata_from):
    raise UsageError("--requantize and --metadata-from apply to a .gguf destination.")
  if args.metadata_from and not Path(args.metadata_from).is_file():
    raise UsageError(f"--metadata-from {args.metadata_from}: no such GGUF file.")
  start = time.perf_counter()
  source = convert.read_source(args.src)
  file, added = convert.convert(
    source,
    out,
    metadata_from=args.metadata_from,
    requantize=args.requantize,
    float_type=args.float_type,
    table_type=args.table_type,
  )
  for path, err in sorted(added.items()):
    console.print(f"requantized {path}: relative error {err:.3%} added", highlight=False)
  console.print(
    f"{args.src} ({source.cfg.layers} layers, dim {source.cfg.dim}) -> {file}: "
    f"{file.stat().st_size / 2**20:.1f} MiB in {time.perf_counter() - start:.1f} s",
    highlight=False,
  )
  return 0


def cmd_export(args) -> int:
  if args.format == "gguf":
    if not args.checkpoint:
      raise UsageError("export --format gguf needs --checkpoint (a `jaxquant quantize` folder).")
    if not args.out.lower().endswith(".gguf"):
      raise UsageError(f"--out {args.out}: export --format gguf writes one file; name it *.gguf.")
    return cmd_convert(
      argparse.Namespace(
        src=args.checkpoint,
        dst=args.out,
        overwrite=args.overwrite,
        requantize=args.requantize,
        metadata_from=None,
        float_type="F32",
        table_type=args.table_type,
      )
    )
  names = [p.strip() for p in args.platforms.split(",") if p.strip()]
  platforms = export.check_platforms(names, "--platforms")
  out = check_output(args.out, "dir", args.overwrite)
  _check_export_inputs(args)
  if args.model == "minilm":
    target = serving.minilm_serve(args.recipe)
  else:
    target = serving.decoder_serve(args.recipe, args.config, args.checkpoint, args.seed)
  start = time.perf_counter()
  exported = export.lower(target.fn, target.variables, target.inputs, platforms)
  checked: list[str] = []  # the artifact is checked in its temporary folder, before it moves in
  out = export.save_exported(
    out,
    exported,
    target.variables,
    target.metadata,
    lambda f: checked.append(_reload_check(target, f)),
  )
  elapsed = time.perf_counter() - start
  sizes = ", ".join(
    f"{n} {(out / n).stat().st_size / 2**20:.2f} MiB" for n in (export.PROGRAM, export.PARAMS)
  )
  console.print(
    f"{args.model} ({target.metadata['recipe']}) exported for "
    f"{', '.join(exported.platforms)} in {elapsed:.1f} s -> {out}: {sizes}; params "
    f"passed as an argument; {checked[0]}",
    highlight=False,
  )
  return 0


class _Parser(argparse.ArgumentParser):
  """argparse that tells a bad command line in one line, like every other user error."""

  def error(self, message: str) -> NoReturn:
    self.exit(2, f"error: {self.prog}: {message} (see `{self.prog} --help`)\n")


def _common() -> _Parser:
  """``--debug``, accepted before or after the subcommand."""
  common = _Parser(add_help=False)
  common.add_argument(
    "--debug",
    action="store_true",
    default=argparse.SUPPRESS,
    help="show the traceback of an error too",
  )
  return common


def _overwrite_arg(p: argparse.ArgumentParser) -> None:
  p.add_argument(
    "--overwrite",
    action="store_true",
    help="replace an existing output (the files this command writes; others are kept)",
  )


def build_parser() -> argparse.ArgumentParser:
  common = _common()
  parser = _Parser(prog="jaxquant", description=__doc__.split("\n")[0], parents=[common])
  sub = parser.add_subparsers(dest="command", required=True)

  def add(name: str, **kwargs) -> argparse.ArgumentParser:
    return sub.add_parser(name, parents=[common], **kwargs)

  def model_args(p):
    p.add_argument(
      "--model",
      default="minilm",
      help="'minilm' (the packaged all-MiniLM-L6-v2) or a .safetensors path",
    )
    p.add_argument(
      "--layout",
      choices=("flax", "torch"),
      default=None,
      help="weight layout of a .safetensors file (torch: [out, in] weights)",
    )
    p.add_argument(
      "--recipe",
      default="int8",
      help="shipped recipe name, a recipe .yaml, or a spec string like int4:g128",
    )
    p.add_argument("--all", action="store_true", help="list kept tensors in the table too")

  q = add("quantize", help="quantize a checkpoint and report per-tensor error")
  model_args(q)
  q.add_argument("--out", required=True, help="output folder (model.safetensors, report.json)")
  _overwrite_arg(q)
  q.add_argument(
    "--calibration",
    help="your calibration text: an LLM reads it as running text, MiniLM one sentence a line "
    "(default: standard-library docstrings, disjoint from the evaluation text)",
  )
  q.set_defaults(func=cmd_quantize)
  p = add("plan", help="dry run: what a recipe would quantize, bytes before/after")
  model_args(p)
  p.set_defaults(func=cmd_plan)
  e = add("embed", help="sentence embeddings with a quantized MiniLM")
  e.add_argument("--model", default="minilm")
  group = e.add_mutually_exclusive_group()
  group.add_argument("--recipe", default="fp32", help="recipe to quantize with (default fp32)")
  group.add_argument("--checkpoint", help="folder written by `jaxquant quantize`")
  e.add_argument("--sentences", required=True, help="text file, one sentence per line")
  e.add_argument("--out", required=True, help=".npy file for the [N, 384] embeddings")
  _overwrite_arg(e)
  e.set_defaults(func=cmd_embed)
  v = add("eval", help="MiniLM: embedding fidelity vs float32; LLMs: perplexity on held-out text")
  v.add_argument("--model", default="minilm", help=f"'minilm' or {LLM_HELP}")
  v.add_argument(
    "--recipes", help=f"comma-separated (default minilm: {MINILM_RECIPES}; LLM: {LLM_RECIPES})"
  )
  v.add_argument("--sentences", help="text file (default: held-out standard-library docstrings)")
  v.add_argument("-n", type=int, default=512, help="number of default held-out sentences")
  v.add_argument("--text", help="LLM: held-out text file, one stream (default: stdlib prose)")
  v.add_argument("--calibration", help="LLM: calibration text file for data-driven recipes")
  v.add_argument("--window", type=int, default=language.DEFAULT_WINDOW, help="LLM: tokens a window")
  v.add_argument("--max-windows", type=int, default=None, help="LLM: score at most this many")
  v.add_argument("--kv", default="float32", help="LLM KV cache: float32, int8 or both")
  v.add_argument("--json", help="also write the results here")
  _overwrite_arg(v)
  v.set_defaults(func=cmd_eval)
  g = add("generate", help="LLM text generation, prefill and decode tokens/s")
  g.add_argument("--model", default="smollm2", help=LLM_HELP)
  group = g.add_mutually_exclusive_group()
  group.add_argument("--recipe", default="fp32", help="recipe to quantize with (default fp32)")
  group.add_argument("--checkpoint", help="folder written by `jaxquant quantize`")
  g.add_argument("--prompt", required=True)
  g.add_argument("--steps", type=int, default=32, help="new tokens")
  g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
  g.add_argument("--seed", type=int, default=0)
  g.add_argument("--cache", choices=("float32", "bfloat16", "int8"), default="int8")
  g.add_argument("--repeats", type=int, default=1, help="timed runs after the compiling one")
  g.add_argument("--calibration", help="calibration text for data-driven recipes")
  g.set_defaults(func=cmd_generate)
  r = add("recipes", help="list the shipped recipes")
  r.set_defaults(func=cmd_recipes)
  b = add("bench", help="speed of one layer per format and lowering (vs f32, Qwix)")
  b.add_argument("--quick", action="store_true", help="4096x4096 at M=1,16, 5 rounds")
  b.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 15)")
  b.add_argument("--no-qwix", action="store_true", help="skip Qwix even when installed")
  b.add_argument("--out", default="experiments/results", help="folder for bench_ops.{md,json,png}")
  _overwrite_arg(b)
  b.set_defaults(func=cmd_bench)
  x = add("export", help="jax.export a quantized serve function for cpu/cuda/tpu")
  x.add_argument(
    "--model",
    choices=("minilm", "decoder"),
    default="minilm",
    help="minilm: sentence embeddings; decoder: the byte-level LM's logits",
  )
  x.add_argument("--recipe", default="w8a8", help="recipe name, .yaml path or spec string")
  x.add_argument(
    "--checkpoint",
    help="decoder: float params saved with jaxquant.save (default: random init from --seed)",
  )
  x.add_argument(
    "--config",
    default="",
    help="decoder: DecoderConfig fields, e.g. dim=512,layers=4,heads=8,mlp=2048",
  )
  x.add_argument("--seed", type=int, default=0)
  x.add_argument(
    "--platforms",
    default="cpu,cuda,tpu",
    help=f"comma-separated: {', '.join(export.KNOWN_PLATFORMS)}",
  )
  x.add_argument(
    "--out", required=True, help="output folder: serve.jaxexport, model.safetensors, export.json"
  )
  x.add_argument(
    "--format",
    choices=("jax", "gguf"),
    default="jax",
    help="jax: a jax.export artifact; gguf: --checkpoint of an LLM as a llama.cpp file (--out)",
  )
  x.add_argument("--requantize", action="store_true", help="gguf: requantize inexact leaves")
  x.add_argument("--table-type", default="F32", help="gguf: token table type (F32, F16, Q8_0)")
  _overwrite_arg(x)
  x.set_defaults(func=cmd_export)
  c = add(
    "convert",
    help="convert an LLM between GGUF, Hugging Face and jaxquant checkpoints",
    description=convert.__doc__,
  )
  c.add_argument("src", help="smollm2, a .gguf file, a Hugging Face folder or a checkpoint folder")
  c.add_argument("dst", help="a .gguf file, or a jaxquant checkpoint (folder or .safetensors)")
  c.add_argument(
    "--requantize",
    action="store_true",
    help="gguf: quantize leaves no GGUF type holds to the nearest one (reports the added error)",
  )
  c.add_argument("--metadata-from", help="gguf: the GGUF file whose tokenizer/metadata to carry")
  c.add_argument("--float-type", choices=("F32", "F16"), default="F32", help="gguf: float matrices")
  c.add_argument(
    "--table-type",
    choices=("F32", "F16", "Q8_0", "Q4_0", "Q4_1"),
    default="F32",
    help="gguf: the token table (llama.cpp's own files use Q8_0)",
  )
  _overwrite_arg(c)
  c.set_defaults(func=cmd_convert)
  return parser


def main(argv: list[str] | None = None) -> int:
  """Runs the command line: 0 done, 2 a user error (one line on stderr), 1 an internal error
  (its traceback), 130 interrupted."""
  args = build_parser().parse_args(argv)
  debug = getattr(args, "debug", False)
  try:
    return args.func(args)
  except KeyboardInterrupt:
    print("error: interrupted", file=sys.stderr)
    return 130
  except Exception as e:
    message = checks.user_message(e)
    if message is None or debug:
      traceback.print_exc()
    if message is None:
      print(
        "error: internal error in jaxquant (traceback above); please report it.", file=sys.stderr
      )
      return 1
    print(f"error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
