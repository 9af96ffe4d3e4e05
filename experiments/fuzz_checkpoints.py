"""Corruption campaign on a saved checkpoint: random single-bit flips (anywhere, or in the
header), 8 bytes of garbage, 16 zero bytes, truncations. Counts clear errors (`ValueError`),
loads identical to the original, silent changes and raw exceptions; the last two must be 0.

    python experiments/fuzz_checkpoints.py [--seed 0] [--cases 2000]
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxquant as jq
from jaxquant.transforms import named_leaves

KINDS = ("bit", "bit-header", "garbage", "zero-run", "truncate")


def same(a, b) -> bool:
  la, lb = named_leaves(a), named_leaves(b)
  if [p for p, _ in la] != [p for p, _ in lb]:
    return False
  for (_, x), (_, y) in zip(la, lb):
    for cx, cy in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
      if cx.dtype != cy.dtype or np.asarray(cx).tobytes() != np.asarray(cy).tobytes():
        return False
  return True


def corrupt(raw: bytes, kind: str, rng: random.Random) -> bytes:
  buf = bytearray(raw)
  n_head = 8 + int.from_bytes(raw[:8], "little")
  j = rng.randrange(n_head if kind == "bit-header" else len(buf))
  if kind in ("bit", "bit-header"):
    buf[j] ^= 1 << rng.randrange(8)
  elif kind == "garbage":
    buf[j : j + 8] = bytes(rng.randrange(256) for _ in range(8))
  elif kind == "zero-run":
    buf[j : j + 16] = bytes(16)
  else:
    buf = buf[:j]
  return bytes(buf)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--cases", type=int, default=2000)
  args = parser.parse_args()
  x = jax.random.normal(jax.random.key(0), (64, 96))
  tree = {
    "a": [{"k": jq.quantize(x, "int4:g32:asym:scale=f16"), "b": jnp.ones(96, jnp.bfloat16)}],
    "n": jq.quantize(x, "nf4:g16"),
    "e": jq.quantize(x, "fp8_e4m3"),
    "s": jnp.array(3),
  }
  folder = Path(tempfile.mkdtemp())
  raw = jq.save(folder / "m.safetensors", tree).read_bytes()
  ref = jq.load(folder / "m.safetensors")
  rng = random.Random(args.seed)
  counts = dict.fromkeys(("clear error", "identical", "silent change", "raw exception"), 0)
  for _ in range(args.cases):
    kind = rng.choice(KINDS)
    data = corrupt(raw, kind, rng)
    path = folder / "c.safetensors"
    path.write_bytes(data)
    try:
      got = jq.load(path)
    except ValueError:
      counts["clear error"] += 1
      continue
    except Exception as e:  # a raw exception is a finding
      counts["raw exception"] += 1
      print(f"{kind}: {type(e).__name__}: {e}")
      continue
    key = "identical" if data == raw or same(got, ref) else "silent change"
    counts[key] += 1
  print(counts)


if __name__ == "__main__":
  main()
