"""Streamed quantization of a float32 checkpoint larger than memory should need: peak RSS.

Writes a synthetic float32 safetensors checkpoint (``--layers`` kernels of ``--rows`` ×
``--cols``, 32 × 4096 × 16384 = 8 GiB by default) tensor by tensor, then runs
``jaxquant quantize --recipe int8`` and ``--recipe int4:g128`` on it (the streamed path) in a
fresh child process each, and ``jaxquant.load`` on the int8 result, and reports each child's
peak RSS (``VmHWM``) beside the file sizes.

    python experiments/bench_stream_quantize.py [--folder /tmp/jq-stream] [--layers 32]

Writes experiments/results/bench_stream_quantize.{md,json}; the checkpoints are deleted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

from jaxquant import io
from jaxquant.apps.bench import cpu_description

RESULTS = Path(__file__).parent / "results"
#: A child that runs the command line, then reports its own peak RSS.
QUANTIZE = """
import sys, time
from jaxquant.apps.cli import main
start = time.perf_counter()
rc = main(sys.argv[1:])
seconds = time.perf_counter() - start
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]
print("RESULT", rc, int(hwm) * 1024, seconds)
"""
LOAD = """
import resource, sys, time
import jax.numpy as jnp, jaxquant as jq
jnp.ones(3).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
start = time.perf_counter()
tree = jq.load(sys.argv[1])
seconds = time.perf_counter() - start
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]
print("RESULT", 0, int(hwm) * 1024, seconds, before)
"""


def write_float_checkpoint(path: Path, layers: int, rows: int, cols: int, seed: int = 0) -> int:
  """A plain safetensors file of `layers` float32 kernels ``[rows, cols]`` (``layers.N.kernel``)
  and biases ``[cols]``, written one tensor at a time (memory: one tensor); returns its size."""
  shapes = {}
  for i in range(layers):
    shapes[f"layers.{i}.kernel"] = (rows, cols)
    shapes[f"layers.{i}.bias"] = (cols,)
  table: dict = {"__metadata__": {"made_by": "bench_stream_quantize"}}
  offset = 0
  for name, shape in shapes.items():
    n = int(np.prod(shape)) * 4
    table[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
    offset += n
  head = json.dumps(table, separators=(",", ":")).encode()
  head += b" " * (-len(head) % 8)
  rng = np.random.default_rng(seed)

  def write(tmp: str) -> None:
    with open(tmp, "wb") as f:
      f.write(len(head).to_bytes(8, "little") + head)
      for shape in shapes.values():
        w = rng.standard_normal(shape, np.float32)
        w *= 0.02
        f.write(w.data)

  io.atomic_write(path, write)
  return path.stat().st_size


def child(code: str, *argv: str) -> tuple[int, float, list[str]]:
  """``(peak RSS bytes, seconds, extra fields)`` of a fresh process running `code`."""
  run = subprocess.run(
    [sys.executable, "-c", textwrap.dedent(code), *argv],
    capture_output=True,
    text=True,
  )
  line = next((l for l in run.stdout.splitlines() if l.startswith("RESULT")), None)
  if run.returncode != 0 or line is None or line.split()[1] != "0":
    raise RuntimeError(
      f"child failed ({run.returncode}):\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}"
    )
  fields = line.split()
  return int(fields[2]), float(fields[3]), fields[4:]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--folder", default="/tmp/jq-stream-bench")
  parser.add_argument("--layers", type=int, default=32)
  parser.add_argument("--rows", type=int, default=4096)
  parser.add_argument("--cols", type=int, default=16384)
  parser.add_argument("--out", default=str(RESULTS))
  args = parser.parse_args()
  folder = Path(args.folder)
  folder.mkdir(parents=True, exist_ok=True)
  src = folder / "float32.safetensors"
  rows = []
  try:
    start = time.perf_counter()
    size = write_float_checkpoint(src, args.layers, args.rows, args.cols)
    print(f"wrote {src}: {size / 2**30:.2f} GiB in {time.perf_counter() - start:.0f} s", flush=True)
    for recipe in ("int8", "int4:g128"):
      out = folder / recipe.replace(":", "-")
      argv = ["quantize", "--model", str(src), "--recipe", recipe, "--out", str(out)]
      peak, seconds, _ = child(QUANTIZE, *argv, "--overwrite")
      out_size = (out / io.DEFAULT_FILENAME).stat().st_size
      rows.append(
        {
          "step": f"quantize {recipe} (streamed)",
          "input_bytes": size,
          "output_bytes": out_size,
          "peak_rss_bytes": peak,
          "seconds": seconds,
        }
      )
      print(rows[-1], flush=True)
    loaded = folder / "int8" / io.DEFAULT_FILENAME
    peak, seconds, extra = child(LOAD, str(loaded))
    rows.append(
      {
        "step": "jq.load int8 output",
        "input_bytes": loaded.stat().st_size,
        "output_bytes": None,
        "peak_rss_bytes": peak,
        "base_rss_bytes": int(extra[0]),
        "seconds": seconds,
      }
    )
    print(rows[-1], flush=True)
  finally:
    shutil.rmtree(folder, ignore_errors=True)
  cpu = cpu_description()
  gib = 2**30
  lines = [
    f"# Streamed quantization peak memory ({time.strftime('%Y-%m-%d')})",
    "",
    f"CPU: {cpu['model']}, {cpu['cores']} cores (shared). A synthetic float32 checkpoint of "
    f"{args.layers} kernels {args.rows}×{args.cols} (and biases); each step in a fresh process, "
    "peak RSS its VmHWM (the whole process: Python, jax and its runtime included).",
    "",
    "| step | input GiB | output GiB | peak RSS GiB | peak / input | wall s |",
    "|---|---|---|---|---|---|",
  ]
  for r in rows:
    out_gib = "" if r["output_bytes"] is None else f"{r['output_bytes'] / gib:.2f}"
    lines.append(
      f"| {r['step']} | {r['input_bytes'] / gib:.2f} | {out_gib} | "
      f"{r['peak_rss_bytes'] / gib:.2f} | {r['peak_rss_bytes'] / r['input_bytes']:.2f} | "
      f"{r['seconds']:.0f} |"
    )
  load = rows[-1]
  lines += [
    "",
    f"`jq.load`: RSS before loading {load['base_rss_bytes'] / gib:.2f} GiB (Python + jax), growth "
    f"{(load['peak_rss_bytes'] - load['base_rss_bytes']) / load['input_bytes']:.2f}× the file.",
  ]
  table = "\n".join(lines) + "\n"
  print(table)
  out = Path(args.out)
  io.atomic_write(out / "bench_stream_quantize.md", lambda tmp: Path(tmp).write_text(table))
  blob = json.dumps({"cpu": cpu, "args": vars(args), "rows": rows}, indent=1)
  io.atomic_write(out / "bench_stream_quantize.json", lambda tmp: Path(tmp).write_text(blob))


if __name__ == "__main__":
  main()
