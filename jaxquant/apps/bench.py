"""Speed of one quantized layer, ``y = x · W`` with ``W: [K, N]``, per format and lowering.

Every variant is a jitted function of ``(x, params)``; repeats are interleaved (one call of
each variant per round) so that load from other processes hits all of them alike, and each
variant's median over the rounds is compared with float32's. Qwix's serve path (PTQ provider
on an unchanged ``nn.Dense``) runs beside ours when ``qwix`` is installed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path
from typing import TypeVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxquant as jq
from jaxquant import ops
from jaxquant.ops import cpu_kernels, lowerings

DENSE = (((1,), (0,)), ((), ()))
SHAPES = ((4096, 4096), (4096, 14336))
ROWS = (1, 4, 16, 256)
W4 = "int4:g128"


@dataclasses.dataclass
class Variant:
  fmt: str  # f32, bf16, w8a8, w8, w4, ...
  lowering: str  # what runs, e.g. "int8, contraction-minor"
  fn: Callable
  params: object
  auto: bool = False  # what the library picks by default for this format


def _ours(w: jax.Array, x: jax.Array) -> list[Variant]:
  """Our formats and every lowering each can take."""
  q8, q4 = jq.quantize(w, "int8"), jq.quantize(w, W4)
  q8m, q4m = ops.serving_layout(q8), ops.serving_layout(q4)
  m = x.shape[0]

  def qdot(lhs_spec=None, lowering=None):
    return jax.jit(lambda x, q: ops.qdot_general(x, q, DENSE, lhs_spec=lhs_spec, lowering=lowering))

  def default(fmt, q, lhs_spec=None):
    """The documented path, no extra call: what `explain` picks for this shape."""
    name = ops.explain(x, q, DENSE, lhs_spec).name
    return Variant(fmt, f"default: {name}", qdot(lhs_spec), q, True)

  out = [
    Variant("f32", "float32 dot", jax.jit(lambda x, w: x @ w), w, True),
    Variant(
      "bf16",
      "bfloat16 dot, f32 accumulation",
      jax.jit(lambda x, w: jnp.dot(x.astype(jnp.bfloat16), w, preferred_element_type=jnp.float32)),
      w.astype(jnp.bfloat16),
      True,
    ),
    default("w8a8", q8, "int8:token"),
    Variant("w8a8", "XLA int8, [in,out] codes", qdot("int8:token", "int8"), q8),
    Variant("w8a8", "XLA int8, [out,in] codes", qdot("int8:token", "int8"), q8m),
    Variant("w8a8", "dequant", qdot("int8:token", "dequant"), q8),
    default("w8", q8),
    Variant("w8", "dequant", qdot(None, "dequant"), q8),
    Variant("w8", "XLA int8 dynamic acts, [out,in]", qdot(None, "int8"), q8m),
    default("w4", q4),
    Variant("w4", "dequant", qdot(None, "dequant"), q4),
  ]
  groups = w.shape[0] // 128
  if m * groups <= 4 * lowerings.W4A8_MAX_ROWS:  # block-diagonal rows grow with groups
    out += [
      Variant("w4", "w4a8, [in,out] codes", qdot(None, "w4a8"), q4),
      Variant("w4", "w4a8, [out,in] codes", qdot(None, "w4a8"), q4m),
    ]
  return out


def _qwix(w: jax.Array, x: jax.Array) -> list[Variant]:
  """Qwix 0.1.8's PTQ serve path on ``nn.Dense`` (skipped when qwix is not installed)."""
  try:
    import qwix
  except ImportError:
    return []
  model = nn.Dense(w.shape[1], use_bias=False)
  params = {"kernel": w}
  configs = {
    "w8a8": dict(weight_qtype=jnp.int8, act_qtype=jnp.int8),
    "w8": dict(weight_qtype=jnp.int8),
    "w4": dict(weight_qtype=jnp.int4, tile_size=128),
  }
  out = []
  for fmt, cfg in configs.items():
    ptq = qwix.quantize_model(
      model, qwix.PtqProvider([qwix.QuantizationRule(module_path=".*", **cfg)])
    )
    abstract = jax.eval_shape(ptq.init, jax.random.key(0), x)["params"]
    qparams = qwix.quantize_params(params, abstract)
    fn = jax.jit(lambda x, p, ptq=ptq: ptq.apply({"params": p}, x))
    out.append(Variant(fmt, "qwix 0.1.8 serve (PtqProvider)", fn, qparams))
  return out


