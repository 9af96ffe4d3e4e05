"""Per-format weight error and size on the real all-MiniLM-L6-v2 checkpoint.

For each recipe: relative error ``||W - Ŵ|| / ||W||`` and SNR of the 36 encoder kernels (mean
and worst), the quantized tensors' bytes as a share of their float32 bytes (on disk, header
included), and the time to quantize. Weight error only; end-to-end embedding fidelity needs the
encoder itself.

    python experiments/minilm_weight_error.py [--recipes int8,int4-g128,...] [--markdown OUT]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
from rich.console import Console
from rich.table import Table

import jaxquant as jq
from jaxquant.apps.models import minilm
from jaxquant.numerics import quantization_error
from jaxquant.transforms import named_leaves

DEFAULT_RECIPES = "bf16,fp8,w8,w8g128,w4g128,w4g128-asym,int4:g128:mse,nf4"


def measure(params: dict, recipe_name: str) -> dict:
  recipe = jq.load_recipe(recipe_name)
  plan = jq.plan(params, recipe.rules)
  start = time.perf_counter()
  qparams = jq.quantize_params(params, recipe.rules)
  seconds = time.perf_counter() - start
  originals = dict(named_leaves(params))
  errs = [
    quantization_error(originals[p], q)
    for p, q in named_leaves(qparams)
    if isinstance(q, jq.QArray) and p.startswith("encoder/")
  ]
  with tempfile.TemporaryDirectory() as tmp:
    file_bytes = os.path.getsize(jq.save(os.path.join(tmp, "m.safetensors"), qparams))
  kept = sum(r.bytes_before for r in plan.rows if r.spec is None)
  matched = sum(r.bytes_before for r in plan.quantized)
  rel = np.array([e["rel_error"] for e in errs])
  snr = np.array([e["snr_db"] for e in errs])
  return {
    "recipe": recipe_name,
    "tensors": len(plan.quantized),
    "mean_rel": rel.mean(),
    "max_rel": rel.max(),
    "min_snr": snr.min(),
    "size": (file_bytes - kept) / matched,
    "seconds": seconds,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--recipes", default=DEFAULT_RECIPES)
  parser.add_argument("--markdown", help="also write the table as Markdown here")
  args = parser.parse_args()
  params = minilm.load_params()
  rows = [measure(params, name) for name in args.recipes.split(",")]
  table = Table(title="all-MiniLM-L6-v2: encoder kernel error and size")
  cols = [
    "recipe",
    "tensors",
    "mean rel err",
    "worst rel err",
    "worst SNR dB",
    "bytes vs f32",
    "quantize s",
  ]
  for c in cols:
    table.add_column(c, justify="left" if c == "recipe" else "right", no_wrap=c == "recipe")
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for r in rows:
    cells = [
      r["recipe"],
      str(r["tensors"]),
      f"{r['mean_rel']:.2%}",
      f"{r['max_rel']:.2%}",
      f"{r['min_snr']:.1f}",
      f"{r['size']:.1%}",
      f"{r['seconds']:.2f}",
    ]
    table.add_row(*cells)
    lines.append("| " + " | ".join(cells) + " |")
  Console().print(table)
  if args.markdown:
    with open(args.markdown, "w") as f:
      f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
