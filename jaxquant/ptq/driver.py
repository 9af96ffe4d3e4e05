"""The one layer-sequential PTQ driver: smoothers, then a quantizer, block by block.

For every block (a transformer layer, `jaxquant.ptq.capture.block_of`) in execution order:

1. capture the statistics the steps need (`steps.StatRequest`) of the block's layers, with the
   model as served so far: every earlier block smoothed and replaced by its quantized weights;
2. each smoother computes the scales of the smoothing groups that start in the block and
   applies them float → float (`smooth.apply_smoothing`); the captured statistics are carried
   through the same scales (`smooth.scaled_inputs`), so nothing is captured twice;
3. the quantizer quantizes each layer of the block it applies to (round to nearest for the
   smoothed layers it does not), and the block's layers are replaced by what they serve as.

When the model is a chain of blocks, each block runs alone on its cached inputs
(`jaxquant.ptq.chain`: one block's activations in memory, linear in depth); otherwise the
whole model runs over the batches for every block. Layers no step visits are rounded to
nearest at the end, by the same plan. A run with no
step that needs data is a single pass without a model.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, cast

import numpy as np

from jaxquant.ptq import smooth
from jaxquant.ptq.capture import (
  DEFAULT_BLOCK,
  RowMask,
  block_of,
  blocks_in_order,
  execution_order,
)
from jaxquant.ptq.chain import chain_blocks
from jaxquant.ptq.distributed import gptq_columns
from jaxquant.ptq.smooth import SmoothGroup
from jaxquant.ptq.steps import GPTQ, RTN, capture_stats, merged
from jaxquant.qarray import QArray
from jaxquant.spec import QuantSpec
from jaxquant.transforms import Plan, map_leaves, named_leaves, progress_bar, quantize_params

PyTree = Any


@dataclasses.dataclass(frozen=True)
class CalibrationSet:
  """What the data-driven steps run on.

  Attributes:
    model: the Linen model (unchanged; run through the calibrate-mode adapter).
    batches: argument tuples for ``model.apply({"params": p}, *batch)``.
    row_mask: ``row_mask(batch)`` marks the real rows (e.g. the attention mask ``[B, S]``);
      statistics count only those. None: every row.
    output_fn: ``output_fn(outputs, batch)``, what mixed precision compares (default: the
      outputs).
    smoothing_groups: layers sharing one input and where their ``1/s`` folds
      (`smooth.SmoothGroup`); None: one group per layer, explicit input scales.
    block_pattern: the regex that cuts kernel paths into blocks (`capture.block_of`).
    mesh: a `jax.sharding.Mesh` to calibrate on (None: one device): ``XᵀX`` and activation
      maxima are accumulated per device on its share of every batch, split over
      `data_axis`, and all-reduced once per layer; GPTQ solves the output columns in
      ``mesh.shape[model_axis]`` slices, each process its own (`jaxquant.ptq.distributed`).
      The results equal one device's up to the order of the float32 sums in ``XᵀX``.
    data_axis, model_axis: the mesh axes the batches and the GPTQ columns split over.
  """

  model: Any
  batches: Sequence[tuple]
  row_mask: RowMask | None = None
  output_fn: Callable | None = None
  smoothing_groups: Sequence[SmoothGroup] | None = None
  block_pattern: str = DEFAULT_BLOCK
  mesh: Any = None
  data_axis: str = "data"
  model_axis: str = "model"

  def column_parts(self) -> int:
    """How many slices of output columns GPTQ solves apart (1 without a mesh)."""
    if self.mesh is None or self.model_axis not in self.mesh.axis_names:
      return 1
    return int(self.mesh.shape[self.model_axis])


@dataclasses.dataclass
class Result:
  """Quantized params, the float params they were quantized from (smoothing applied), and
  per-step notes."""

  qparams: PyTree
  reference: PyTree
  info: dict


def needs_data(steps: Sequence[Any]) -> bool:
  return any(s.needs is not None for s in steps)


def run(
  params: PyTree,
  plan: Plan,
  smoothers: Sequence[Any],
  quantizer: Any,
  data: CalibrationSet | None = None,
  progress: bool | Callable = False,
) -> Result:
  """Quantizes `params` by `plan` (its rules, computed once) with the `smoothers` then the
  `quantizer` (`jaxquant.ptq.steps`), layer-sequentially when any step needs data."""
  plan.check()
  quantizer = quantizer or RTN()
  if not needs_data([*smoothers, quantizer]):
    return _data_free(params, plan, quantizer, progress)
  if data is None or not data.batches:
    names = ", ".join(s.name for s in [*smoothers, quantizer] if s.needs is not None)
    raise ValueError(
      f"PTQ steps {names} need calibration data: pass a CalibrationSet (the Linen model and "
      "batches of its inputs), or use data-free steps (rtn, hqq)."
    )
  rules = plan.rules
  leaves = dict(named_leaves(params))
  specs = {
    r.path: r.spec
    for r in plan.quantized
    if r.batch_dims == 0 and len(r.shape) == 2 and not isinstance(leaves[r.path], QArray)
  }
  eligible = {
    p
    for p, spec in specs.items()
    if quantizer.needs is not None and quantizer.eligible(spec, leaves[p].shape)
  }
  candidates = set(specs) if smoothers else eligible
  order = execution_order(data.model, params, rules, data.batches[0], candidates)
  groups = _groups(data.smoothing_groups, order, specs) if smoothers else []
  visited = eligible.union(p for g in groups for p in g.layers)
  blocks = [[p for p in b if p in visited] for b in blocks_in_order(order, data.block_pattern)]
  names = " + ".join(s.name for s in [*smoothers, quantizer])
  reference, current = params, params
  done: dict[str, QArray] = {}
  info: dict[str, dict] = {s.name: {} for s in [*smoothers, quantizer]}
  blocks = [b for b in blocks if b]
  block_names = [block_of(b[0], data.block_pattern) for b in blocks]
  chain = chain_blocks(data.model, params, rules, data.batches, block_names, data.row_mask)
  for name, block in progress_bar(list(zip(block_names, blocks)), names, progress):
    mine = [g for g in groups if g.layers[0] in block]
    if chain is None:  # the whole model over every batch
      source = (data.model, current, data.batches, data.row_mask)
    else:  # the block alone on its cached inputs
      source = (chain.model(name), chain.params(current, name), chain.batches(), chain.row_mask())
    stats = _capture(source, rules, block, mine, smoothers, quantizer, eligible, data)
    for smoother in smoothers:
      scales = {}
      weights = dict(named_leaves(current))
      for i, g in enumerate(mine):
        s, note = smoother(
          stats[smoother.needs.kind][g.layers[0]],
          [np.asarray(weights[p]) for p in g.layers],
          specs[g.layers[0]],
        )
        scales[i] = s
        info[smoother.name][",".join(g.layers)] = note
        for kind in stats:
          for p in g.layers:
            if p in stats[kind]:
              stats[kind][p] = smooth.scaled_inputs(stats[kind][p], s)
      reference = smooth.apply_smoothing(reference, mine, scales)
      current = smooth.apply_smoothing(current, mine, scales)
    weights = dict(named_leaves(current))
    for p in block:
      if p in eligible:
        need = quantizer.needs.kind
        if isinstance(quantizer, GPTQ) and data.column_parts() > 1:
          h, parts, spec = stats[need][p]["h"], data.column_parts(), cast(QuantSpec, specs[p])
          done[p], note = gptq_columns(np.asarray(weights[p]), h, spec, quantizer, parts)
        else:
          done[p], note = quantizer(weights[p], stats[need][p], specs[p])
        if note:
          info[quantizer.name][p] = note
      else:  # smoothed, but not the quantizer's to take
        done[p], _ = RTN()(weights[p], None, specs[p])
    served = {p: done[p].dequantize() for p in block}  # earlier blocks are already replaced
    current = map_leaves(functools.partial(_served_or, served), current)
    if chain is not None:
      chain.advance(current, name)
  qparams = map_leaves(lambda path, v: done.get(path, v), reference)
  return Result(quantize_params(qparams, plan), reference, {k: v for k, v in info.items() if v})


def _served_or(served: dict, path: str, value):
  return served.get(path, value)


def _groups(given, order: Sequence[str], specs: dict) -> list[SmoothGroup]:
  """The smoothing groups whose layers are all quantized and run (one per layer if none given)."""
  groups = smooth.default_groups(order) if given is None else list(given)
  ran = set(order)
  return [g for g in groups if all(p in specs and p in ran for p in g.layers)]


def _capture(
  source: tuple, rules, block, groups, smoothers, quantizer, eligible, data: CalibrationSet
) -> dict[str, dict]:
  """``{stat kind: {path: statistics}}`` for the block: the smoothers' on each group's first
  layer, the quantizer's on the layers it takes; `source` is ``(model, params, batches,
  row_mask)``, the whole model or the block alone."""
  model, params, batches, row_mask = source
  wanted: dict[str, set[str]] = {}
  for s in smoothers:
    wanted.setdefault(s.needs.kind, set()).update(g.layers[0] for g in groups)
  if quantizer.needs is not None:
    wanted.setdefault(quantizer.needs.kind, set()).update(p for p in block if p in eligible)
  requests = merged([s.needs for s in smoothers] + ([quantizer.needs] if quantizer.needs else []))
  out: dict[str, dict] = {}
  for request in requests:
    paths = [p for p in block if p in wanted.get(request.kind, ())]
    out[request.kind] = capture_stats(
      model, params, rules, batches, request, paths, row_mask, data.mesh, data.data_axis
    )
  return out


def _data_free(params: PyTree, plan: Plan, quantizer: Any, progress) -> Result:
  """Every eligible kernel by `quantizer` alone (no statistics), the rest by the plan."""
  leaves = dict(named_leaves(params))
  done = {}
  if not (isinstance(quantizer, RTN) and not quantizer.float_zero):  # plain RTN: the plan's own
    for r in plan.quantized:
      if r.batch_dims == 0 and quantizer.eligible(r.spec, r.shape):
        done[r.path], _ = quantizer(leaves[r.path], None, r.spec)
  qparams = map_leaves(lambda path, v: done.get(path, v), params)
  return Result(quantize_params(qparams, plan, progress=progress), params, {})
