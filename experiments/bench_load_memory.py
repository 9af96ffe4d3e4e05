"""Peak host memory of `jaxquant.load` beside the checkpoint's size.

Writes a synthetic quantized checkpoint (int8 and packed int4 kernels with float scales, float
biases and one float32 embedding, shaped like a small LLM), then loads it in a fresh process,
with and without checksum verification, and reports how much the peak RSS grew.

    python experiments/bench_load_memory.py [--gib 1.0]

Writes experiments/results/bench_load_memory.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import jax
import numpy as np

import jaxquant as jq
from jaxquant import io
from jaxquant.apps.bench import cpu_description

RESULTS = Path(__file__).parent / "results"
PROBE = """
import resource, sys, time, jax.numpy as jnp, jaxquant as jq
jnp.ones(3).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
tree = jq.load(sys.argv[1], verify=sys.argv[2] == "1")
seconds = time.perf_counter() - start
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024, seconds)
"""


def _bytes(q) -> int:
  return sum(c.nbytes for c in jax.tree.leaves(q))


def synthetic_tree(gib: float, hidden: int = 2048, seed: int = 0) -> dict:
  """Layers of int8 and int4:g64 kernels ``[hidden, 4·hidden]`` until about `gib` GiB on disk."""
  rng = np.random.default_rng(seed)
  w = rng.standard_normal((hidden, 4 * hidden), np.float32)
  q8, q4 = jq.quantize(w, "int8"), jq.quantize(w, "int4:g64")
  tree: dict = {"embed": rng.standard_normal((8 * hidden, hidden), np.float32)}
  size, i = tree["embed"].nbytes, 0
  while size < gib * 2**30:
    tree[f"layer_{i}"] = {"mlp": q8, "proj": q4, "bias": w[0]}
    size += _bytes(q8) + _bytes(q4) + w[0].nbytes
    i += 1
  return tree


def measure(path: Path, verify: bool) -> tuple[int, float]:
  out = subprocess.run(
    [sys.executable, "-c", textwrap.dedent(PROBE), str(path), "1" if verify else "0"],
    capture_output=True,
    text=True,
    check=True,
  ).stdout.split()
  return int(out[-2]), float(out[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--gib", type=float, default=1.0)
  parser.add_argument("--out", default=str(RESULTS))
  args = parser.parse_args()
  with tempfile.TemporaryDirectory(dir=args.out) as folder:
    path = io.save(Path(folder) / "synthetic.safetensors", synthetic_tree(args.gib))
    size = os.path.getsize(path)
    rows = []
    for verify in (True, False):
      grown, seconds = measure(path, verify)
      rows.append(
        {
          "verify": verify,
          "file_bytes": size,
          "rss_growth_bytes": grown,
          "ratio": grown / size,
          "seconds": seconds,
        }
      )
  cpu = cpu_description()
  lines = [
    f"# jaxquant.load peak memory ({time.strftime('%Y-%m-%d')})",
    "",
    f"CPU: {cpu['model']}, {cpu['cores']} cores. Peak RSS growth of a fresh process during "
    "`jq.load`, beside the file's size.",
    "",
    "| verify | file MiB | peak RSS growth MiB | × file | load s |",
    "|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
      f"| {r['verify']} | {r['file_bytes'] / 2**20:.0f} | "
      f"{r['rss_growth_bytes'] / 2**20:.0f} | {r['ratio']:.2f} | {r['seconds']:.2f} |"
    )
  table = "\n".join(lines) + "\n"
  print(table)
  out = Path(args.out)
  io.atomic_write(out / "bench_load_memory.md", lambda tmp: Path(tmp).write_text(table))
  blob = json.dumps({"cpu": cpu, "rows": rows}, indent=1)
  io.atomic_write(out / "bench_load_memory.json", lambda tmp: Path(tmp).write_text(blob))


if __name__ == "__main__":
  main()
