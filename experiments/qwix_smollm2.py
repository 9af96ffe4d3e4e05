"""Google's Qwix (0.1.8) on SmolLM2-135M: the same Flax model and text as jaxquant's LLM study.

Every variant is made by Qwix's own API on jaxquant's Linen `Llama` (the packaged SmolLM2 GGUF,
float32), and scored by jaxquant's `language.perplexity` (GPTQ-paper protocol) on the same
held-out windows, so its numbers sit next to jaxquant's recipes in one table:

  - ``fp32``: the float model (jaxquant's ``Llama``, no Qwix); with the whole model also
    jaxquant's own ``language_model("fp32")``, which must give the same perplexity.
  - ``qwix w8a8``: `qwix.PtqProvider`, int8 weights per output channel + int8 activations with a
    dynamic scale per token (absmax, symmetric); the contraction runs i8 x i8 -> i32.
  - ``qwix w4g64`` / ``qwix w4g64-asym``: `qwix.PtqProvider`, weight-only int4, groups of 64
    along the contraction (input) axis (``tile_size=64``), round to nearest; symmetric (absmax,
    Qwix's default) or asymmetric (``weight_calibration_method="minmax"``, a zero point per
    group).
  - ``qwix gptq w4g64`` (and ``-asym``): `qwix.contrib.gptq` (Hessians of every ``*_proj`` input
    collected in one float pass over the calibration batches, then `gptq.quantize_params`);
    served by `PtqProvider`.
  - ``qwix awq w4g64`` (and ``-asym``): `qwix.contrib.awq` (mean |x| per input channel collected
    in one float pass, per-weight scale search, `awq.quantize_params`); served by
    `awq.AwqInferenceProvider`.

Every rule matches ``.*_proj`` (the 7 linear layers of each block); the tied embedding / output
head (``embed_tokens``, used by ``nn.Embed.attend``), the norms and the attention products stay
float32. A variant Qwix cannot do is recorded with the error instead of a number. Calibration:
jaxquant's `language.calibration_batches` (8 batches of 8 x 256 tokens of
`data.calibration_text`).

    . .venv/bin/activate
    nice -n 5 python experiments/qwix_smollm2.py                      # all 30 layers, 16 windows
    python experiments/qwix_smollm2.py --layers 2 --max-windows 2     # a quick development slice
    python experiments/qwix_smollm2.py --variants "fp32,qwix w4g64" [--window 512]
      [--calibration-batches 8] [--out experiments/results/qwix_smollm2.json]

Writes the JSON (and a Markdown table next to it) and prints the table. ``weight_bytes`` is the
sum of ``nbytes`` of every leaf of the quantized params (JAX stores an int4 code in one byte);
``packed_bytes`` counts int4 codes at 4 bits, what a packed layout would take.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import platform
import subprocess
import time
import traceback
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from qwix.contrib import awq, awq_core, gptq, gptq_core

from jaxquant.apps import data, language
from jaxquant.apps.models import llama

RESULTS = Path(__file__).parent / "results"
LINEAR = r".*_proj"  # q/k/v/o_proj, gate/up/down_proj; not embed_tokens, norms or attention
GROUP = 64


@dataclasses.dataclass(frozen=True)
class Variant:
  """One Qwix configuration: how its rule reads and which flow makes it."""

  name: str
  description: str
  method: str  # "float", "jaxquant", "ptq", "gptq", "awq"
  weight_qtype: Any = None
  act_qtype: Any = None
  tile_size: int | None = None
  weight_calibration_method: str = "absmax"

  def rule_kwargs(self) -> dict[str, Any]:
    return dict(
      module_path=LINEAR,
      weight_qtype=self.weight_qtype,
      act_qtype=self.act_qtype,
      tile_size=self.tile_size,
      weight_calibration_method=self.weight_calibration_method,
    )


W4 = dict(weight_qtype=jnp.int4, tile_size=GROUP)
ASYM = dict(weight_calibration_method="minmax")
VARIANTS = {
  v.name: v
  for v in (
    Variant("fp32", "float32 model (jaxquant's Llama, no Qwix)", "float"),
    Variant(
      "jaxquant fp32",
      "jaxquant language_model('fp32'): must equal the fp32 row (whole model only)",
      "jaxquant",
    ),
    Variant(
      "qwix w8a8",
      "PtqProvider: int8 weights per output channel (absmax) x int8 activations, dynamic "
      "scale per token (absmax); i8 x i8 -> i32 dot_general",
      "ptq",
      weight_qtype=jnp.int8,
      act_qtype=jnp.int8,
    ),
    Variant(
      "qwix w4g64",
      "PtqProvider: int4 weights, groups of 64 along the input axis, symmetric (absmax), "
      "round to nearest; weight-only (dequantized to f32 before the matmul)",
      "ptq",
      **W4,
    ),
    Variant(
      "qwix w4g64-asym",
      "PtqProvider: int4 weights, groups of 64 along the input axis, asymmetric (minmax, "
      "int4 zero point per group), round to nearest; weight-only",
      "ptq",
      **W4,
      **ASYM,
    ),
    Variant(
      "qwix gptq w4g64",
      "qwix.contrib.gptq: int4, groups of 64, symmetric; Hessians from one float pass, "
      "block 128, 1% damping, no act-order; served by PtqProvider",
      "gptq",
      **W4,
    ),
    Variant(
      "qwix gptq w4g64-asym",
      "qwix.contrib.gptq: int4, groups of 64, asymmetric (minmax); otherwise as above",
      "gptq",
      **W4,
      **ASYM,
    ),
    Variant(
      "qwix awq w4g64",
      "qwix.contrib.awq: int4, groups of 64, symmetric; per-input-channel scales "
      "mean|x|^r, r on a 20-point grid per weight; served by AwqInferenceProvider",
      "awq",
      **W4,
    ),
    Variant(
      "qwix awq w4g64-asym",
      "qwix.contrib.awq: int4, groups of 64, asymmetric (minmax); otherwise as above",
      "awq",
      **W4,
      **ASYM,
    ),
  )
}
DEFAULT_VARIANTS = ",".join(VARIANTS)


# --------------------------------------------------------------------------- helpers
def cpu_model() -> str:
  """``lscpu``'s 'Model name' (else `platform.processor`)."""
  try:
    out = subprocess.run(["lscpu"], check=True, capture_output=True, text=True).stdout
  except (OSError, subprocess.CalledProcessError):
    return platform.processor()
  for line in out.splitlines():
    if line.strip().startswith("Model name:"):
      return line.split(":", 1)[1].strip()
  return platform.processor()


