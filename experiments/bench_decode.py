"""Decoding speed of the byte-level decoder: quantized weights × float / INT8 KV cache.

Random-init weights (speed does not depend on their values): the default `DecoderConfig` and
a wider one whose weights dominate (dim 512, MLP 2048, 4 layers). For every weight recipe
(FP32, W8A8 per token, W8 weight-only, W4 g64/g128 weight-only, W4A8 g128) and KV cache
(float32, int8), times `make_generate` (prefill + one jitted `lax.scan` of single-token
steps) at batch 1 and 8: tokens/s is new tokens over the median wall time of a whole
generation, all variants timed in interleaved rounds. Quality sanity check: the largest logit
difference from the FP32 model with a float cache over a 64-byte sequence decoded through the
cache. Quantized codes keep their stored layout for the compiled CPU kernels (without them,
they are stored contraction-minor, `jaxquant.ops.serving_layout`, XLA:CPU's fastest).
Writes experiments/results/bench_decode.{md,json}.

    python experiments/bench_decode.py [--quick] [--repeats 5] [--steps 128]
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxquant as jq
from jaxquant import flax as jqf
from jaxquant.apps.bench import time_interleaved
from jaxquant.apps.models.decoder import (
  Decoder,
  DecoderConfig,
  cache_bytes,
  init_cache,
  make_generate,
)
from jaxquant.ops import cpu_kernels, serving_layout
from jaxquant.transforms import tree_nbytes

RESULTS = Path(__file__).parent / "results"
EMBED = jq.Rule("embed", None, expect_match=False)
RECIPES = {
  "fp32": None,
  "w8a8": [EMBED, jq.Rule(".*", weight="int8", act="int8:token")],
  "w8": [EMBED, jq.Rule(".*", weight="int8")],
  "w4g128": [EMBED, jq.Rule(".*", weight="int4:g128")],
  "w4g64": [EMBED, jq.Rule(".*", weight="int4:g64")],
  "w4a8g128": [EMBED, jq.Rule(".*", weight="int4:g128", act="int8:token")],
}
CONFIGS = {
  "default": DecoderConfig(),
  "wide": DecoderConfig(dim=512, layers=4, heads=8, mlp=2048),
}
CACHES = ("float32", "int8")


def serving(cfg: DecoderConfig, params: dict, recipe: str):
  """``(model, variables, weight bytes)`` for a recipe (None rules: the float model)."""
  rules = RECIPES[recipe]
  if rules is None:
    return Decoder(cfg), {"params": params}, tree_nbytes(params)
  qparams = jq.quantize_params(params, rules)
  if not cpu_kernels.available():  # XLA:CPU's integer dot is fastest with [out, in] codes
    qparams = serving_layout(qparams)
  return jqf.quantize_model(Decoder(cfg), rules, "serve"), {"params": qparams}, tree_nbytes(qparams)


def max_logit_diff(model, variables, ref_logits, tokens, cache: str, cfg: DecoderConfig) -> float:
  """Largest |logit - FP32 logit| with a prefill of 8 bytes, then one byte per call."""
  kv = init_cache(cfg, tokens.shape[0], tokens.shape[1], cache)
  step = jax.jit(lambda v, t, c, p: model.apply(v, t, cache=c, pos=p))
  logits, kv = step(variables, tokens[:, :8], kv, 0)
  out = [logits]
  for i in range(8, tokens.shape[1]):
    logits, kv = step(variables, tokens[:, i : i + 1], kv, i)
    out.append(logits)
  return float(jnp.max(jnp.abs(jnp.concatenate(out, axis=1) - ref_logits)))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=128, help="new tokens per generation")
  parser.add_argument("--prompt", type=int, default=32, help="prompt length (bytes)")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--batches", default="1,8")
  parser.add_argument("--quick", action="store_true", help="small and short, for CI")
  args = parser.parse_args()
  small = {"default": DecoderConfig(dim=64, layers=2, heads=2, mlp=128)}
  configs = small if args.quick else CONFIGS
  recipes = ["fp32", "w8a8", "w4g64"] if args.quick else list(RECIPES)
  batches = [1] if args.quick else [int(b) for b in args.batches.split(",")]
  steps, repeats = (8, 1) if args.quick else (args.steps, args.repeats)
  rng = np.random.default_rng(0)
  rows = []
  for cname, cfg in configs.items():
    model = Decoder(cfg)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    check = jnp.asarray(rng.integers(0, 256, (2, 64)), jnp.int32)
    ref_logits = model.apply({"params": params}, check)
    scale = float(jnp.max(jnp.abs(ref_logits)))
    served, fns = {}, {}
    for recipe in recipes:
      smodel, variables, wbytes = serving(cfg, params, recipe)
      for cache in CACHES:
        diff = max_logit_diff(smodel, variables, ref_logits, check, cache, cfg)
        served[recipe, cache] = (wbytes, diff)
        gen = make_generate(smodel, steps, cache=cache)
        fns[recipe, cache] = functools.partial(gen, variables)
        print(f"{cname} {recipe:7s} kv={cache:7s}: max |Δlogit| {diff:.4f}", flush=True)
    for b in batches:
      prompt = jnp.asarray(rng.integers(0, 256, (b, args.prompt)), jnp.int32)
      calls = {name: (lambda fn=fn: fn(prompt)) for name, fn in fns.items()}
      seconds = time_interleaved(calls, repeats)[0]
      for (recipe, cache), sec in seconds.items():
        wbytes, diff = served[recipe, cache]
        kv = cache_bytes(init_cache(cfg, b, args.prompt + steps, cache))
        rows.append(
          {
            "config": cname,
            "recipe": recipe,
            "cache": cache,
            "batch": b,
            "tokens_per_s": b * steps / sec,
            "seconds": sec,
            "weight_bytes": wbytes,
            "cache_bytes": kv,
            "max_logit_diff": diff,
            "max_abs_logit": scale,
          }
        )
        print(f"{cname} {recipe:7s} kv={cache:7s} b={b}: {b * steps / sec:9.1f} tok/s", flush=True)
  base = {
    (r["config"], r["batch"]): r["tokens_per_s"]
    for r in rows
    if r["recipe"] == "fp32" and r["cache"] == "float32"
  }
  for r in rows:
    r["ratio_vs_fp32"] = r["tokens_per_s"] / base[(r["config"], r["batch"])]
  header = (
    f"{platform.processor() or platform.machine()}, {jax.devices()[0].platform}, "
    f"jax {jax.__version__}; prompt {args.prompt} bytes, {steps} new tokens, median of "
    f"{repeats}; cache bytes for {args.prompt + steps} positions"
  )
  lines = [header, ""]
  for cname, cfg in configs.items():
    scale = next(r["max_abs_logit"] for r in rows if r["config"] == cname)
    lines += [
      f"**{cname}** ({cfg.dim} dim, {cfg.layers} layers, {cfg.heads} heads, "
      f"MLP {cfg.mlp}; largest FP32 |logit| on the check sequence {scale:.2f})",
      "",
      "| weights | KV cache | batch | tokens/s | vs FP32 | weight KiB | cache KiB | "
      "max abs logit diff |",
      "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
      if r["config"] == cname:
        lines.append(
          f"| {r['recipe']} | {r['cache']} | {r['batch']} | {r['tokens_per_s']:.1f} | "
          f"{r['ratio_vs_fp32']:.2f}x | {r['weight_bytes'] / 1024:.0f} | "
          f"{r['cache_bytes'] / 1024:.1f} | {r['max_logit_diff']:.4f} |"
        )
    lines.append("")
  text = "\n".join(lines).rstrip() + "\n"
  print(text)
  if not args.quick:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_decode.md").write_text(text)
    (RESULTS / "bench_decode.json").write_text(
      json.dumps({"header": header, "rows": rows}, indent=1)
    )


if __name__ == "__main__":
  main()
