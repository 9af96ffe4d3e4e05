"""Every recipe on a real LLM: SmolLM2-135M-Instruct (from its GGUF) by perplexity.

Each recipe quantizes the model (calibrated on standard-library docstrings when it needs
data), then scores held-out prose from other modules with the GPTQ paper's protocol (one token
stream, non-overlapping windows, tokens 2…N of each), once with the float KV cache and once
with the INT8 one. Writes ``experiments/results/ppl_smollm2.{json,md,png}``; the table puts
Qwix (``experiments/qwix_smollm2.py``) and llama.cpp (``experiments/llamacpp_smollm2.py``)
beside it when their result files exist.

    python experiments/ppl_smollm2.py [--recipes fp32,w8,...] [--max-windows 16] [--update]

Results are written after every recipe, so an interrupted run keeps what it measured;
``--update`` merges the listed recipes into the existing results.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from pathlib import Path

import jax

from jaxquant.apps import bench, data, language
from jaxquant.io import atomic_write

RESULTS = Path(__file__).parent / "results"
RECIPES = (
  "fp32,bf16,w8,w8a8,w8a8-static,w8a8-smooth,w4,w4-asym,w4g64,w4g64-asym,nf4,w4g64-hqq,"
  "w4g64-awq,w4g64-gptq,w4g64-awq-gptq,mixed:avg_bits=5,mixed:avg_bits=4.5"
)


def evaluate(names: list[str], window: int, max_windows: int, kv: list, out: Path) -> dict:
  text = data.evaluation_text()
  old = json.loads(out.read_text()) if out.is_file() else {"rows": []}
  rows = list(old["rows"])
  windows = None
  for name in names:
    start = time.perf_counter()
    lm = language.language_model(name, progress=True)
    built = time.perf_counter() - start
    if windows is None:
      windows = language.token_windows(lm.encode(text), window, max_windows)
    for cache in kv:
      got = language.perplexity(lm, windows, cache=cache, progress=True)
      row = {
        "recipe": name,
        "kv_cache": cache or "float32",
        **got,
        "weight_bytes": lm.weight_bytes,
        "linear_bytes": lm.linear_bytes,
        "quantize_seconds": lm.quantize_seconds,
        "build_seconds": built,
      }
      rows = [r for r in rows if (r["recipe"], r["kv_cache"]) != (name, row["kv_cache"])]
      rows.append(row)
      print(f"{name:18s} KV {row['kv_cache']:8s} ppl {got['ppl']:8.3f}  ({got['seconds']:.0f} s)")
    results = {
      "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized = fp32 reference)",
      "window": window,
      "windows": int(windows.shape[0]),
      "scored_tokens": int(windows.shape[0] * (window - 1)),
      "calibration": {
        "sequences": language.CALIBRATION_SEQUENCES,
        "length": language.CALIBRATION_LENGTH,
      },
      "cpu": bench.cpu_description(),
      "jax": jax.__version__,
      "rows": rows,
    }
    atomic_write(out, lambda tmp, r=results: Path(tmp).write_text(json.dumps(r, indent=1)))
  return results


def _ref(rows: list[dict]) -> float | None:
  return next(
    (r["ppl"] for r in rows if r["recipe"] == "fp32" and r["kv_cache"] == "float32"), None
  )


def markdown(results: dict, qwix: dict | None, llamacpp: dict | None) -> str:
  rows, ref = results["rows"], _ref(results["rows"])
  cpu = results["cpu"]
  flags = ", ".join(f for f, on in cpu["flags"].items() if on) or "none of the listed"
  lines = [
    f"SmolLM2-135M-Instruct, {results['windows']} held-out windows of {results['window']} "
    f"tokens ({results['scored_tokens']} scored); CPU {cpu['model']} ({cpu['cores']} cores; "
    f"flags: {flags}); jax {results['jax']}. Δ is against jaxquant fp32 with the float KV cache.",
    "",
    "| method | KV cache | perplexity | Δ vs fp32 | weights MiB | linear MiB | quantize s |",
    "|---|---|---|---|---|---|---|",
  ]

  def delta(p):
    return "" if ref is None else f"{p / ref - 1:+.2%}"

  for r in rows:
    lines.append(
      f"| jaxquant {r['recipe']} | {r['kv_cache']} | {r['ppl']:.3f} | {delta(r['ppl'])} | "
      f"{r['weight_bytes'] / 2**20:.1f} | {r['linear_bytes'] / 2**20:.1f} | "
      f"{r['quantize_seconds']:.0f} |"
    )
  for r in (qwix or {}).get("rows", []):
    if r.get("ppl") is None:
      lines.append(f"| {r['variant']} | float32 | n/a | | | | | ({r.get('notes', '')})")
      continue
    linear = r.get("packed_linear_bytes") or r.get("linear_bytes") or 0
    lines.append(
      f"| {r['variant']} | float32 | {r['ppl']:.3f} | {delta(r['ppl'])} | "
      f"{r.get('packed_bytes', r['weight_bytes']) / 2**20:.1f} | {linear / 2**20:.1f} | "
      f"{r.get('quantize_seconds', 0):.0f} |"
    )
  if llamacpp:
    base = next((r for r in llamacpp["rows"] if r["type"] == "f32"), None)
    for r in llamacpp["rows"]:
      own = "" if base is None else f"{r['ppl'] / base['ppl'] - 1:+.2%} vs its f32"
      lines.append(
        f"| llama.cpp {r['type']} | its own | {r['ppl']:.3f} | {own} | "
        f"{r['file_mib']:.1f} (file) | | |"
      )
  return "\n".join(lines) + "\n"


def goals(results: dict) -> str:
  """The issue's targets against what was measured (float KV cache rows)."""
  ppl = {r["recipe"]: r["ppl"] for r in results["rows"] if r["kv_cache"] == "float32"}
  ref = ppl.get("fp32")
  if ref is None:
    return ""
  d = {k: v / ref - 1 for k, v in ppl.items()}
  out = ["", "| goal | measured | met |", "|---|---|---|"]

  def add(goal, value, ok):
    out.append(f"| {goal} | {value} | {'yes' if ok else '**no**'} |")

  if "w8" in d:
    add("w8 Δppl ≤ 0.3%", f"{d['w8']:+.2%}", d["w8"] <= 0.003)
  if "w8a8" in d:
    add("w8a8 Δppl ≤ 1.5%", f"{d['w8a8']:+.2%}", d["w8a8"] <= 0.015)
  if "w8a8-smooth" in d and "w8a8" in d:
    add("w8a8-smooth ≤ w8a8", f"{ppl['w8a8-smooth']:.3f} vs {ppl['w8a8']:.3f}",
        ppl["w8a8-smooth"] <= ppl["w8a8"])  # fmt: skip
  rtn = ppl.get("w4g64-asym")
  if rtn is not None and rtn > ref:
    for name, target in (("w4g64-gptq", 0.55), ("w4g64-awq", 0.40)):
      if name in ppl:
        closed = (rtn - ppl[name]) / (rtn - ref)
        add(f"{name} closes ≥ {target:.0%} of the RTN-asym gap", f"{closed:.0%}", closed >= target)
    if "w4g64-awq-gptq" in ppl and "w4g64-gptq" in ppl:
      add("awq+gptq ≤ gptq", f"{ppl['w4g64-awq-gptq']:.3f} vs {ppl['w4g64-gptq']:.3f}",
          ppl["w4g64-awq-gptq"] <= ppl["w4g64-gptq"])  # fmt: skip
  if "mixed:avg_bits=5" in d:
    m = d["mixed:avg_bits=5"]
    add("mixed:avg_bits=5 Δppl ≤ 3%", f"{m:+.2%}", m <= 0.03)
  gptq = next((r for r in results["rows"] if r["recipe"] == "w4g64-gptq"), None)
  if gptq:
    s = gptq["quantize_seconds"]
    add("GPTQ on 210 layers ≤ 8 min", f"{s / 60:.1f} min", s <= 480)
  return "\n".join(out) + "\n"


