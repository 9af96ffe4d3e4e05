"""GPTQ of a Llama-family model calibrated on a mesh, in one process or several.

    python -m jaxquant.apps.distributed --processes 2 --devices 4 --mesh 2x4 --out q.safetensors

starts 2 local processes with 4 CPU devices each, joined by `jax.distributed` (gloo
collectives over 127.0.0.1), and runs the recipe on a small random-weight Llama: every
calibration batch split over the mesh's ``data`` axis (``XᵀX`` per device, one all-reduce per
layer), GPTQ's output columns split over ``model`` (each process solving its slices), and
process 0 writing the checkpoint. ``--processes 1 --devices 8`` runs the same in one process;
``--mesh 1x1`` on one device. Each process prints one JSON line: the wall time and the
checkpoint's content digest (`checkpoint_digest`), the same for every layout (see `compare`).

Environment for a process of its own: ``XLA_FLAGS=--xla_force_host_platform_device_count=N``
before jax starts; the launcher sets it for its workers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxquant import io
from jaxquant.apps.models import llama
from jaxquant.ptq import CalibrationSet
from jaxquant.recipes import Recipe, apply_recipe, load_recipe
from jaxquant.rules import Rule

#: The model every run quantizes: small enough to calibrate in seconds on CPU.
TINY = llama.LlamaConfig(vocab=64, dim=32, layers=1, heads=4, kv_heads=2, head_dim=8, mlp=64)


#: The default recipe: GPTQ to 4-bit codes in groups of 32 (absmax scales: quick to search).
TINY_RECIPE = Recipe(
  "tiny-gptq",
  (Rule(r"(^|/)embed_tokens/", weight=None, expect_match=False), Rule(".*", weight="int4:g32")),
  "GPTQ, int4 groups of 32, for the launcher's tiny model",
  (("gptq", {"block_size": 32}),),
)


def recipe_named(name: str) -> Recipe:
  return TINY_RECIPE if name == TINY_RECIPE.name else load_recipe(name)


def random_params(model, tokens: np.ndarray, seed: int = 0) -> dict:
  """Random-weight params on the host (NumPy, the same bits in every process): normal kernels
  and embeddings scaled by ``1/√fan_in``, norm scales 1."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
  rng = np.random.default_rng(seed)

  def one(path, leaf):
    if path[-1].key == "scale":
      return np.ones(leaf.shape, np.float32)
    return (rng.standard_normal(leaf.shape) / np.sqrt(leaf.shape[0])).astype(np.float32)

  return jax.tree_util.tree_map_with_path(one, shapes)


def free_port() -> int:
  """A TCP port free on the loopback interface now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return int(s.getsockname()[1])


def checkpoint_digest(path: str | os.PathLike) -> str:
  """SHA-256 of a checkpoint's content: its safetensors header as canonical JSON (sorted keys,
  with the jaxquant header inside parsed the same way) and every tensor's bytes. The file's own
  bytes can differ between identical saves: safetensors writes ``__metadata__`` from a hash
  map, in an order that changes from run to run."""
  data = Path(path).read_bytes()
  (size,) = struct.unpack("<Q", data[:8])
  header = json.loads(data[8 : 8 + size])
  meta = header.get("__metadata__", {})
  meta = {k: json.loads(v) if k == "jaxquant" else v for k, v in meta.items()}
  canonical = json.dumps({**header, "__metadata__": meta}, sort_keys=True).encode()
  return hashlib.sha256(canonical + data[8 + size :]).hexdigest()


def parse_mesh(text: str) -> tuple[int, int]:
  data, model = (int(n) for n in text.lower().split("x"))
  return data, model


def worker(
  out: str,
  mesh_shape: tuple[int, int],
  recipe: str = "tiny-gptq",
  coordinator: str | None = None,
  processes: int = 1,
  process_id: int = 0,
  seed: int = 0,
  batches: int = 2,
) -> dict:
  """One process: join the others (when `processes` > 1), quantize, process 0 saves. JAX's
  backends start here, after the launcher's ``XLA_FLAGS``."""
  if processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
      coordinator_address=coordinator, num_processes=processes, process_id=process_id
    )
  start = time.perf_counter()
  cfg = TINY
  model = llama.Llama(cfg)
  rng = np.random.default_rng(seed)
  data = [(rng.integers(0, cfg.vocab, (8, 16)).astype(np.int32),) for _ in range(batches)]
  params = random_params(model, data[0][0], seed)
  mesh = None
  if mesh_shape != (1, 1):
    mesh = jax.make_mesh(mesh_shape, ("data", "model"))
  result = apply_recipe(recipe_named(recipe), params, CalibrationSet(model, data, mesh=mesh))
  seconds = time.perf_counter() - start
  report = {
    "process": jax.process_index(),
    "processes": jax.process_count(),
    "devices": jax.device_count(),
    "mesh": list(mesh_shape),
    "seconds": round(seconds, 2),
  }
  if jax.process_index() == 0:
    io.save(out, result.qparams)
    report["digest"] = checkpoint_digest(out)
  if processes > 1:
    multihost_utils.sync_global_devices("saved")
    jax.distributed.shutdown()
  return report


