"""QAT vs PTQ on a byte-level decoder trained on the standard library's own source.

Every run gets the same budget of `--steps` optimizer steps on the same batches. FP32 and
BF16-mixed train from scratch. The QAT runs follow the usual recipe: the FP32 run's checkpoint
at step ``steps - qat_steps`` is fine-tuned for the last `--qat-steps` steps with fake
quantization — INT8 QAT (W8A8 per token, on the int8 path) and INT4 QAT (weights int4 g64;
fixed ranges, and LSQ learned step sizes) — so each has seen exactly as many batches as the
FP32 model. These are compared with INT8/INT4 round-to-nearest and INT4 GPTQ post-training
quantization of the final FP32 model. Held-out text is a fixed one-file-in-ten split of the
stdlib (`jaxquant.apps.data.stdlib_source`). Prints one table, writes it (Markdown + JSON) and a
loss-curve plot under experiments/results/.

    python experiments/qat_decoder.py [--steps 600] [--qat-steps 150] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxquant as jq
from jaxquant import flax as jqf
from jaxquant import training
from jaxquant.apps import data
from jaxquant.apps.models.decoder import Decoder, DecoderConfig, next_byte_loss
from jaxquant.ptq import CalibrationSet
from jaxquant.recipes import Recipe, apply_recipe
from jaxquant.transforms import tree_nbytes

RESULTS = Path(__file__).parent / "results"
EMBED = jq.Rule("embed", None, expect_match=False)
W8A8 = [EMBED, jq.Rule(".*", weight="int8", act="int8:token")]
W4 = [EMBED, jq.Rule(".*", weight="int4:g64")]


def loss_fn(apply, params, tokens):
  return next_byte_loss(apply({"params": params}, tokens), tokens)


def evaluate(apply, variables, heldout: np.ndarray) -> float:
  fn = jax.jit(lambda v, t: next_byte_loss(apply(v, t), t))
  return float(
    np.mean([float(fn(variables, heldout[i : i + 16])) for i in range(0, len(heldout), 16)])
  )


def train(
  name,
  rules,
  policy,
  cfg,
  steps,
  batch,
  length,
  lr,
  *,
  lsq=False,
  seed=0,
  params=None,
  first_step=0,
  snapshot_at=None,
):
  """Trains `steps` steps from `params` (or a fresh init) with AdamW and warmup + cosine decay.

  The batch of global step ``first_step + i`` is drawn from a generator seeded by that step, so
  a fine-tuning run sees the batches the FP32 run saw at the same steps. Returns the final
  params, the loss curve, the median step time (s) and the params after `snapshot_at` steps.
  """
  model = Decoder(cfg)
  corpus = data.stdlib_source("train")
  if params is None:
    params = model.init(jax.random.key(seed), jnp.zeros((1, length), jnp.int32))["params"]
  if lsq:
    params = training.add_learned_quantizers(params, rules)
  warmup = max(steps // (20 if first_step == 0 else 10), 1)
  opt = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps), weight_decay=0.01)
  step = training.make_train_step(model, rules, opt, loss_fn, training.Policy.parse(policy))
  state = training.TrainState.create(params, opt)
  curve, times, snapshot = [], [], None
  for i in range(steps):
    if i == snapshot_at:
      snapshot = state.params
    rng = np.random.default_rng((seed, first_step + i))
    tokens = jnp.asarray(data.byte_windows(corpus, batch, length, rng))
    start = time.perf_counter()
    state, metrics = step(state, tokens)
    loss = float(metrics["loss"])
    times.append(time.perf_counter() - start)
    curve.append(loss)
    if i % max(steps // 10, 1) == 0:
      print(f"  {name} step {first_step + i}: loss {loss:.3f}", flush=True)
  return state.params, curve, float(np.median(times[len(times) // 5 :])), snapshot


def bits(loss_nats: float) -> float:
  return loss_nats / math.log(2)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=600, help="optimizer steps of every run")
  parser.add_argument(
    "--qat-steps",
    type=int,
    default=150,
    help="the last steps, fine-tuned with fake quantization in the QAT runs",
  )
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--length", type=int, default=128)
  parser.add_argument("--lr", type=float, default=3e-3)
  parser.add_argument("--quick", action="store_true", help="a few steps, for CI")
  parser.add_argument(
    "--render",
    action="store_true",
    help="rewrite the table and plot from the saved JSON, training nothing",
  )
  args = parser.parse_args()
  if args.render:
    result = json.loads((RESULTS / "qat_decoder.json").read_text())
    result["recovered"] = recovered_shares(result["rows"])
    (RESULTS / "qat_decoder.md").write_text(render(result) + "\n")
    plot(result, RESULTS / "qat_decoder.png")
    print(render(result))
    return
  steps, qat_steps = (20, 8) if args.quick else (args.steps, args.qat_steps)
  if not 0 < qat_steps < steps:
    parser.error("--qat-steps must lie strictly between 0 and --steps")
  cfg = DecoderConfig(dim=64, layers=2, heads=4, mlp=256) if args.quick else DecoderConfig()
  heldout_rng = np.random.default_rng(1234)
  heldout = jnp.asarray(
    data.byte_windows(
      data.stdlib_source("heldout", 1 << 20), 64 if args.quick else 256, args.length, heldout_rng
    )
  )
  common = dict(cfg=cfg, batch=args.batch, length=args.length, lr=args.lr)
  fp32_policy = "params=float32,compute=float32"
  rows, curves = [], {}

  def report(name, loss, nbytes, step_s):
    rows.append(
      {
        "run": name,
        "heldout_loss": loss,
        "bits_per_byte": bits(loss),
        "perplexity": math.exp(loss),
        "weight_bytes": nbytes,
        "step_ms": 1e3 * step_s,
      }
    )

  # from scratch: FP32 (keeping its checkpoint where QAT fine-tuning starts) and BF16-mixed
  fp32, curves["fp32"], fp32_step, start = train(
    "fp32", [], fp32_policy, steps=steps, snapshot_at=steps - qat_steps, **common
  )
  report(
    "fp32", evaluate(Decoder(cfg).apply, {"params": fp32}, heldout), tree_nbytes(fp32), fp32_step
  )
  bf16, curves["bf16-mixed"], bf16_step, _ = train(
    "bf16-mixed", [], "params=float32,compute=bfloat16,output=float32", steps=steps, **common
  )
  report(
    "bf16-mixed",
    evaluate(Decoder(cfg).apply, {"params": bf16}, heldout),
    tree_nbytes(bf16),
    bf16_step,
  )

  # QAT: fine-tune the FP32 checkpoint for the last qat_steps steps
  lr_at_start = float(
    optax.warmup_cosine_decay_schedule(0.0, args.lr, max(steps // 20, 1), steps)(steps - qat_steps)
  )
  qat_runs = {
    "fp32 fine-tune control": ([], False),
    "int8-qat (w8a8)": (W8A8, False),
    "int4-qat fixed": (W4, False),
    "int4-qat lsq": (W4, True),
  }
  for name, (rules, lsq) in qat_runs.items():
    params, curve, step_s, _ = train(
      name,
      rules,
      fp32_policy,
      steps=qat_steps,
      params=start,
      lsq=lsq,
      first_step=steps - qat_steps,
      **{**common, "lr": lr_at_start},
    )
    curves[name] = curves["fp32"][: steps - qat_steps] + curve
    if not rules:  # the same fine-tuning without quantization: what the restart alone does
      report(
        name, evaluate(Decoder(cfg).apply, {"params": params}, heldout), tree_nbytes(params), step_s
      )
      continue
    qparams, stats = (
      training.convert(params, rules) if lsq else (jq.quantize_params(params, rules), None)
    )
    serve = jqf.quantize_model(Decoder(cfg), rules, "serve", calibration=stats)
    report(name, evaluate(serve.apply, {"params": qparams}, heldout), tree_nbytes(qparams), step_s)

  # post-training quantization of the final FP32 model
  corpus = data.stdlib_source("train")
  calib = [
    (jnp.asarray(data.byte_windows(corpus, 16, args.length, np.random.default_rng(7 + i))),)
    for i in range(4)
  ]
  for name, rules, method in [
    ("int8 ptq rtn (w8a8)", W8A8, "rtn"),
    ("int4 ptq rtn", W4, "rtn"),
    ("int4 ptq gptq", W4, "gptq"),
  ]:
    recipe = Recipe(name, tuple(rules), steps=((method, {}),))
    result = apply_recipe(recipe, fp32, CalibrationSet(Decoder(cfg), calib))
    serve = jqf.quantize_model(Decoder(cfg), rules, "serve")
    report(
      name,
      evaluate(serve.apply, {"params": result.qparams}, heldout),
      tree_nbytes(result.qparams),
      float("nan"),
    )

  header = (
    f"{steps} steps for every run (QAT: FP32 for {steps - qat_steps}, then {qat_steps} "
    f"with fake quantization), batch {args.batch} x {args.length} bytes, model {cfg}; "
    f"{jax.devices()[0].device_kind}, {os.cpu_count()} cores"
  )
  result = {
    "header": header,
    "rows": rows,
    "curves": curves,
    "steps": steps,
    "qat_steps": qat_steps,
    "recovered": recovered_shares(rows),
  }
  print(render(result))
  if not args.quick:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "qat_decoder.md").write_text(render(result) + "\n")
    (RESULTS / "qat_decoder.json").write_text(json.dumps(result, indent=1))
    plot(result, RESULTS / "qat_decoder.png")


def recovered_shares(rows: list[dict]) -> dict[str, dict[str, float]]:
  """Share of the INT4 RTN loss gap each INT4 run closes: ``(L_rtn − L) / (L_rtn − L_ref)``,
  against FP32 and against the fine-tune control (which isolates what restarting the
  optimizer alone does)."""
  by = {r["run"]: r["heldout_loss"] for r in rows}
  out = {}
  for ref in ("fp32", "fp32 fine-tune control"):
    gap = by["int4 ptq rtn"] - by[ref]
    out[ref] = {
      k: (by["int4 ptq rtn"] - by[k]) / gap if gap > 0 else float("nan")
      for k in ("int4-qat fixed", "int4-qat lsq", "int4 ptq gptq")
    }
  return out


def render(result: dict) -> str:
  """The Markdown table and summary lines of one run of this experiment."""
  rows = result["rows"]
  by = {r["run"]: r["heldout_loss"] for r in rows}
  lines = [
    result["header"],
    "",
    "| run | held-out loss (nats) | bits/byte | perplexity | weight KiB | step ms |",
    "|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
      f"| {r['run']} | {r['heldout_loss']:.4f} | {r['bits_per_byte']:.4f} | "
      f"{r['perplexity']:.3f} | {r['weight_bytes'] / 1024:.1f} | {r['step_ms']:.1f} |"
    )
  lines.append("")
  for ref, shares in result["recovered"].items():
    lines.append(
      f"Share of the INT4 RTN loss gap recovered (reference: {ref}): "
      + ", ".join(f"{k} {v:.0%}" for k, v in shares.items())
    )
  lines += [
    "Held-out loss relative to FP32: "
    + ", ".join(
      f"{k} {by[k] / by['fp32'] - 1:+.2%}"
      for k in ("bf16-mixed", "fp32 fine-tune control", "int8-qat (w8a8)")
    ),
    "Step ms: median wall time of the jitted train step on a shared, loaded 2-core "
    "machine, not a speed comparison (that is experiments/bench_qat_step.py).",
  ]
  return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
  """Training curves (left) and held-out loss per run (right)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  qat_start = result["steps"] - result["qat_steps"]
  fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
  for name, curve in result["curves"].items():
    c = np.convolve(curve, np.ones(20) / 20, mode="valid")
    ax.plot(np.arange(len(c)) + 20, c, label=name, lw=1)
  ax.axvline(qat_start, color="grey", lw=0.8, ls="--")
  ax.text(qat_start, ax.get_ylim()[1], " QAT fine-tuning starts", va="top", fontsize=8)
  ax.set_xlabel("step")
  ax.set_ylabel("training loss (nats/byte, 20-step mean)")
  ax.set_title("byte-level decoder on the stdlib source")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  rows = result["rows"]
  names = [r["run"] for r in rows]
  losses = [r["heldout_loss"] for r in rows]
  colors = ["tab:blue" if "ptq" not in n else "tab:orange" for n in names]
  bx.barh(names, losses, color=colors)
  bx.set_xlim(min(losses) - 0.01, max(losses) + 0.005)
  bx.invert_yaxis()
  bx.set_xlabel("held-out loss (nats/byte)")
  bx.set_title("blue: trained; orange: PTQ of the FP32 model", fontsize=10)
  bx.grid(alpha=0.3, axis="x")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


if __name__ == "__main__":
  main()
