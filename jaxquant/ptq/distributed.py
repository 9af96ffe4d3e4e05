"""Calibration over a mesh: statistics summed over the data axis, GPTQ split by output column.

Data parallel: every calibration batch is split along its first axis over the mesh's data
axis; each device runs the float model (calibrate mode) on its rows and accumulates its own
statistics over all batches (``Σ xᵀx`` of its rows for GPTQ; ``Σ|x|`` and ``max|x|`` per
channel for SmoothQuant and AWQ). One all-reduce per statistic and layer then gives the
totals: for a layer with ``d_in`` inputs, ``4 d_in² + 4`` bytes (one float32 Hessian and its
row count), whatever the number of batches.

GPTQ given the Hessian treats the output columns of a ``[in, out]`` kernel independently
(the error feedback runs along the input rows, column by column), so the columns split over
the model axis into contiguous slices solved apart and concatenated give the same codes as
the whole kernel. Across processes (`jax.distributed`), each process solves the slices it owns
and the slices are exchanged, so every process ends with the whole QArray.

Everything here runs the same in one process and in several: inputs are given as host data
(the same on every process) and placed as global arrays.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxquant.flax import quantize_model
from jaxquant.ptq.capture import Observer, RowMask, with_row_mask
from jaxquant.ptq.gptq import GPTQConfig, gptq_quantize
from jaxquant.qarray import QArray, codes, from_codes
from jaxquant.rules import Rule
from jaxquant.spec import QuantSpec, as_spec

PyTree = Any
Axis = str | tuple[str, ...]

#: How each statistic's per-device parts combine (anything else is summed).
REDUCTIONS: dict[str, Callable] = {"abs_max": jax.lax.pmax}


def global_array(x, sharding: NamedSharding) -> jax.Array:
  """Host data `x` (the same on every process) as one global array placed by `sharding`;
  each process copies in only the shards its devices hold."""
  if isinstance(x, jax.Array) and x.sharding == sharding:
    return x
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicated(tree: PyTree, mesh: Mesh) -> PyTree:
  """Every array of `tree` replicated over `mesh` (global arrays)."""
  return jax.tree.map(lambda a: global_array(a, NamedSharding(mesh, P())), tree)


def split_batch(batch: tuple, mesh: Mesh, axis: Axis = "data") -> tuple:
  """Every argument of `batch` split along its first axis over `axis` (its length must be a
  multiple of the axis size)."""
  return jax.tree.map(lambda a: global_array(a, NamedSharding(mesh, P(axis))), batch)


def _combine(stats: dict, axis: Axis) -> dict:
  """Per-device statistics (leading axis 1 of the local slot) reduced over `axis`."""
  out = {}
  for path, layer in stats.items():
    out[path] = {
      k: REDUCTIONS.get(k, jax.lax.psum)(jnp.asarray(v)[0], axis) for k, v in layer.items()
    }
  return out


def sharded_capture(
  model,
  params: PyTree,
  rules: Sequence[Rule],
  batches: Sequence[tuple],
  observer: Observer,
  mesh: Mesh,
  axis: Axis = "data",
  row_mask: RowMask | None = None,
) -> dict[str, Any]:
  """`jaxquant.ptq.capture.capture` with every batch split over the mesh axis `axis`.

  Each device accumulates what `observer` gathers from its rows over all batches (no
  communication), then one all-reduce per statistic and layer (`REDUCTIONS`; a sum by
  default) gives the totals, replicated on every device. `params` are replicated.
  """
  cal = quantize_model(model, rules, "calibrate")

  def local(p, acc, *args):
    obs = with_row_mask(observer, row_mask, args)
    mine = None if acc is None else jax.tree.map(lambda a: a[0], acc)
    new = cal.apply({"params": p}, *args, stats=mine, observer=obs)[1]
    return jax.tree.map(lambda a: jnp.asarray(a)[None], new)

  def step(p, acc, *args):
    spec = (P(), P(axis)) + (P(axis),) * len(args)
    return jax.shard_map(local, mesh=mesh, in_specs=spec, out_specs=P(axis))(p, acc, *args)

  jitted = jax.jit(step)
  params = replicated(params, mesh)
  acc = None
  for batch in batches:
    acc = jitted(params, acc, *split_batch(tuple(batch), mesh, axis))
  if not acc:
    return {}
  return reduce_stats(acc, mesh, axis)


def reduce_stats(acc: dict, mesh: Mesh, axis: Axis = "data") -> dict:
  """The one all-reduce per statistic and layer: per-device parts ``[devices along axis, ...]``
  to totals replicated on every device."""
  combine = jax.shard_map(
    lambda a: _combine(a, axis), mesh=mesh, in_specs=P(axis), out_specs=P(), check_vma=False
  )
  return jax.jit(combine)(acc)


def local_value(x) -> np.ndarray:
  """A replicated (or fully addressable) global array as host data on this process."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(x.addressable_data(0))
  return np.asarray(x)


