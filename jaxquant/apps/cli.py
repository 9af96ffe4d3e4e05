"""The ``jaxquant`` command line.

jaxquant quantize --model minilm --recipe int8 --out out/minilm-int8
jaxquant quantize --model weights.safetensors --layout torch --recipe int4:g128 --out q/
jaxquant plan --model minilm --recipe w4g128
jaxquant embed --model minilm --recipe w8a8 --sentences s.txt --out emb.npy
jaxquant eval --model minilm --recipes fp32,w8,w8a8,w4g128 --json results.json
jaxquant recipes
jaxquant export --model minilm --recipe w8a8 --out out/minilm-w8a8-export
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from rich.console import Console, JustifyMethod
from rich.table import Table

from jaxquant import export, interop, io, transforms
from jaxquant.apps import bench, data, evaluate, serving
from jaxquant.apps.models import minilm
from jaxquant.numerics import quantization_error
from jaxquant.recipes import Recipe, apply_recipe, load_recipe, recipe_names, resolved_recipe
from jaxquant.rules import Rule

# Wide enough for full parameter paths when the output goes to a file or pipe.
console = Console() if sys.stdout.isatty() else Console(width=150)


def load_model_params(model: str, layout: str | None) -> tuple[dict, str]:
  """``(params, description)`` for ``minilm`` or a path to a ``.safetensors`` file."""
  if model == "minilm":
    return minilm.load_params(), f"all-MiniLM-L6-v2 ({minilm.checkpoint_path()})"
  path = Path(model)
  if not path.is_file():
    raise FileNotFoundError(
      f"--model {model!r} is neither 'minilm' nor an existing .safetensors file."
    )
  return interop.load_safetensors_params(path, layout or "flax"), str(path)


def _write_text_atomic(path: Path, text: str) -> None:
  io.atomic_write(path, lambda tmp: Path(tmp).write_text(text))


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
  params, described = load_model_params(args.model, args.layout)
  if recipe.needs_data and args.model != "minilm":
    raise ValueError(
      f"recipe {recipe.name!r} runs {recipe.step_names}, which need calibration data: the "
      "command line calibrates the packaged MiniLM only (--model minilm); from Python, pass "
      "your model and batches to jaxquant.apply_recipe, or use an rtn/hqq recipe here."
    )
  plan = transforms.plan(params, recipe.rules)
  plan.check()
  console.print(f"[bold]model[/] {described}\n[bold]recipe[/] {recipe.name}: {recipe.description}")
  return params, plan, recipe


def cmd_plan(args) -> int:
  _, plan, _ = _plan_for(args)
  console.print(plan_table(plan, title="plan (dry run)", only_quantized=not args.all))
  console.print(plan.summary())
  return 0


def _apply(recipe: Recipe, params, plan: transforms.Plan):
  data_set = evaluate.minilm_calibration() if recipe.needs_data else None
  return apply_recipe(recipe, params, data_set, plan=plan, progress=True)


def cmd_quantize(args) -> int:
  out = Path(args.out)
  if out.exists() and not out.is_dir():
    raise ValueError(f"--out {out} is a file; give a folder (it will hold model.safetensors).")
  params, plan, recipe = _plan_for(args)
  recipe_name = recipe.name
  start = time.perf_counter()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # unused rules are shown in the summary
    result = _apply(recipe, params, plan)
  qparams, rules, plan = result.qparams, list(result.rules), result.plan
  elapsed = time.perf_counter() - start
  originals = dict(transforms.named_leaves(result.reference))
  errors = {}
  for path, leaf in transforms.named_leaves(qparams):
    if path in {r.path for r in plan.quantized}:
      errors[path] = quantization_error(originals[path], leaf)
  extra = {
    p: {"rel err": f"{e['rel_error']:.3%}", "SNR dB": f"{e['snr_db']:.1f}"}
    for p, e in errors.items()
  }
  console.print(
    plan_table(plan, extra, title=f"{recipe_name}: per-tensor error", only_quantized=not args.all)
  )
  out.mkdir(parents=True, exist_ok=True)
  file = io.save(out / io.DEFAULT_FILENAME, qparams)
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
    "recipe": recipe_name,
    "rules": [r.to_dict() for r in rules],
    "file": str(file),
    "file_bytes": file_bytes,
    "seconds": elapsed,
    "errors": errors,
    "plan": plan.to_dict(),
    "steps": [{n: o} for n, o in recipe.steps],
    "info": _report_info(result.info),
  }
  _write_text_atomic(out / "report.json", json.dumps(report, indent=1, default=_json_safe))
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


def _read_lines(path: str) -> list[str]:
  if not Path(path).is_file():
    raise FileNotFoundError(f"--sentences {path}: no such file (one sentence per line).")
  sentences = [s for s in data.read_sentences(path) if s.strip()]
  if not sentences:
    raise ValueError(f"--sentences {path} has no non-empty lines.")
  return sentences


def _encoder(args):
  _require_minilm(args.model)
  if args.checkpoint:
    folder = Path(args.checkpoint)
    report = (
      json.loads((folder / "report.json").read_text())
      if (folder / "report.json").is_file()
      else None
    )
    if report is None:
      raise FileNotFoundError(f"{folder} has no report.json; make it with `jaxquant quantize`.")
    rules = tuple(Rule(**r) for r in report["rules"])
    recipe = Recipe(report["recipe"], rules, f"checkpoint {folder}")
    return evaluate.minilm_encoder(recipe, qparams=io.load(folder))
  return evaluate.minilm_encoder(args.recipe)


def _require_minilm(model: str) -> None:
  if model != "minilm":
    raise ValueError(
      f"--model {model!r}: embed and eval run the MiniLM encoder; use --model minilm."
    )


def cmd_embed(args) -> int:
  sentences = _read_lines(args.sentences)
  encoder = _encoder(args)
  emb = encoder.encode(sentences)

  def write(tmp: str) -> None:
    with open(tmp, "wb") as f:  # a file object: np.save would add ".npy" to a name
      np.save(f, emb)

  out = io.atomic_write(args.out, write)
  console.print(
    f"{len(sentences)} embeddings [{emb.shape[0]}, {emb.shape[1]}] -> {out} ({encoder.name})"
  )
  return 0


def cmd_eval(args) -> int:
  _require_minilm(args.model)
  names = [r.strip() for r in args.recipes.split(",") if r.strip()]
  for name in names:  # fail on a bad name before any work
    load_recipe(name)
  sentences = _read_lines(args.sentences) if args.sentences else data.evaluation_sentences(args.n)
  reference = evaluate.minilm_encoder("fp32")
  ref_emb, _ = evaluate.timed_encode(reference, sentences)
  rows = []
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
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_text_atomic(path, json.dumps({"sentences": len(sentences), "rows": rows}, indent=1))
  return 0


def cmd_bench(args) -> int:
  rows = bench.run(
    args.quick,
    args.repeats,
    args.out,
    qwix=not args.no_qwix,
    progress=lambda line: console.print(line, highlight=False),
  )
  console.print(bench.markdown(rows), highlight=False)
  if args.out:
    console.print(f"wrote {args.out}/bench_ops.md, .json, .png")
  return 0


def cmd_recipes(args) -> int:
  for name in recipe_names():
    recipe = load_recipe(name)
    console.print(f"[bold]{name}[/]: {recipe.description}")
  return 0


def cmd_export(args) -> int:
  if args.model == "minilm":
    if args.checkpoint or args.config:
      raise ValueError("--checkpoint and --config apply to --model decoder.")
    target = serving.minilm_serve(args.recipe)
  else:
    target = serving.decoder_serve(args.recipe, args.config, args.checkpoint, args.seed)
  platforms = [p.strip() for p in args.platforms.split(",") if p.strip()]
  start = time.perf_counter()
  out = export.export_serve(
    args.out, target.fn, target.variables, target.inputs, platforms, target.metadata
  )
  elapsed = time.perf_counter() - start
  served = export.load_exported(out)  # check the artifact before reporting success
  diff = float(
    np.max(
      np.abs(
        np.asarray(served(*target.example))
        - np.asarray(target.fn(target.variables, *target.example))
      )
    )
  )
  sizes = ", ".join(
    f"{n} {(out / n).stat().st_size / 2**20:.2f} MiB" for n in (export.PROGRAM, export.PARAMS)
  )
  console.print(
    f"{args.model} ({target.metadata['recipe']}) exported for "
    f"{', '.join(served.platforms)} in {elapsed:.1f} s -> {out}: {sizes}; params "
    f"passed as an argument; reloaded on CPU, max |diff| {diff:.3g}",
    highlight=False,
  )
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="jaxquant", description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)

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

  q = sub.add_parser("quantize", help="quantize a checkpoint and report per-tensor error")
  model_args(q)
  q.add_argument("--out", required=True, help="output folder (model.safetensors, report.json)")
  q.set_defaults(func=cmd_quantize)
  p = sub.add_parser("plan", help="dry run: what a recipe would quantize, bytes before/after")
  model_args(p)
  p.set_defaults(func=cmd_plan)
  e = sub.add_parser("embed", help="sentence embeddings with a quantized MiniLM")
  e.add_argument("--model", default="minilm")
  group = e.add_mutually_exclusive_group()
  group.add_argument("--recipe", default="fp32", help="recipe to quantize with (default fp32)")
  group.add_argument("--checkpoint", help="folder written by `jaxquant quantize`")
  e.add_argument("--sentences", required=True, help="text file, one sentence per line")
  e.add_argument("--out", required=True, help=".npy file for the [N, 384] embeddings")
  e.set_defaults(func=cmd_embed)
  v = sub.add_parser("eval", help="embedding fidelity of recipes against float32")
  v.add_argument("--model", default="minilm")
  v.add_argument("--recipes", default="fp32,bf16,w8,w8a8,w8a8-static,w4g128,w4g128-asym,nf4")
  v.add_argument("--sentences", help="text file (default: held-out standard-library docstrings)")
  v.add_argument("-n", type=int, default=512, help="number of default held-out sentences")
  v.add_argument("--json", help="also write the results here")
  v.set_defaults(func=cmd_eval)
  r = sub.add_parser("recipes", help="list the shipped recipes")
  r.set_defaults(func=cmd_recipes)
  b = sub.add_parser("bench", help="speed of one layer per format and lowering (vs f32, Qwix)")
  b.add_argument("--quick", action="store_true", help="4096x4096 at M=1,16, 5 rounds")
  b.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 15)")
  b.add_argument("--no-qwix", action="store_true", help="skip Qwix even when installed")
  b.add_argument("--out", default="experiments/results", help="folder for bench_ops.{md,json,png}")
  b.set_defaults(func=cmd_bench)
  x = sub.add_parser("export", help="jax.export a quantized serve function for cpu/cuda/tpu")
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
  x.add_argument("--platforms", default="cpu,cuda,tpu")
  x.add_argument(
    "--out", required=True, help="output folder: serve.jaxexport, model.safetensors, export.json"
  )
  x.set_defaults(func=cmd_export)
  return parser


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    return args.func(args)
  except (ValueError, TypeError, FileNotFoundError) as e:
    console.print(f"[red]error:[/] {e}")
    return 2


if __name__ == "__main__":
  sys.exit(main())
