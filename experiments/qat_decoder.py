"""QAT vs PTQ on a byte-level decoder trained on the standard library's own source.

The same model and step budget trained in FP32, BF16-mixed, INT8 QAT (W8A8 per token) and
INT4 QAT (weights int4 g64; fixed ranges, and LSQ learned step sizes), compared with INT8/INT4
round-to-nearest and INT4 GPTQ post-training quantization of the FP32 model. Held-out text is
a fixed one-file-in-ten split of the stdlib (`jaxquant.data.stdlib_source`). Prints one table,
writes it (Markdown + JSON) and a loss-curve plot under experiments/results/.

    python experiments/qat_decoder.py [--steps 600] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxquant as jq
from jaxquant import data, training
from jaxquant import flax as jqf
from jaxquant.models.decoder import Decoder, DecoderConfig, next_byte_loss
from jaxquant.ptq.recipes import apply_recipe
from jaxquant.rules import Recipe

RESULTS = Path(__file__).parent / "results"
EMBED = jq.Rule("embed", None, expect_match=False)
W8A8 = [EMBED, jq.Rule(".*", weight="int8", act="int8:token")]
W4 = [EMBED, jq.Rule(".*", weight="int4:g64")]


def loss_fn(apply, params, tokens):
  return next_byte_loss(apply({"params": params}, tokens), tokens)


def evaluate(apply, variables, heldout: np.ndarray) -> float:
  fn = jax.jit(lambda v, t: next_byte_loss(apply(v, t), t))
  return float(np.mean([float(fn(variables, heldout[i : i + 16]))
                        for i in range(0, len(heldout), 16)]))  # fmt: skip


def train(name, rules, policy, cfg, steps, batch, length, lr, lsq=False, seed=0):
  model = Decoder(cfg)
  rng = np.random.default_rng(seed)
  corpus = data.stdlib_source("train")
  params = model.init(jax.random.key(seed), jnp.zeros((1, length), jnp.int32))["params"]
  if lsq:
    params = training.add_learned_quantizers(params, rules)
  opt = optax.adamw(optax.warmup_cosine_decay_schedule(0, lr, steps // 20, steps), 0.01)
  step = training.make_train_step(model, rules, opt, loss_fn, training.Policy.parse(policy))
  state = training.TrainState.create(params, opt)
  curve, times = [], []
  for i in range(steps):
    tokens = jnp.asarray(data.byte_windows(corpus, batch, length, rng))
    start = time.perf_counter()
    state, metrics = step(state, tokens)
    loss = float(metrics["loss"])
    times.append(time.perf_counter() - start)
    curve.append(loss)
    if i % max(steps // 10, 1) == 0:
      print(f"  {name} step {i}: loss {loss:.3f}", flush=True)
  return state.params, curve, float(np.median(times[len(times) // 5 :]))


def bits(loss_nats: float) -> float:
  return loss_nats / math.log(2)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--length", type=int, default=128)
  parser.add_argument("--lr", type=float, default=3e-3)
  parser.add_argument("--quick", action="store_true", help="a few steps, for CI")
  args = parser.parse_args()
  steps = 20 if args.quick else args.steps
  cfg = DecoderConfig(dim=64, layers=2, heads=4, mlp=256) if args.quick else DecoderConfig()
  heldout_rng = np.random.default_rng(1234)
  heldout = jnp.asarray(data.byte_windows(data.stdlib_source("heldout", 1 << 20),
                                          64 if args.quick else 256, args.length, heldout_rng))
  runs = {
      "fp32": ([], "params=float32,compute=float32", False),
      "bf16-mixed": ([], "params=float32,compute=bfloat16,output=float32", False),
      "int8-qat (w8a8)": (W8A8, "params=float32,compute=float32", False),
      "int4-qat fixed": (W4, "params=float32,compute=float32", False),
      "int4-qat lsq": (W4, "params=float32,compute=float32", True),
  }
  rows, curves, trained = [], {}, {}
  for name, (rules, policy, lsq) in runs.items():
    params, curve, step_s = train(name, rules, policy, cfg, steps, args.batch, args.length,
                                  args.lr, lsq)  # fmt: skip
    curves[name] = curve
    trained[name] = params
    if lsq or rules:
      qparams, stats = training.convert(params, rules) if lsq else (
          jq.quantize_params(params, rules), None)  # fmt: skip
      serve = jqf.quantize_model(Decoder(cfg), rules, "serve", calibration=stats)
      loss = evaluate(serve.apply, {"params": qparams}, heldout)
      nbytes = sum(leaf.nbytes for _, leaf in jq.transforms.named_leaves(qparams))
    else:
      loss = evaluate(Decoder(cfg).apply, {"params": params}, heldout)
      nbytes = sum(np.asarray(v).nbytes for v in jax.tree.leaves(params))
    rows.append({"run": name, "heldout_loss": loss, "bits_per_byte": bits(loss),
                 "perplexity": math.exp(loss), "weight_bytes": nbytes, "step_ms": 1e3 * step_s})
  # post-training quantization of the FP32 model
  fp32 = trained["fp32"]
  corpus = data.stdlib_source("train")
  calib = [(jnp.asarray(data.byte_windows(corpus, 16, args.length, np.random.default_rng(7 + i))),)
           for i in range(4)]  # fmt: skip
  for name, rules, method in [("int8 ptq rtn (w8a8)", W8A8, "rtn"), ("int4 ptq rtn", W4, "rtn"),
                              ("int4 ptq gptq", W4, "gptq")]:  # fmt: skip
    result = apply_recipe(Recipe(name, tuple(rules), method=method), fp32, Decoder(cfg), calib)
    serve = jqf.quantize_model(Decoder(cfg), rules, "serve")
    loss = evaluate(serve.apply, {"params": result.qparams}, heldout)
    nbytes = sum(leaf.nbytes for _, leaf in jq.transforms.named_leaves(result.qparams))
    rows.append({"run": name, "heldout_loss": loss, "bits_per_byte": bits(loss),
                 "perplexity": math.exp(loss), "weight_bytes": nbytes, "step_ms": float("nan")})
  by = {r["run"]: r["heldout_loss"] for r in rows}
  gap = by["int4 ptq rtn"] - by["fp32"]
  recovered = {k: (by["int4 ptq rtn"] - by[k]) / gap if gap > 0 else float("nan")
               for k in ("int4-qat fixed", "int4-qat lsq")}  # fmt: skip
  lines = [f"steps {steps}, batch {args.batch} x {args.length} bytes, model {cfg}", "",
           "| run | held-out loss (nats) | bits/byte | perplexity | weight KiB | step ms |",
           "|---|---|---|---|---|---|"]  # fmt: skip
  for r in rows:
    lines.append(f"| {r['run']} | {r['heldout_loss']:.4f} | {r['bits_per_byte']:.4f} | "
                 f"{r['perplexity']:.3f} | {r['weight_bytes'] / 1024:.1f} | {r['step_ms']:.1f} |")
  lines += ["", "INT4 QAT share of the INT4 RTN loss gap recovered: " +
            ", ".join(f"{k} {v:.0%}" for k, v in recovered.items()),
            "relative to FP32 held-out loss: " + ", ".join(
                f"{k} {by[k] / by['fp32'] - 1:+.2%}" for k in ("bf16-mixed", "int8-qat (w8a8)"))]
  print("\n".join(lines))
  if not args.quick:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "qat_decoder.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "qat_decoder.json").write_text(json.dumps({"rows": rows, "curves": curves,
                                                          "recovered": recovered}, indent=1))
    plot(curves, RESULTS / "qat_decoder.png")


def plot(curves: dict, path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name, curve in curves.items():
    c = np.convolve(curve, np.ones(20) / 20, mode="valid")
    ax.plot(np.arange(len(c)) + 20, c, label=name)
  ax.set_xlabel("step")
  ax.set_ylabel("training loss (nats/byte, 20-step mean)")
  ax.set_title("byte-level decoder on the stdlib source")
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


if __name__ == "__main__":
  main()
