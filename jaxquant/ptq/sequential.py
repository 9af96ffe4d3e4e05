"""Block-sequential PTQ drivers over a Linen model and calibration batches."""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from jaxquant.numerics import dequantize
from jaxquant.ptq.capture import DEFAULT_BLOCK, RowMask, block_of, capture, hessian_observer
from jaxquant.ptq.gptq import GPTQConfig, gptq_quantize
from jaxquant.rules import Rule
from jaxquant.spec import QuantSpec
from jaxquant.transforms import map_leaves, named_leaves, plan, quantize_params


def execution_order(model, params, rules: Sequence[Rule], batch: tuple, paths) -> list[str]:
  """Kernel paths among `paths` in the order the model calls their layers."""
  wanted = set(paths)
  seen = capture(model, params, rules, [batch],
                 lambda path, prev, x, *_: jnp.zeros(()) if path in wanted else None)  # fmt: skip
  return list(seen)


def blocks_in_order(order: Sequence[str], pattern: str = DEFAULT_BLOCK) -> list[list[str]]:
  blocks: dict[str, list[str]] = {}
  for path in order:
    blocks.setdefault(block_of(path, pattern), []).append(path)
  return list(blocks.values())


def gptq_eligible(spec: QuantSpec | None, shape) -> bool:
  return (spec is not None and spec.info.kind == "int" and len(shape) == 2
          and (spec.granularity == "channel" and spec.resolved_axis(2) == 1
               or spec.granularity == "group" and spec.resolved_axis(2) == 0))  # fmt: skip


def gptq_params(
    model,
    params: dict,
    rules: Sequence[Rule],
    batches: Sequence[tuple],
    *,
    config: GPTQConfig | None = None,
    block_pattern: str = DEFAULT_BLOCK,
    progress: bool = False,
    row_mask: RowMask | None = None,
) -> tuple[dict, dict]:
  """GPTQ every 2-D integer kernel the rules quantize, block by block; RTN for the rest.

  Each block's Hessians come from a forward pass in which all earlier blocks already use
  their quantized weights, over the rows `row_mask` marks real (all without one).
  Returns ``(qparams, info per path)``.
  """
  config = config or GPTQConfig()
  p = plan(params, rules)
  p.check()
  targets = {r.path: r.spec for r in p.quantized if gptq_eligible(r.spec, r.shape)}
  order = execution_order(model, params, rules, batches[0], targets)
  blocks = blocks_in_order(order, block_pattern)
  if progress:
    from rich.progress import track

    blocks = track(blocks, description="GPTQ", transient=True)
  done, info, current = {}, {}, params
  for block in blocks:
    acc = capture(model, current, rules, batches, hessian_observer(block), row_mask)
    leaves = dict(named_leaves(current))
    for path in block:
      q, info[path] = gptq_quantize(np.asarray(leaves[path]), np.asarray(acc[path]["h"]),
                                    targets[path], config)  # fmt: skip
      done[path] = q
    replaced = {path: dequantize(done[path]) for path in block}
    current = map_leaves(lambda path, v, r=replaced: r.get(path, v), current)
  qparams = map_leaves(lambda path, v: done.get(path, v), params)
  return quantize_params(qparams, rules), info