def same_windows(pattern: str, results: dict) -> dict | None:
  """The first result file matching `pattern` scored on the same windows as `results`."""
  for path in sorted(RESULTS.glob(pattern)):
    other = json.loads(path.read_text())
    rows = other.get("rows") or [{}]
    windows = other.get("windows", rows[0].get("windows"))
    if other.get("window") == results["window"] and windows == results["windows"]:
      return other
  return None


def plot(results: dict, path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7.5, 4.8))
  for r in results["rows"]:
    if r["kv_cache"] != "float32":
      continue
    mib = r["linear_bytes"] / 2**20
    ax.scatter(mib, r["ppl"], s=28)
    ax.annotate(r["recipe"], (mib, r["ppl"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
  ax.set_xscale("log")
  ax.set_xlabel("linear-layer bytes (MiB, log scale; embeddings excluded)")
  ax.set_ylabel("perplexity (held-out prose)")
  ax.set_title("SmolLM2-135M: perplexity vs weight bytes per recipe")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--recipes", default=RECIPES)
  parser.add_argument("--window", type=int, default=512)
  parser.add_argument("--max-windows", type=int, default=16)
  parser.add_argument("--kv", choices=("float32", "int8", "both"), default="both")
  parser.add_argument("--update", action="store_true", help="merge into existing results")
  parser.add_argument("--report-only", action="store_true", help="rewrite md/png from the json")
  args = parser.parse_args()
  out = RESULTS / "ppl_smollm2.json"
  if not args.report_only:
    if out.is_file() and not args.update:
      out.unlink()
    kv = {"float32": [None], "int8": ["int8"], "both": [None, "int8"]}[args.kv]
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    evaluate(names, args.window, args.max_windows, kv, out)
  results = json.loads(out.read_text())
  text = markdown(
    results,
    same_windows("qwix_smollm2*.json", results),
    same_windows("llamacpp_smollm2*.json", results),
  )
  text += goals(results)
  (RESULTS / "ppl_smollm2.md").write_text(text)
  with contextlib.suppress(ImportError):  # matplotlib is the plot extra
    plot(results, RESULTS / "ppl_smollm2.png")
  print(text)
  if any(math.isnan(r["ppl"]) for r in results["rows"]):
    raise SystemExit("a perplexity is NaN")


if __name__ == "__main__":
  main()