def slice_model(cfg: llama.LlamaConfig, params: dict, layers: int | None) -> tuple[Any, dict]:
  """The model cut to its first `layers` blocks (params ``layers_i``, ``i >= layers`` dropped)."""
  if layers is None or layers >= cfg.layers:
    return cfg, params
  keep = {k: v for k, v in params.items() if not (k.startswith("layers_") and int(k[7:]) >= layers)}
  return dataclasses.replace(cfg, layers=layers), keep


def _bits(dtype: Any) -> int:
  name = np.dtype(dtype).name
  return 4 if name in ("int4", "uint4") else 8 * np.dtype(dtype).itemsize


def param_bytes(tree: Any) -> dict[str, int]:
  """``nbytes`` summed over every leaf (``weight_bytes``), over the leaves of ``*_proj`` layers
  (``linear_bytes``), and with int4 leaves at 4 bits (``packed_bytes``, ``packed_linear``)."""
  out = dict(weight_bytes=0, linear_bytes=0, packed_bytes=0, packed_linear_bytes=0)
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    linear = "_proj" in jax.tree_util.keystr(path)
    n = int(leaf.nbytes)
    packed = int(np.prod(leaf.shape)) * _bits(leaf.dtype) // 8
    out["weight_bytes"] += n
    out["packed_bytes"] += packed
    if linear:
      out["linear_bytes"] += n
      out["packed_linear_bytes"] += packed
  return out


