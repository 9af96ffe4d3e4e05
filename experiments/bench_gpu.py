"""One GPU layer per format: f32 / bf16 against w8a8, w8a16 and w4a16, decode and prefill.

    python experiments/bench_gpu.py --out experiments/results/bench_gpu.json   # on a GPU
    python experiments/bench_gpu.py --dry-run --out /tmp/bench_gpu.json        # CPU, tiny

Shapes ``[K, N]`` 4096×4096 and 4096×14336 at M = 1, 16 (decode) and 2048 (prefill). Each
variant is jitted, run once to warm up, then timed `--repeats` times (median). Achieved GB/s is
the bytes a layer must read (weights with their scales and zero points, plus activations)
over the time, beside the card's peak bandwidth. Variants:

* ``f32``, ``bf16``: ``x @ w`` in that dtype (float32 accumulation for bf16);
* ``w8a8``: jaxquant's serve path (int8 per token × int8 per channel, ``i8 × i8 → i32``);
* ``w8a16``, ``w4a16``: bf16 activations, int8 per channel / int4 g128 weights through the
  Pallas Triton kernel (`jaxquant.ops.pallas_gpu`); ``*-xla``: the same weights dequantized in
  the graph (``lowering="dequant"``); ``w4a16-default``: whatever jaxquant's serve path
  chooses (`explain` recorded);
* with ``--sweep`` (default), a few tile choices for the kernel at decode, best one reported.

``--dry-run`` runs everything on CPU at tiny shapes with the kernels in interpret mode, to
check the script itself. Every variant's output is compared with the float32 dot of the
dequantized weights (``max_rel_err``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.numerics import quantize
from jaxquant.ops import explain, qdot_general
from jaxquant.ops.pallas_common import weights_layout
from jaxquant.ops.pallas_gpu import Tiles, default_tiles, gpu_reason, weight_only_matmul
from jaxquant.qarray import QArray

PEAK_TBS = {"H200": 4.8, "H100 PCIe": 2.0, "H100": 3.35, "A100": 2.0, "L4": 0.3}
DENSE = (((1,), (0,)), ((), ()))
SHAPES = ((4096, 4096), (4096, 14336))
ROWS = (1, 16, 2048)
DRY_SHAPES = ((256, 512),)
DRY_ROWS = (1, 16, 64)
#: The variants that go through jaxquant's serve path: (activation spec, forced lowering).
SERVE_PATHS = {
  "w8a8": ("int8:token", None),
  "w8a16-xla": (None, "dequant"),
  "w4a16-xla": (None, "dequant"),
  "w4a16-default": (None, None),
}


def peak_gbs(kind: str) -> float | None:
  """The card's memory bandwidth in GB/s by its device kind (None when unknown)."""
  return next((tb * 1000 for name, tb in PEAK_TBS.items() if name in kind), None)


def nbytes(a) -> int:
  leaves = jax.tree.leaves(a)
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in leaves)


def timed(fn, args, repeats: int) -> tuple[float, jax.Array]:
  """Median seconds of ``fn(*args)`` after one warm-up call, and its output."""
  out = jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times), out


def variants(w: jax.Array, q8: QArray, q4: QArray, interpret: bool) -> dict:
  """name -> (function, weights, activation dtype)."""
  kernel = lambda x, q: weight_only_matmul(x, q, interpret=interpret)
  serve = lambda spec, lowering=None: (
    lambda x, q: qdot_general(x, q, DENSE, lhs_spec=spec, lowering=lowering)
  )
  return {
    "f32": (lambda x, w: x @ w, w, jnp.float32),
    "bf16": (
      lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype),
      w.astype(jnp.bfloat16),
      jnp.bfloat16,
    ),
    "w8a8": (serve("int8:token"), q8, jnp.bfloat16),
    "w8a16": (kernel, q8, jnp.bfloat16),
    "w4a16": (kernel, q4, jnp.bfloat16),
    "w8a16-xla": (serve(None, "dequant"), q8, jnp.bfloat16),
    "w4a16-xla": (serve(None, "dequant"), q4, jnp.bfloat16),
    "w4a16-default": (serve(None), q4, jnp.bfloat16),
  }


def sweep_tiles(m: int, q: QArray) -> list[Tiles]:
  """A few kernel tilings to try at decode (the default first)."""
  layout = weights_layout(q)
  base = default_tiles(m, layout)
  if base is None:
    return []
  found = [base]
  for bn, warps, stages in ((64, 4, 4), (128, 4, 3)):
    t = Tiles(base.m, bn, base.k, warps, stages)
    if layout.n % bn == 0 and t not in found:
      found.append(t)
  return found


