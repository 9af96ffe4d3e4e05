"""jaxquant's GGUF export, consumed by llama.cpp: the same weights scored by both.

Each recipe (default ``q8_0,q4_0,q4_1``: the specs GGUF's Q8_0, Q4_0 and Q4_1 hold exactly)
quantizes SmolLM2-135M-Instruct in jaxquant, is scored by jaxquant (perplexity on the held-out
windows, batch-1 decode tokens/s), and is exported with `llama.export_gguf` (token table as
F32, so both sides hold identical weights); llama.cpp (``llama-cpp-python``, in its own venv)
then loads each exported file and scores it on the same text and windows
(`experiments/llamacpp_smollm2.py --files`). Perplexities should agree to rounding; the
speeds are what a local user gets from each runtime on this CPU.

    python experiments/gguf_export_smollm2.py [--recipes q8_0,q4_0,q4_1] [--max-windows 8]
      [--llamacpp-python /work/llamacpp-venv/bin/python]

Writes experiments/results/gguf_export_smollm2.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from jaxquant.apps import data, language
from jaxquant.apps.bench import cpu_description
from jaxquant.apps.models import llama
from jaxquant.io import atomic_write

RESULTS = Path(__file__).parent / "results"
PROMPT = "The capital of France is"


def jaxquant_rows(recipes: list[str], window: int, max_windows: int, folder: Path) -> list[dict]:
  text = data.evaluation_text()
  rows = []
  for name in recipes:
    lm = language.language_model(name)
    windows = language.token_windows(lm.encode(text), window, max_windows)
    got = language.perplexity(lm, windows)
    speed = language.generate_text(lm, PROMPT, 64, cache="float32", repeats=3)
    assert lm.result is not None
    start = time.perf_counter()
    path, added = llama.export_gguf(folder / f"{name}.gguf", lm.cfg, lm.result.qparams)
    rows.append(
      {
        "recipe": name,
        "jaxquant_ppl": got["ppl"],
        "jaxquant_decode_tok_s": speed["decode_tps"],
        "export_seconds": time.perf_counter() - start,
        "requantized": added,
        "file": str(path),
        "file_mib": path.stat().st_size / 2**20,
      }
    )
    print(f"  {name}: jaxquant ppl {got['ppl']:.3f}, exported {path}", flush=True)
  return rows


def llamacpp_rows(python: str, rows: list[dict], window: int, max_windows: int, out: Path) -> dict:
  files = ",".join(f"{r['recipe']}={r['file']}" for r in rows)
  script = Path(__file__).parent / "llamacpp_smollm2.py"
  cmd = [python, str(script), "--files", files, "--windows-of", str(window)]
  cmd += ["--max-windows", str(max_windows), "--out", str(out)]
  subprocess.run(cmd, check=True, env={**os.environ, "OMP_WAIT_POLICY": "passive"})
  return json.loads(out.read_text())


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--recipes", default="q8_0,q4_0,q4_1")
  parser.add_argument("--window", type=int, default=512)
  parser.add_argument("--max-windows", type=int, default=8)
  parser.add_argument("--llamacpp-python", default="/work/llamacpp-venv/bin/python")
  args = parser.parse_args()
  recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
  with tempfile.TemporaryDirectory(prefix="gguf_export_") as tmp:
    rows = jaxquant_rows(recipes, args.window, args.max_windows, Path(tmp))
    cpp = llamacpp_rows(
      args.llamacpp_python, rows, args.window, args.max_windows, Path(tmp) / "llamacpp.json"
    )
  by_label = {r["type"]: r for r in cpp["rows"]}
  cpu = cpu_description()
  lines = [
    f"SmolLM2-135M-Instruct quantized by jaxquant, exported to GGUF, scored by both runtimes on "
    f"the same {args.max_windows} windows of {args.window} tokens; CPU {cpu['model']} "
    f"({cpu['cores']} cores; {', '.join(f for f, on in cpu['flags'].items() if on)}); "
    f"llama-cpp-python {cpp['llama_cpp_python']}. Decode: batch 1, 64 greedy tokens, median of 3.",
    "",
    "| recipe | GGUF types | file MiB | jaxquant ppl | llama.cpp ppl | |Δ| | jaxquant decode tok/s "
    "| llama.cpp decode tok/s |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    c = by_label[r["recipe"]]
    r["llamacpp_ppl"], r["llamacpp_decode_tok_s"] = c["ppl"], c["decode_tok_s"]
    r["tensor_types"] = c["tensor_types"]
    types = ", ".join(f"{k}×{v}" for k, v in c["tensor_types"].items())
    lines.append(
      f"| {r['recipe']} | {types} | {r['file_mib']:.1f} | {r['jaxquant_ppl']:.3f} | "
      f"{c['ppl']:.3f} | {abs(c['ppl'] / r['jaxquant_ppl'] - 1):.3%} | "
      f"{r['jaxquant_decode_tok_s']:.1f} | {c['decode_tok_s']:.1f} |"
    )
  table = "\n".join(lines) + "\n"
  print(table)
  blob = json.dumps({"cpu": cpu, "rows": rows, "llamacpp": cpp}, indent=1, default=str)
  atomic_write(RESULTS / "gguf_export_smollm2.json", lambda t: Path(t).write_text(blob))
  atomic_write(RESULTS / "gguf_export_smollm2.md", lambda t: Path(t).write_text(table))


if __name__ == "__main__":
  main()
