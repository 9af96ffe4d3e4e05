"""The raw XLA operations under jaxquant's lowerings, for one K×N layer, in one run.

Plain `jnp`/`lax` calls, jitted, codes in the ``[in, out]`` layout: f32 ``x @ w``; the
``i8 × i8 -> i32`` `dot_general`; the same with M padded to 2 rows; and f32 with int8 weights
dequantized in the graph. Median milliseconds over interleaved rounds (so every variant sees
the same machine load) and the ratio to f32. This is the baseline that
`experiments/bench_ops.py` improves on with the library's own lowerings.

    python experiments/bench_raw_ops.py [--rounds 15] [--k 4096] [--n 4096]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import lax

from jaxquant.apps.bench import time_interleaved

RESULTS = Path(__file__).parent / "results"
DENSE = (((1,), (0,)), ((), ()))


def variants(m: int, k: int, n: int) -> dict:
  """name -> (jitted fn, args) for one activation row count `m`."""
  kx, kw = jax.random.split(jax.random.key(0))
  x, w = jax.random.normal(kx, (m, k)), jax.random.normal(kw, (k, n))
  scale = jnp.max(jnp.abs(w), axis=0, keepdims=True) / 127
  w8 = jnp.round(w / scale).astype(jnp.int8)
  x8 = jnp.clip(jnp.round(x * 30), -127, 127).astype(jnp.int8)
  i8 = lambda a, b: lax.dot_general(a, b, DENSE, preferred_element_type=jnp.int32)
  out = {
    "f32 x @ w": (jax.jit(lambda a, b: a @ b), (x, w)),
    "i8 x i8 -> i32": (jax.jit(i8), (x8, w8)),
    "f32, int8 weights dequantized in graph": (
      jax.jit(lambda a, b, s: a @ (b.astype(jnp.float32) * s)),
      (x, w8, scale),
    ),
  }
  if m == 1:
    pad = jax.jit(lambda a, b: i8(jnp.pad(a, ((0, 1), (0, 0))), b)[:1])
    out["i8 x i8 -> i32, M padded to 2"] = (pad, (x8, w8))
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rounds", type=int, default=15)
  parser.add_argument("--k", type=int, default=4096)
  parser.add_argument("--n", type=int, default=4096)
  parser.add_argument("--rows", default="1,16,256")
  parser.add_argument("--quick", action="store_true", help="small layer, few rounds")
  args = parser.parse_args()
  k, n, rounds = (256, 256, 3) if args.quick else (args.k, args.n, args.rounds)
  rows = [int(r) for r in args.rows.split(",")]
  lines = [
    f"{k}×{n} layer; jax {jax.__version__} on {jax.default_backend()} "
    f"({os.cpu_count()} cores); median ms of {rounds} interleaved rounds (× = f32 / it)",
    "",
    "| M | operation | median ms | × vs f32 |",
    "|---|---|---|---|",
  ]
  result = {}
  for m in rows:
    calls = {
      name: (lambda fn=fn, args=args: fn(*args)) for name, (fn, args) in variants(m, k, n).items()
    }
    med = {name: 1e3 * s for name, s in time_interleaved(calls, rounds)[0].items()}
    result[m] = med
    for name, ms in med.items():
      lines.append(f"| {m} | {name} | {ms:.2f} | {med['f32 x @ w'] / ms:.2f} |")
  print("\n".join(lines))
  if not args.quick:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_raw_ops.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "bench_raw_ops.json").write_text(
      json.dumps({"k": k, "n": n, "rounds": rounds, "median_ms": result}, indent=1)
    )


if __name__ == "__main__":
  main()