def leaf_dtypes(tree: Any) -> dict[str, int]:
  """How many leaves of each dtype (checks that the linear kernels really are int codes)."""
  counts: dict[str, int] = {}
  for leaf in jax.tree_util.tree_leaves(tree):
    counts[str(leaf.dtype)] = counts.get(str(leaf.dtype), 0) + 1
  return dict(sorted(counts.items()))


def block(tree: Any) -> Any:
  return jax.block_until_ready(tree)


# --------------------------------------------------------------------------- Qwix flows
@dataclasses.dataclass
class Built:
  """A model ready for `language.perplexity`, with what making it took."""

  model: Any
  params: Any
  seconds: float
  notes: list[str]


def abstract_params(cfg: llama.LlamaConfig, rules: list, example: jax.Array) -> Any:
  """The PTQ model's param tree as shapes, with how each kernel is quantized (``WithAux``)."""
  ptq_model = qwix.quantize_model(llama.Llama(cfg), qwix.PtqProvider(rules))
  return jax.eval_shape(ptq_model.init, jax.random.key(0), example)["params"]


def build_ptq(cfg: llama.LlamaConfig, params: dict, v: Variant, example: jax.Array) -> Built:
  start = time.perf_counter()
  rules = [qwix.QuantizationRule(**v.rule_kwargs())]
  qparams = block(qwix.quantize_params(params, abstract_params(cfg, rules, example)))
  seconds = time.perf_counter() - start
  model = qwix.quantize_model(llama.Llama(cfg), qwix.PtqProvider(rules))
  return Built(model, qparams, seconds, [])


def calibrate(
  cfg: llama.LlamaConfig, params: dict, provider: Any, batches: list[tuple[jax.Array]]
) -> tuple[Any, float]:
  """Runs the calibration provider over `batches` (float model, final hidden states, jitted
  once: the stats start as zeros with count 0), returning ``quant_stats`` and the seconds."""
  cal_model = qwix.quantize_model(llama.Llama(cfg, logits=False), provider)

  def step(variables: dict, tokens: jax.Array) -> Any:
    return cal_model.apply(variables, tokens, mutable="quant_stats")[1]["quant_stats"]

  start = time.perf_counter()
  shapes = jax.eval_shape(step, {"params": params}, batches[0][0])
  stats = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  jstep = jax.jit(step)
  for (tokens,) in batches:
    stats = jstep({"params": params, "quant_stats": stats}, tokens)
  stats = block(stats)
  return stats, time.perf_counter() - start


@contextlib.contextmanager
def jitted_cores(enabled: bool):
  """Runs Qwix's per-weight GPTQ/AWQ cores (`gptq_core.quantize_weight`,
  `awq_core.quantize_weight`, which `gptq/awq.quantize_params` call per kernel) under `jax.jit`,
  one compile per (function, how, shape), instead of op by op: the same algorithm without an
  eager dispatch (and a compile of each new slice shape) per column and grid point. GPTQ's codes
  were checked identical, eager against jitted, on a random 192 x 576 weight."""
  if not enabled:
    yield
    return
  originals = gptq_core.quantize_weight, awq_core.quantize_weight
  cache: dict[Any, Any] = {}

  def jitted(fn: Any, tag: str) -> Any:
    def call(w: jax.Array, stats: jax.Array, how: Any, **kwargs: Any) -> Any:
      key = (tag, repr(how), tuple(sorted(kwargs.items())))
      if key not in cache:
        cache[key] = jax.jit(lambda w, s: fn(w, s, how, **kwargs))
      return cache[key](w, stats)

    return call

  gptq_core.quantize_weight = jitted(originals[0], "gptq")
  awq_core.quantize_weight = jitted(originals[1], "awq")
  try:
    yield
  finally:
    gptq_core.quantize_weight, awq_core.quantize_weight = originals


