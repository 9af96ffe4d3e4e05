"""INT4 that works: error-compensating PTQ on all-MiniLM-L6-v2, against round-to-nearest.

Runs `jaxquant eval` over the recipes (quantizing each on standard-library docstrings, then
embedding held-out docstrings from other modules), writes a Markdown table and JSON, and plots
mean cosine to float32 against encoder-kernel bytes.

    python experiments/ptq_minilm.py [--recipes ...] [-n 512] [--update]

``--update`` evaluates only the listed recipes and merges their rows into the existing results
(replacing rows of the same recipe, keeping the others in order).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jaxquant.apps import cli

RESULTS = Path(__file__).parent / "results"
RECIPES = (
  "fp32,w8,w8a8,w8a8-smooth,w4g128-asym,w4g64-hqq,w4g128-awq,w4g128-gptq,w4g128-awq-gptq,"
  "mixed:avg_bits=5,nf4"
)


def plot(rows: list[dict], path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for r in rows:
    mib = r["encoder_kernel_bytes"] / 2**20
    ax.scatter(mib, r["mean_cosine"], s=30)
    ax.annotate(
      r["recipe"], (mib, r["mean_cosine"]), fontsize=8, xytext=(4, 3), textcoords="offset points"
    )
  ax.set_xscale("log")
  ax.set_xlabel("encoder kernel bytes (MiB, log scale)")
  ax.set_ylabel("mean cosine to float32 embeddings")
  ax.set_title("all-MiniLM-L6-v2: fidelity vs size per recipe")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def merge(old: dict, new: dict) -> dict:
  """`old` results with `new`'s rows in place of same-recipe rows (new recipes appended)."""
  if old["sentences"] != new["sentences"]:
    raise ValueError(f"results on {old['sentences']} sentences, update on {new['sentences']}.")
  fresh = {r["recipe"]: r for r in new["rows"]}
  rows = [fresh.pop(r["recipe"], r) for r in old["rows"]]
  return {**old, "rows": rows + list(fresh.values())}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--recipes", default=RECIPES)
  parser.add_argument("-n", type=int, default=512)
  parser.add_argument(
    "--update", action="store_true", help="merge the listed recipes' rows into the existing results"
  )
  args = parser.parse_args()
  RESULTS.mkdir(exist_ok=True)
  out = RESULTS / "ptq_minilm.json"
  if args.update:
    fresh = RESULTS / "ptq_minilm.update.json"
    cli.main(["eval", "--recipes", args.recipes, "-n", str(args.n), "--json", str(fresh)])
    result = merge(json.loads(out.read_text()), json.loads(fresh.read_text()))
    fresh.unlink()
    out.write_text(json.dumps(result, indent=1))
  else:
    cli.main(["eval", "--recipes", args.recipes, "-n", str(args.n), "--json", str(out)])
    result = json.loads(out.read_text())
  lines = [
    "| recipe | mean cos | min cos | top-5 agree | encoder kernels MiB | embed s |",
    "|---|---|---|---|---|---|",
  ]
  for r in result["rows"]:
    lines.append(
      f"| {r['recipe']} | {r['mean_cosine']:.5f} | {r['min_cosine']:.5f} | "
      f"{r['top5_agreement']:.3f} | {r['encoder_kernel_bytes'] / 2**20:.2f} | "
      f"{r['seconds']:.2f} |"
    )
  (RESULTS / "ptq_minilm.md").write_text("\n".join(lines) + "\n")
  plot(result["rows"], RESULTS / "ptq_minilm.png")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