def one_shape(k: int, n: int, rows, repeats: int, sweep: bool, interpret: bool, peak) -> list:
  key = jax.random.PRNGKey(k * 31 + n)
  w = jax.random.normal(key, (k, n), jnp.float32) * 0.02
  q8 = jax.jit(quantize, static_argnums=1)(w, "int8")
  q4 = jax.jit(quantize, static_argnums=1)(w, "int4:g128")
  refs = {id(q8): q8.dequantize(jnp.float32), id(q4): q4.dequantize(jnp.float32)}
  results = []
  for m in rows:
    x = jax.random.normal(jax.random.fold_in(key, m), (m, k), jnp.float32)
    rows_m: list[dict] = []
    for name, (fn, weights, dtype) in variants(w, q8, q4, interpret).items():
      xa = x.astype(dtype)
      row = {"k": k, "n": n, "m": m, "variant": name}
      try:
        if isinstance(weights, QArray) and name.endswith("a16") and not interpret:
          why = gpu_reason(weights, xa.shape)
          if why:
            raise ValueError(why)
        if isinstance(weights, QArray) and name in SERVE_PATHS:
          spec, forced = SERVE_PATHS[name]
          row["lowering"] = str(explain(xa, weights, DENSE, lhs_spec=spec, lowering=forced))
        candidates = [None]
        if sweep and name in ("w8a16", "w4a16") and m <= 16:
          candidates = sweep_tiles(m, weights)  # type: ignore[arg-type]
        best = None
        for tiles in candidates:
          f = (
            fn
            if tiles is None
            else (lambda x, q, t=tiles: weight_only_matmul(x, q, tiles=t, interpret=interpret))
          )
          seconds, out = timed(jax.jit(f), (xa, weights), repeats)
          if best is None or seconds < best[0]:
            best = (seconds, out, tiles)
        assert best is not None
        seconds, out, tiles = best
        if tiles is not None:
          row["tiles"] = [tiles.m, tiles.n, tiles.k, tiles.warps, tiles.stages]
          row["tiles_tried"] = len(candidates)
        ref = x @ (refs[id(weights)] if isinstance(weights, QArray) else w)
        err = jnp.max(jnp.abs(out.astype(jnp.float32) - ref)) / jnp.max(jnp.abs(ref))
        moved = nbytes(weights) + nbytes(xa)
        row.update(
          ms=seconds * 1e3,
          bytes=moved,
          gbs=moved / seconds / 1e9,
          peak_frac=(moved / seconds / 1e9 / peak) if peak else None,
          max_rel_err=float(err),
        )
      except Exception as e:  # one failing variant must not end the run
        row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
      rows_m.append(row)
    base = next((r.get("ms") for r in rows_m if r["variant"] == "bf16"), None)
    for row in rows_m:
      row["x_bf16"] = base / row["ms"] if base and "ms" in row else None
      print(format_row(row), flush=True)
    results += rows_m
  return results


def format_row(r: dict) -> str:
  shape = f"{r['k']}x{r['n']}"
  if "error" in r:
    return f"| {shape} | {r['m']} | {r['variant']} | error: {r['error'][:80]} |"
  peak = f"{100 * r['peak_frac']:.0f}%" if r.get("peak_frac") else "-"
  ratio = f"{r['x_bf16']:.2f}" if r.get("x_bf16") else "-"
  return (
    f"| {shape} | {r['m']} | {r['variant']} | {r['ms']:.4f} | {r['gbs']:.0f} | {peak} | "
    f"{ratio} | {r['max_rel_err']:.1e} |"
  )


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="JSON results path")
  parser.add_argument("--dry-run", action="store_true", help="CPU, interpret mode, tiny shapes")
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument("--no-sweep", action="store_true", help="kernel default tiles only")
  args = parser.parse_args(argv)
  if args.dry_run:
    jax.config.update("jax_platforms", "cpu")
  started = time.perf_counter()
  device = jax.devices()[0]
  kind = device.device_kind
  peak = peak_gbs(kind)
  if not args.dry_run and device.platform != "gpu":
    sys.exit(f"bench_gpu needs a GPU (found {device.platform}: {kind}); use --dry-run on CPU.")
  shapes, rows = (DRY_SHAPES, DRY_ROWS) if args.dry_run else (SHAPES, ROWS)
  repeats = args.repeats or (1 if args.dry_run else 10)
  print(f"device: {kind} (peak {peak or '?'} GB/s), jax {jax.__version__}")
  print("| K x N | M | variant | ms | GB/s | of peak | × bf16 | max rel err |")
  print("|---|---|---|---|---|---|---|---|")
  results = []
  for k, n in shapes:
    sweep = not args.no_sweep
    results += one_shape(k, n, rows, repeats, sweep, args.dry_run, peak)
  report = {
    "device": kind,
    "platform": device.platform,
    "peak_gbs": peak,
    "jax": jax.__version__,
    "dry_run": args.dry_run,
    "repeats": repeats,
    "seconds": time.perf_counter() - started,
    "results": results,
  }
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps(report, indent=1))
  print(f"{report['seconds']:.0f} s; wrote {args.out}")
  return report


if __name__ == "__main__":
  main()