def build_calibrated(
  cfg: llama.LlamaConfig,
  params: dict,
  v: Variant,
  example: jax.Array,
  batches: list[tuple[jax.Array]],
  jit_core: bool = True,
) -> Built:
  if v.method == "gptq":
    rules = [gptq.GptqRule(**v.rule_kwargs())]
    provider: Any = gptq.GptqCalibrationProvider(rules)
  else:
    rules = [awq.AwqRule(**v.rule_kwargs())]
    provider = awq.AwqCalibrationProvider(rules)
  start = time.perf_counter()
  stats, cal_seconds = calibrate(cfg, params, provider, batches)
  counts = {int(x) for x in jax.tree.leaves(stats) if np.ndim(x) == 0}
  abstract = abstract_params(cfg, rules, example)
  t0 = time.perf_counter()
  with jitted_cores(jit_core):
    if v.method == "gptq":
      qparams = gptq.quantize_params(params, abstract, stats)
      serve: Any = qwix.PtqProvider(rules)
    else:
      qparams = awq.quantize_params(params, abstract, stats)
      serve = awq.AwqInferenceProvider(rules)
    qparams = block(qparams)
  end = time.perf_counter()
  n_stats = len(
    jax.tree_util.tree_leaves(stats, is_leaf=lambda x: isinstance(x, dict) and "count" in x)
  )
  notes = [
    f"calibration {cal_seconds:.1f} s ({len(batches)} batches of {tuple(batches[0][0].shape)}"
    f" tokens, batch count per stat {sorted(counts)}, {n_stats} weights with stats), "
    f"{v.method}.quantize_params {end - t0:.1f} s "
    f"({'per-weight core jitted' if jit_core else 'eager, as shipped'})"
  ]
  model = qwix.quantize_model(llama.Llama(cfg), serve)
  return Built(model, qparams, end - start, notes)


def build_jaxquant_fp32() -> Built:
  lm = language.language_model("fp32")
  return Built(lm.model, lm.variables["params"], lm.quantize_seconds, [])


# --------------------------------------------------------------------------- the study
def run_variant(
  v: Variant,
  cfg: llama.LlamaConfig,
  params: dict,
  tokenizer: Any,
  windows: np.ndarray,
  batches: list[tuple[jax.Array]],
  jit_core: bool = True,
  not_run: str | None = None,
) -> dict[str, Any]:
  example = jnp.asarray(windows[:1, :8])
  row: dict[str, Any] = {"variant": v.name, "description": v.description}
  if not_run is not None:
    row.update(
      ppl=None, nll=None, tokens=None, weight_bytes=None, quantize_seconds=None,
      notes=f"NOT RUN: {not_run}",
    )  # fmt: skip
    return row
  try:
    if v.method == "float":
      built = Built(llama.Llama(cfg), params, 0.0, [])
    elif v.method == "jaxquant":
      built = build_jaxquant_fp32()
    elif v.method == "ptq":
      built = build_ptq(cfg, params, v, example)
    else:
      built = build_calibrated(cfg, params, v, example, batches, jit_core)
    sizes = param_bytes(built.params)
    lm = language.LanguageModel(
      v.name, cfg, built.model, {"params": built.params}, tokenizer, sizes["weight_bytes"],
      sizes["linear_bytes"],
    )  # fmt: skip
    result = language.perplexity(lm, windows)
  except Exception as e:  # a variant Qwix cannot make: record why, never a number
    traceback.print_exc()
    row.update(
      ppl=None, nll=None, tokens=None, weight_bytes=None, quantize_seconds=None,
      notes=f"FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
    )  # fmt: skip
    return row
  row.update(
    ppl=result["ppl"],
    nll=result["nll"],
    tokens=result["tokens"],
    weight_bytes=sizes["weight_bytes"],
    quantize_seconds=built.seconds,
    linear_bytes=sizes["linear_bytes"],
    packed_bytes=sizes["packed_bytes"],
    packed_linear_bytes=sizes["packed_linear_bytes"],
    eval_seconds=result["seconds"],
    leaf_dtypes=leaf_dtypes(built.params),
    notes="; ".join(built.notes),
  )
  return row