def allreduce_bytes(hlo: str) -> int:
  """Bytes all-reduced by a compiled HLO module: the sum of every ``all-reduce``'s result
  shapes (tuples included)."""
  sizes = {"f32": 4, "s32": 4, "f64": 8, "s64": 8, "bf16": 2, "f16": 2, "s8": 1, "u8": 1}
  total = 0
  for line in hlo.splitlines():
    if " all-reduce(" not in line and " all-reduce-start(" not in line:
      continue
    result = line.split("=", 1)[1].split("all-reduce", 1)[0]
    for dtype, dims in _shapes(result):
      total += sizes[dtype] * int(np.prod(dims or [1]))
  return total


def _shapes(text: str) -> list[tuple[str, list[int]]]:
  return [
    (m.group(1), [int(d) for d in m.group(2).split(",") if d])
    for m in re.finditer(r"\b([a-z]+\d+)\[([\d,]*)\]", text)
  ]


# --------------------------------------------------------------------------- GPTQ by columns
def column_slices(n_out: int, parts: int) -> list[slice]:
  """`parts` contiguous, equal slices of ``range(n_out)`` (`parts` must divide it)."""
  if n_out % parts:
    raise ValueError(f"{n_out} output columns do not split into {parts} equal slices.")
  width = n_out // parts
  return [slice(i * width, (i + 1) * width) for i in range(parts)]


def _owned(parts: int) -> list[int]:
  """The column slices this process solves: contiguous runs, one per process."""
  count, me = jax.process_count(), jax.process_index()
  if parts % count:
    raise ValueError(f"{parts} column slices do not split over {count} processes.")
  per = parts // count
  return list(range(me * per, (me + 1) * per))


def gptq_columns(
  w: np.ndarray,
  h: np.ndarray,
  spec: QuantSpec | str,
  config: GPTQConfig | None = None,
  parts: int = 1,
) -> tuple[QArray, dict]:
  """GPTQ of ``w [in, out]`` as `parts` slices of output columns solved apart, each process
  (`jax.distributed`) solving its own slices and receiving the others'; the same codes, scales
  and zero points as ``gptq_quantize(w, h, spec, config)``."""
  spec, config = as_spec(spec), config or GPTQConfig()
  slices = column_slices(w.shape[1], parts)
  mine = _owned(parts)
  solved = {i: gptq_quantize(np.asarray(w)[:, slices[i]], h, spec, config) for i in mine}
  info = {"damp": next(iter(solved.values()))[1]["damp"], "dead": solved[mine[0]][1]["dead"]}
  children = {i: _unpacked(q) for i, (q, _) in solved.items()}
  if jax.process_count() > 1:
    stacked = {k: np.stack([children[i][k] for i in mine]) for k in children[mine[0]]}
    gathered = multihost_utils.process_allgather(stacked)  # [processes, per process, ...]
    flat = {k: np.asarray(v).reshape((parts,) + v.shape[2:]) for k, v in gathered.items()}
    children = {i: {k: flat[k][i] for k in flat} for i in range(parts)}
  joined = {k: np.concatenate([children[i][k] for i in range(parts)], -1) for k in children[0]}
  zero = joined.get("zero_point")
  q = from_codes(
    jnp.asarray(joined["codes"]),
    jnp.asarray(joined["scale"]),
    None if zero is None else jnp.asarray(zero),
    spec,
    np.dtype(w.dtype),
  )
  return q, info


def _unpacked(q: QArray) -> dict[str, np.ndarray]:
  out = {"codes": np.asarray(codes(q)), "scale": np.asarray(q.scale)}
  if q.zero_point is not None:
    out["zero_point"] = np.asarray(q.zero_point)
  return out