K = TypeVar("K", bound=Hashable)


def time_interleaved(
  calls: Mapping[K, Callable[[], object]], rounds: int, warmup: int = 1
) -> tuple[dict[K, float], dict[K, float]]:
  """Median wall and process-CPU seconds of each zero-argument call, ``(wall, cpu)`` dicts.

  Every round runs each call once, so load drifting on a shared machine hits all alike; CPU
  time (all of this process's threads) is the less disturbed of the two. Each call's result is
  waited for (`jax.block_until_ready`); `warmup` untimed calls compile first.
  """
  for call in calls.values():
    for _ in range(warmup):
      jax.block_until_ready(call())
  wall: dict[K, list[float]] = {name: [] for name in calls}
  cpu: dict[K, list[float]] = {name: [] for name in calls}
  for _ in range(rounds):
    for name, call in calls.items():
      start, start_cpu = time.perf_counter(), time.process_time()
      jax.block_until_ready(call())
      wall[name].append(time.perf_counter() - start)
      cpu[name].append(time.process_time() - start_cpu)
  median = lambda d: {k: statistics.median(v) for k, v in d.items()}
  return median(wall), median(cpu)


def run_case(k: int, n: int, m: int, repeats: int, qwix: bool = True) -> list[dict]:
  """Median ms of every variant for ``x: [m, k]``, ``W: [k, n]``, rounds interleaved."""
  kx, kw = jax.random.split(jax.random.key(k * 31 + n + m))
  w = jax.random.normal(kw, (k, n), jnp.float32) / np.sqrt(k)
  x = jax.random.normal(kx, (m, k), jnp.float32)
  variants = _ours(w, x) + (_qwix(w, x) if qwix else [])
  ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  errors = {}
  for v in variants:  # compile and check
    y = np.asarray(v.fn(x, v.params), np.float64)
    errors[id(v)] = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
  calls = {id(v): (lambda v=v: v.fn(x, v.params)) for v in variants}
  wall, _ = time_interleaved(calls, repeats)
  base = wall[id(variants[0])]
  rows = []
  for v in variants:
    med = wall[id(v)]
    rows.append(
      {
        "K": k,
        "N": n,
        "M": m,
        "format": v.fmt,
        "lowering": v.lowering,
        "auto": v.auto,
        "median_ms": med * 1e3,
        "speedup_vs_f32": base / med,
        "rel_error": errors[id(v)],
        "repeats": repeats,
      }
    )
  del variants
  return rows


def explain_rows(k: int, m: int) -> dict[str, str]:
  """What `explain` says for each format at this shape (default and dynamic-int8 scopes)."""
  x = jax.ShapeDtypeStruct((m, k), jnp.float32)
  w = jnp.zeros((k, 256), jnp.float32) + 0.01
  q8, q4 = jq.quantize(w, "int8"), jq.quantize(w, W4)
  out = {
    "w8a8": str(ops.explain(x, q8, DENSE, "int8:token")),
    "w8": str(ops.explain(x, q8)),
    "w4": str(ops.explain(x, q4)),
  }
  with ops.lowering_scope(dynamic_int8=True):
    out["w8 (dynamic_int8)"] = str(ops.explain(x, q8))
    out["w4 (dynamic_int8)"] = str(ops.explain(x, q4))
  return out