def table(rows: list[dict]) -> str:
  head = (
    "| variant | ppl | nll | tokens | weight MiB | packed MiB | linear MiB (packed) "
    "| quantize s |\n|---|---:|---:|---:|---:|---:|---:|---:|\n"
  )
  lines = []
  for r in rows:
    if r["ppl"] is None:
      lines.append(f"| {r['variant']} | — | — | — | — | — | — | {r['notes']} |")
      continue
    mib = lambda b: f"{b / 2**20:.2f}"
    lines.append(
      f"| {r['variant']} | {r['ppl']:.3f} | {r['nll']:.4f} | {r['tokens']} "
      f"| {mib(r['weight_bytes'])} | {mib(r['packed_bytes'])} "
      f"| {mib(r['linear_bytes'])} ({mib(r['packed_linear_bytes'])}) "
      f"| {r['quantize_seconds']:.1f} |"
    )
  return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma list of variants")
  parser.add_argument("--max-windows", type=int, default=16)
  parser.add_argument("--window", type=int, default=language.DEFAULT_WINDOW)
  parser.add_argument("--layers", type=int, default=None, help="first N blocks only (dev)")
  parser.add_argument(
    "--calibration-batches", type=int, default=None, help="first K of the 8 batches (8 x 256)"
  )
  parser.add_argument(
    "--eager", action="store_true", help="GPTQ/AWQ cores op by op, as Qwix ships them"
  )
  parser.add_argument(
    "--not-run", default="", help="comma list of variants recorded as not run (--not-run-why)"
  )
  parser.add_argument("--not-run-why", default="", help="the reason written in their notes")
  parser.add_argument("--out", type=Path, default=None)
  args = parser.parse_args(argv)

  names = [n.strip() for n in args.variants.split(",") if n.strip()]
  unknown = [n for n in names if n not in VARIANTS]
  if unknown:
    parser.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
  full = args.layers is None
  if not full and "jaxquant fp32" in names:
    names.remove("jaxquant fp32")  # loads the whole model: meaningless for a slice
  out = args.out or RESULTS / ("qwix_smollm2.json" if full else f"qwix_smollm2_l{args.layers}.json")

  cfg, params = slice_model(*llama.load_gguf(), args.layers)
  tokenizer = llama.gguf_tokenizer()
  windows = language.token_windows(
    language.token_stream(tokenizer, data.evaluation_text()), args.window, args.max_windows
  )
  batches = language.calibration_batches(tokenizer)[: args.calibration_batches]
  print(
    f"SmolLM2: {cfg.layers} layers; {windows.shape[0]} windows of {args.window}; "
    f"{len(batches)} calibration batches; qwix {qwix.__version__}, jax {jax.__version__}",
    flush=True,
  )

  skipped = {n.strip() for n in args.not_run.split(",") if n.strip()}
  rows = []
  for name in names:
    t0 = time.perf_counter()
    why = args.not_run_why if name in skipped else None
    v = VARIANTS[name]
    rows.append(run_variant(v, cfg, params, tokenizer, windows, batches, not args.eager, why))
    r = rows[-1]
    ppl = f"{r['ppl']:.3f}" if r["ppl"] is not None else "—"
    print(f"{name}: ppl {ppl} ({time.perf_counter() - t0:.0f} s) {r['notes']}", flush=True)

  report = {
    "model": "SmolLM2-135M-Instruct (packaged Q4_1 GGUF, dequantized to float32)",
    "layers": cfg.layers,
    "window": args.window,
    "windows": int(windows.shape[0]),
    "calibration": f"{len(batches)} batches of {tuple(batches[0][0].shape)} tokens "
    "(language.calibration_batches, data.calibration_text)",
    "qwix": qwix.__version__,
    "jax": jax.__version__,
    "cpu": cpu_model(),
    "rows": rows,
  }
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(report, indent=2) + "\n")
  md = table(rows)
  out.with_suffix(".md").write_text(
    f"# Qwix {qwix.__version__} on SmolLM2-135M ({cfg.layers} layers)\n\n"
    f"{report['windows']} windows of {args.window} tokens of `evaluation_text()`, "
    f"GPTQ protocol (`language.perplexity`); calibration {report['calibration']}; "
    f"CPU {report['cpu']}.\n\n{md}"
  )
  print("\n" + md)
  print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
  main()
