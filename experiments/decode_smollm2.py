"""Batch-1 greedy decoding speed of SmolLM2-135M per recipe and KV cache, in one run.

Each recipe quantizes SmolLM2 (data-free recipes only, so the run stays short), then
generates from the same prompt: prefill and decode are timed apart (jitted, a compiling run
first, the median of ``--repeats`` runs after it), tokens/s and the ratio to fp32 weights
with a float32 cache. llama.cpp's figures on the same file and machine are put beside it
when ``experiments/results/llamacpp_smollm2.json`` exists.

    python experiments/decode_smollm2.py [--recipes fp32,w8a8,w8,w4g64] [--steps 64]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax

from jaxquant.apps import bench, language

RESULTS = Path(__file__).parent / "results"
PROMPT = "The capital of France is"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--recipes", default="fp32,w8a8,w8,w4g64")
  parser.add_argument("--caches", default="float32,int8")
  parser.add_argument("--steps", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument(
    "--llamacpp",
    default=str(RESULTS / "llamacpp_smollm2.json"),
    help="llama.cpp results to put beside (experiments/llamacpp_smollm2.py --out)",
  )
  args = parser.parse_args()
  rows = []
  for name in [n.strip() for n in args.recipes.split(",") if n.strip()]:
    lm = language.language_model(name)
    for cache in [c.strip() for c in args.caches.split(",") if c.strip()]:
      got = language.generate_text(lm, PROMPT, args.steps, cache=cache, repeats=args.repeats)  # type: ignore[arg-type]
      rows.append({"recipe": name, "kv_cache": cache, "linear_bytes": lm.linear_bytes, **got})
      print(f"{name:10s} {cache:8s} prefill {got['prefill_tps']:7.1f} tok/s  decode "
            f"{got['decode_tps']:6.1f} tok/s  {got['text'][:40]!r}")  # fmt: skip
  fp32 = [r for r in rows if r["recipe"] == "fp32"]
  if not fp32:
    raise SystemExit("--recipes must include fp32: every speed is quoted against it")
  # the float32-cache fp32 row when it ran, else fp32 with the first cache given
  base = next((r for r in fp32 if r["kv_cache"] == "float32"), fp32[0])
  cpu = bench.cpu_description()
  flags = ", ".join(f for f, on in cpu["flags"].items() if on)
  lines = [
    f"SmolLM2-135M-Instruct, batch 1, greedy, prompt {PROMPT!r} ({base['prompt_tokens']} "
    f"tokens), {args.steps} new tokens, median of {args.repeats} after a compiling run; CPU "
    f"{cpu['model']} ({cpu['cores']} cores; flags: {flags}); jax {jax.__version__}.",
    "",
    "| weights | KV cache | prefill tok/s | decode tok/s | × fp32 decode | linear MiB | text |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
      f"| jaxquant {r['recipe']} | {r['kv_cache']} | {r['prefill_tps']:.1f} | "
      f"{r['decode_tps']:.1f} | {r['decode_tps'] / base['decode_tps']:.2f}× | "
      f"{r['linear_bytes'] / 2**20:.1f} | {r['text'][:32]!r} |"
    )
  llamacpp = Path(args.llamacpp)
  if llamacpp.is_file():
    for r in json.loads(llamacpp.read_text())["rows"]:
      if r.get("decode_tok_s"):
        lines.append(
          f"| llama.cpp {r['type']} | its own | {r.get('prefill_tok_s', 0):.1f} | "
          f"{r['decode_tok_s']:.1f} | {r['decode_tok_s'] / base['decode_tps']:.2f}× | "
          f"{r['file_mib']:.1f} (file) | |"
        )
  text = "\n".join(lines) + "\n"
  (RESULTS / "decode_smollm2.md").write_text(text)
  (RESULTS / "decode_smollm2.json").write_text(
    json.dumps({"cpu": cpu, "steps": args.steps, "rows": rows}, indent=1)
  )
  print(text)


if __name__ == "__main__":
  main()
