"""Cost of one QAT train step: plain FP32 vs jaxquant INT8/INT4 QAT vs Qwix's INT8 QAT.

A 4-layer MLP of width 1024 (`nn.Dense` + GELU), batch 256, Adam, mean-squared-error loss; every
variant is jitted and timed in interleaved rounds on the same inputs, so the ratios compare
like with like on a noisy machine. jaxquant's W8A8 QAT forward runs the serve lowering
(``i8 x i8 -> i32``, see `jaxquant.ops.fake_int8`); INT4 weight-only QAT fake-quantizes in float.
Qwix (optional: ``pip install qwix==0.1.8``) is skipped when it is not installed.

    python experiments/bench_qat_step.py [--rounds 15] [--width 1024] [--batch 256]
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import jaxquant as jq
from jaxquant import training
from jaxquant.apps.bench import time_interleaved

RESULTS = Path(__file__).parent / "results"


class MLP(nn.Module):
  width: int = 1024
  depth: int = 4

  @nn.compact
  def __call__(self, x):
    for i in range(self.depth):
      x = nn.Dense(self.width, name=f"dense_{i}")(x)
      if i < self.depth - 1:
        x = jax.nn.gelu(x)
    return x


def mse(apply, params, batch):
  x, y = batch
  return jnp.mean(jnp.square(apply({"params": params}, x).astype(jnp.float32) - y))


def plain_step(model, opt) -> Callable:
  def step(state, batch):
    params, opt_state = state
    loss, grads = jax.value_and_grad(lambda p: mse(model.apply, p, batch))(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  return jax.jit(step)


def jaxquant_step(model, rules, opt, policy: str) -> Callable:
  return training.make_train_step(model, rules, opt, mse, training.Policy.parse(policy))


def qwix_step(model, opt) -> Callable | None:
  try:
    import qwix
  except ImportError:
    return None
  rule = qwix.QtRule(module_path=".*", weight_qtype=jnp.int8, act_qtype=jnp.int8)
  qmodel = qwix.quantize_model(model, qwix.QtProvider([rule]))
  return plain_step(qmodel, opt)


def time_steps(steps: dict[str, tuple[Callable, object]], batch, rounds: int):
  """Median wall and CPU seconds per step (`jaxquant.apps.bench.time_interleaved`), each variant
  carrying its own state from step to step."""
  states = {name: state for name, (_, state) in steps.items()}

  def call(name, fn):
    states[name], loss = fn(states[name], batch)
    return states[name], loss

  calls = {name: (lambda name=name, fn=fn: call(name, fn)) for name, (fn, _) in steps.items()}
  return time_interleaved(calls, rounds, warmup=2)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rounds", type=int, default=15)
  parser.add_argument("--width", type=int, default=1024)
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--quick", action="store_true", help="small and short, for CI")
  args = parser.parse_args()
  width, batch_rows, rounds = (128, 32, 3) if args.quick else (args.width, args.batch, args.rounds)
  model = MLP(width)
  kx, ky, kp = jax.random.split(jax.random.key(0), 3)
  batch = (jax.random.normal(kx, (batch_rows, width)), jax.random.normal(ky, (batch_rows, width)))
  params = model.init(kp, batch[0])["params"]
  opt = optax.adam(1e-3)
  w8a8 = [jq.Rule(".*", weight="int8", act="int8:token")]
  w4 = [jq.Rule(".*", weight="int4:g128")]
  fp32, bf16 = "params=float32,compute=float32", "params=float32,compute=bfloat16,output=float32"
  steps: dict[str, tuple[Callable, object]] = {
    "fp32 (plain jax + optax)": (plain_step(model, opt), (params, opt.init(params))),
    "jaxquant int8 QAT (w8a8)": (jaxquant_step(model, w8a8, opt, fp32), None),
    "jaxquant int8 QAT, bf16 compute": (jaxquant_step(model, w8a8, opt, bf16), None),
    "jaxquant int4 QAT (w4 g128)": (jaxquant_step(model, w4, opt, fp32), None),
  }
  steps = {
    k: (fn, s if s is not None else training.TrainState.create(params, opt))
    for k, (fn, s) in steps.items()
  }
  qwix = qwix_step(model, opt)
  if qwix is not None:
    steps["qwix 0.1.8 int8 QAT (w8a8)"] = (qwix, (params, opt.init(params)))
  wall, cpu = time_steps(steps, batch, rounds)
  base, base_cpu = wall["fp32 (plain jax + optax)"], cpu["fp32 (plain jax + optax)"]
  lines = [
    f"{model.depth}-layer MLP, width {width}, batch {batch_rows}, adam; "
    f"median of {rounds} interleaved rounds on {jax.devices()[0].device_kind} "
    f"({jax.device_count()} device, {os.cpu_count()} cores)",
    "",
    "| step | wall ms | × fp32 | CPU ms | × fp32 (CPU) |",
    "|---|---|---|---|---|",
  ]
  for name in wall:
    lines.append(
      f"| {name} | {1e3 * wall[name]:.1f} | {wall[name] / base:.2f} | "
      f"{1e3 * cpu[name]:.1f} | {cpu[name] / base_cpu:.2f} |"
    )
  print("\n".join(lines))
  if not args.quick:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_qat_step.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "bench_qat_step.json").write_text(
      json.dumps(
        {
          "median_wall_s": wall,
          "median_cpu_s": cpu,
          "width": width,
          "batch": batch_rows,
          "rounds": rounds,
        },
        indent=1,
      )
    )


if __name__ == "__main__":
  main()