def markdown(rows: list[dict]) -> str:
  lines = [
    "| K×N | M | format | lowering | median ms | × vs f32 | rel err |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    star = " (auto)" if r["auto"] else ""
    lines.append(
      f"| {r['K']}×{r['N']} | {r['M']} | {r['format']} | {r['lowering']}{star} | "
      f"{r['median_ms']:.2f} | {r['speedup_vs_f32']:.2f} | {r['rel_error']:.4f} |"
    )
  return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  shapes = sorted({(r["K"], r["N"]) for r in rows})
  fig, axes = plt.subplots(1, len(shapes), figsize=(7 * len(shapes), 5), squeeze=False)
  for ax, (k, n) in zip(axes[0], shapes):
    sub = [r for r in rows if (r["K"], r["N"]) == (k, n)]
    for key in dict.fromkeys((r["format"], r["lowering"]) for r in sub):
      pts = sorted(
        (r["M"], r["speedup_vs_f32"]) for r in sub if (r["format"], r["lowering"]) == key
      )
      style = "--" if "qwix" in key[1] else "-"
      ax.plot(
        [p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=f"{key[0]}: {key[1]}"
      )
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set(
      xscale="log",
      yscale="log",
      xlabel="rows M (tokens)",
      ylabel="speed-up vs float32",
      title=f"x[M,{k}] · W[{k},{n}] ({jax.default_backend()}, {os.cpu_count()} cores)",
    )
    ax.grid(True, which="both", alpha=0.3)
  axes[0][-1].legend(fontsize=7, loc="best")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def run(
  quick: bool = False,
  repeats: int | None = None,
  out: str | Path | None = None,
  qwix: bool = True,
  progress: Callable[[str], None] = print,
) -> list[dict]:
  """Runs every shape × rows case; writes ``bench_ops.{md,json,png}`` into `out` if given."""
  shapes = SHAPES[:1] if quick else SHAPES
  row_counts = (1, 16) if quick else ROWS
  repeats = repeats or (5 if quick else 15)
  rows = []
  for k, n in shapes:
    for m in row_counts:
      case = run_case(k, n, m, repeats, qwix)
      rows += case
      best = max((r for r in case if r["format"] == "w8a8"), key=lambda r: r["speedup_vs_f32"])
      progress(
        f"{k}x{n} M={m}: f32 {case[0]['median_ms']:.2f} ms; best w8a8 "
        f"{best['median_ms']:.2f} ms ({best['lowering']}, {best['speedup_vs_f32']:.2f}x)"
      )
  meta = {
    "jax": jax.__version__,
    "backend": jax.default_backend(),
    "cpus": os.cpu_count(),
    "machine": platform.processor() or platform.machine(),
    "repeats": repeats,
    "load_average": os.getloadavg(),
    "cpu_kernels": cpu_kernels.available(),
    "explain": {m: explain_rows(4096, m) for m in row_counts},
  }
  try:
    import qwix as _q

    meta["qwix"] = _q.__version__
  except ImportError:
    meta["qwix"] = None
  if out is not None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_ops.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    cpu = cpu_description()
    meta["cpu"] = cpu
    flags = ", ".join(f"{f} {'yes' if on else 'no'}" for f, on in cpu["flags"].items())
    head = (
      f"CPU: {cpu['model']} ({flags}); compiled CPU kernels: "
      f"{'built, ' + cpu_kernels.isa() + ' code path' if meta['cpu_kernels'] else 'not built'}.\n"
      f"jax {meta['jax']} on {meta['backend']} ({meta['cpus']} cores), qwix "
      f"{meta['qwix']}; median of {repeats} interleaved rounds; × vs f32 = f32 median / "
      "median (higher is faster); (auto) = the library's default lowering for that "
      "format.\n\n"
    )
    (out / "bench_ops.md").write_text(head + markdown(rows))
    try:
      plot(rows, out / "bench_ops.png")
    except ImportError:
      progress("matplotlib not installed: no plot")
  return rows


def cpu_description() -> dict:
  """The CPU as speed tables name it: ``lscpu``'s model name, cores, and the integer/SIMD
  flags that change what is fast (avx2, avx512f, avx512_vnni, avx512_bf16, amx_int8)."""
  try:
    out = subprocess.run(["lscpu"], check=True, capture_output=True, text=True).stdout
  except (OSError, subprocess.CalledProcessError):
    out = ""
  fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
  fields = {k.strip(): v.strip() for k, v in fields.items()}
  flags = set(fields.get("Flags", "").split())
  wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8")
  return {
    "model": fields.get("Model name", platform.processor() or "unknown"),
    "cores": os.cpu_count(),
    "flags": {f: f in flags for f in wanted},
  }