def launch(
  out: str,
  processes: int,
  devices: int,
  mesh_shape: tuple[int, int],
  recipe: str = "tiny-gptq",
  timeout: float = 120.0,
) -> list[dict]:
  """Runs `processes` workers with `devices` CPU devices each on this machine (loopback only)
  and returns their reports; every worker is killed if any fails or the time runs out."""
  port = free_port()
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  command = [sys.executable, "-m", "jaxquant.apps.distributed", "--worker"]
  common = ["--out", out, "--mesh", "x".join(map(str, mesh_shape)), "--recipe", recipe]
  common += ["--processes", str(processes), "--coordinator", f"127.0.0.1:{port}"]
  procs = [
    subprocess.Popen(
      command + common + ["--process-id", str(i)],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(processes)
  ]
  reports, deadline = [], time.monotonic() + timeout
  try:
    for p in procs:
      stdout, stderr = p.communicate(timeout=max(deadline - time.monotonic(), 1.0))
      if p.returncode != 0:
        raise RuntimeError(f"worker exited with {p.returncode}:\n{stderr[-4000:]}")
      reports.append(json.loads(stdout.strip().splitlines()[-1]))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  return reports


def compare(layouts: Sequence[tuple[int, int, tuple[int, int]]], folder: str) -> list[dict]:
  """The checkpoint of every ``(processes, devices per process, mesh)`` layout, side by side."""
  rows = []
  for processes, devices, mesh_shape in layouts:
    out = str(Path(folder) / f"p{processes}_d{devices}_m{mesh_shape[0]}x{mesh_shape[1]}.st")
    reports = launch(out, processes, devices, mesh_shape)
    rows.append({**reports[0], "wall_s": max(r["seconds"] for r in reports)})
  return rows


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m jaxquant.apps.distributed")
  parser.add_argument("--out", required=True, help="checkpoint to write")
  parser.add_argument("--processes", type=int, default=1)
  parser.add_argument("--devices", type=int, default=8, help="CPU devices per process")
  parser.add_argument("--mesh", default="2x4", help="data x model, over all devices")
  parser.add_argument("--recipe", default="tiny-gptq", help="a recipe name or file")
  parser.add_argument("--timeout", type=float, default=120.0)
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--coordinator", help=argparse.SUPPRESS)
  parser.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  mesh_shape = parse_mesh(args.mesh)
  if args.worker:
    report = worker(
      args.out, mesh_shape, args.recipe, args.coordinator, args.processes, args.process_id
    )
    print(json.dumps(report), flush=True)
    return 0
  for report in launch(
    args.out, args.processes, args.devices, mesh_shape, args.recipe, args.timeout
  ):
    print(json.dumps(report))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
