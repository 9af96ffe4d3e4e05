"""Scaling out on simulated CPU devices: per-device memory of sharded quantization, bytes
all-reduced per layer by distributed calibration, and GPTQ checkpoints on 1, 2, 4, 8 devices
and 2 processes.

    python experiments/distributed_scaling.py   # writes experiments/results/distributed_scaling.*

Simulated devices share this machine's cores, so wall times show overheads, not speed-ups.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json
import subprocess
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxquant as jq
from jaxquant import transforms
from jaxquant.apps import distributed as launcher
from jaxquant.apps.models import llama
from jaxquant.ptq import distributed
from jaxquant.ptq.capture import capture, hessian_observer

RESULTS = Path(__file__).parent / "results"
MiB = 2**20


def cpu_name() -> str:
  out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
  line = next((x for x in out.splitlines() if x.startswith("Model name")), "Model name: ?")
  return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"


def memory(spec: str, n_kernels: int = 8, size: int = 1024) -> dict:
  """Quantize `n_kernels` float32 [size, size] kernels sharded ('data', 'model') on 2×4."""
  mesh = jax.make_mesh((2, 4), ("data", "model"))
  sharding = NamedSharding(mesh, P("data", "model"))
  make = jax.jit(
    lambda k: jax.random.normal(k, (size, size)), out_shardings=sharding
  )  # made on the devices, shard by shard
  tree = {f"layer_{i}": {"kernel": make(jax.random.key(i))} for i in range(n_kernels)}
  rules = [jq.Rule(".*", weight=spec)]
  out = transforms.quantized_shardings(tree, rules)
  compiled = jax.jit(lambda p: jq.quantize_params(p, rules), out_shardings=out)
  stats = compiled.lower(tree).compile().memory_analysis()
  start = time.perf_counter()
  q = transforms.quantize_sharded(tree, rules)
  jax.block_until_ready(q)
  seconds = time.perf_counter() - start
  live: dict[int, int] = {}
  for a in jax.live_arrays():
    for s in a.addressable_shards:
      live[s.device.id] = live.get(s.device.id, 0) + s.data.nbytes
  weights = transforms.tree_nbytes(tree)
  return {
    "spec": spec,
    "weights_MiB": weights / MiB,
    "share_MiB": weights / 8 / MiB,
    "args_per_device_MiB": stats.argument_size_in_bytes / MiB,
    "out_per_device_MiB": stats.output_size_in_bytes / MiB,
    "temp_per_device_MiB": stats.temp_size_in_bytes / MiB,
    "largest_kernel_share_MiB": size * size * 4 / 8 / MiB,
    "live_max_device_MiB": max(live.values()) / MiB,
    "seconds": seconds,
  }


def allreduced() -> dict:
  """Bytes the one reduction of a calibration pass moves per layer of a tiny Llama."""
  cfg = launcher.TINY
  model = llama.Llama(cfg)
  tokens = np.zeros((8, 16), np.int32)
  params = launcher.random_params(model, tokens)
  paths = [p for p, _ in transforms.named_leaves(params) if p.endswith("proj/kernel")]
  rules = [jq.Rule(".*", weight="int4:g32")]
  rng = np.random.default_rng(0)
  batches = [(rng.integers(0, cfg.vocab, (8, 16)).astype(np.int32),) for _ in range(2)]
  ref = capture(model, params, rules, batches, hessian_observer(paths))
  rows = {}
  for n in (2, 4, 8):
    mesh = jax.make_mesh((n, 8 // n), ("data", "model"))
    got = distributed.sharded_capture(model, params, rules, batches, hessian_observer(paths), mesh)
    parts = jax.tree.map(lambda a: np.stack([np.asarray(a)] * n), ref)
    parts = jax.device_put(parts, NamedSharding(mesh, P("data")))
    hlo = jax.jit(lambda a, m=mesh: distributed.reduce_stats(a, m)).lower(parts).compile()
    dh = max(
      float(np.abs(distributed.local_value(got[p]["h"]) - np.asarray(ref[p]["h"])).max())
      / float(np.abs(np.asarray(ref[p]["h"])).max())
      for p in paths
    )
    rows[n] = {"bytes": distributed.allreduce_bytes(hlo.as_text()), "max_rel_dH": dh}
  per_layer = {p: 4 * int(np.shape(ref[p]["h"])[0]) ** 2 + 4 for p in paths}
  return {"layers": per_layer, "total_expected": sum(per_layer.values()), "meshes": rows}


def checkpoints() -> list[dict]:
  layouts = [(1, 1, (1, 1)), (1, 2, (1, 2)), (1, 4, (2, 2)), (1, 8, (2, 4)), (2, 4, (2, 4))]
  with tempfile.TemporaryDirectory() as folder:
    rows = []
    for processes, devices, mesh in layouts:
      start = time.perf_counter()
      out = str(Path(folder) / f"{processes}_{devices}.st")
      reports = launcher.launch(out, processes, devices, mesh, timeout=600)
      rows.append(
        {
          "processes": processes,
          "devices": processes * devices,
          "mesh": "x".join(map(str, mesh)),
          "digest": reports[0]["digest"][:16],
          "worker_s": max(r["seconds"] for r in reports),
          "wall_s": time.perf_counter() - start,
        }
      )
  return rows


def markdown(result: dict) -> str:
  lines = [f"CPU: {result['cpu']}; 8 simulated devices share its cores.", ""]
  lines += [
    "| spec | weights | 1/8 share | args/device | out/device | temp/device | live max device | s |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for m in result["memory"]:
    lines.append(
      f"| {m['spec']} | {m['weights_MiB']:.1f} MiB | {m['share_MiB']:.1f} MiB | "
      f"{m['args_per_device_MiB']:.2f} MiB | {m['out_per_device_MiB']:.2f} MiB | "
      f"{m['temp_per_device_MiB']:.2f} MiB | {m['live_max_device_MiB']:.2f} MiB | "
      f"{m['seconds']:.2f} |"
    )
  ar = result["allreduce"]
  lines += [
    "",
    f"All-reduced per calibration pass: expected {ar['total_expected']} B "
    "(one float32 Hessian + row count per layer)",
    "",
    "| data shards | bytes all-reduced | max rel. ΔH vs 1 device |",
    "|---|---|---|",
  ]
  for n, row in ar["meshes"].items():
    lines.append(f"| {n} | {row['bytes']} | {row['max_rel_dH']:.2e} |")
  lines += [
    "",
    "| processes | devices | mesh | checkpoint digest | worker s | wall s |",
    "|---|---|---|---|---|---|",
  ]
  for c in result["checkpoints"]:
    lines.append(
      f"| {c['processes']} | {c['devices']} | {c['mesh']} | `{c['digest']}` | "
      f"{c['worker_s']:.1f} | {c['wall_s']:.1f} |"
    )
  return "\n".join(lines) + "\n"


def main() -> None:
  result = {
    "cpu": cpu_name(),
    "load_average": os.getloadavg(),
    "memory": [memory("int8"), memory("int4:g128")],
    "allreduce": allreduced(),
    "checkpoints": checkpoints(),
  }
  RESULTS.mkdir(exist_ok=True)
  (RESULTS / "distributed_scaling.json").write_text(json.dumps(result, indent=1))
  text = markdown(result)
  (RESULTS / "distributed_scaling.md").write_text(text)
  print(text)


if __name__ == "__main__":
  main()
