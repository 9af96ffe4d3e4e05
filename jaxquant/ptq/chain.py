"""Blocks run alone on cached inputs: the layer-sequential driver's fast path.

Capturing a block's statistics by running the whole model costs one full forward per block
(quadratic in depth). When the model is a chain of blocks (block ``i + 1`` is called on block
``i``'s output, with the same other arguments), each block's inputs are kept instead (one
block's activations for the calibration set) and only the block runs:

1. one calibrate-mode forward per batch records how the first block is called: the unbound
   module (Flax interception), its array arguments and its static ones;
2. a check on the first batch that the model *is* such a chain: every block is called the same
   way with the same other arguments, and the second block's recorded input is the first
   block's output (to float tolerance);
3. per block, statistics come from the block alone (`Chain.model` and `Chain.params` stand for
   the model with the same parameter paths), and after the block is quantized its outputs
   become the next block's inputs (`Chain.advance`).

Anything else (blocks that are not module calls, non-dict params, other wiring) returns None
from `chain_blocks`, and the driver runs full forwards as before.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from jaxquant.flax import quantize_model
from jaxquant.ptq.capture import RowMask
from jaxquant.rules import Rule

_TOLERANCE = 1e-4  # relative max difference that still counts as "the same input"


@dataclasses.dataclass(frozen=True)
class BlockCall:
  """How a block module was called: the unbound `module`, its argument tree `treedef` and, per
  leaf, the static value (None where the leaf is an array)."""

  module: Any
  treedef: Any
  static: tuple


class Nest(nn.Module):
  """``block`` under the parameter path `names` (``("layers_3",)``), called with the array
  leaves of its arguments (then `extra` ignored trailing arrays, e.g. a row mask)."""

  block: Any
  names: tuple[str, ...]
  call: BlockCall
  extra: int = 0

  @nn.compact
  def __call__(self, *leaves):
    if len(self.names) > 1:
      inner = Nest(self.block, self.names[1:], self.call, self.extra, name=self.names[0])
      return inner(*leaves)
    arrays = iter(leaves[: len(leaves) - self.extra])
    values = [next(arrays) if s is None else s for s in self.call.static]
    args, kwargs = jax.tree.unflatten(self.call.treedef, values)
    return self.block.clone(parent=self, name=self.names[0])(*args, **kwargs)


def _is_array(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray))


def _record(model, rules, names: set[str], first_only: bool):
  """A jittable ``fn(params, *batch) -> {block: [array leaves]}`` and the `BlockCall`s it
  records (filled while tracing)."""
  cal = quantize_model(model, rules, "calibrate")
  calls: dict[str, BlockCall] = {}

  def fn(params, *batch):
    found: dict[str, list] = {}

    def interceptor(next_fun, args, kwargs, context):
      module = context.module
      if context.method_name == "__call__" and module.scope is not None:
        path = "/".join(module.scope.path)
        if path in names and path not in found and not (first_only and found):
          leaves, treedef = jax.tree.flatten((args, kwargs))
          calls[path] = BlockCall(
            module.clone(parent=None, name=None),
            treedef,
            tuple(None if _is_array(x) else x for x in leaves),
          )
          found[path] = [x for x in leaves if _is_array(x)]
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
      cal.apply({"params": params}, *batch, stats=None)
    return found

  return fn, calls


def subtree(params: dict, names: Sequence[str]) -> dict:
  """``{names[0]: {...: params at names}}``: only the block's parameters, at their paths."""
  node = params
  for n in names:
    node = node[n]
  for n in reversed(names):
    node = {n: node}
  return node


@dataclasses.dataclass
class Chain:
  """The current block's inputs per batch, and how each block runs alone."""

  calls: dict[str, BlockCall]
  inputs: list[list[jax.Array]]  # per batch: the block's array arguments
  masks: list[Any] | None
  rules: Sequence[Rule]

  def model(self, block: str) -> Nest:
    call = self.calls[block]
    return Nest(call.module, tuple(block.split("/")), call, 0 if self.masks is None else 1)

  def params(self, params: dict, block: str) -> dict:
    return subtree(params, block.split("/"))

  def batches(self) -> list[tuple]:
    if self.masks is None:
      return [tuple(x) for x in self.inputs]
    return [(*x, m) for x, m in zip(self.inputs, self.masks)]

  def row_mask(self) -> RowMask | None:
    return None if self.masks is None else _last

  def advance(self, params: dict, block: str) -> None:
    """Replaces the inputs by `block`'s outputs under `params` (the block as served)."""
    run = jax.jit(quantize_model(self.model(block), self.rules, "calibrate").apply)
    sub = jax.device_put(self.params(params, block))
    for i, batch in enumerate(self.batches()):
      out, _ = run({"params": sub}, *batch, stats=None)
      self.inputs[i] = [out, *self.inputs[i][1:]]


def _last(args: tuple):
  return args[-1]


def chain_blocks(
  model,
  params,
  rules: Sequence[Rule],
  batches: Sequence[tuple],
  blocks: Sequence[str],
  row_mask: RowMask | None = None,
) -> Chain | None:
  """The inputs of the first of `blocks` (module paths, in execution order) for every batch,
  if the model chains them (see the module doc); None otherwise."""
  if not blocks or not isinstance(params, dict):
    return None
  record_all, calls = _record(model, rules, set(blocks), first_only=False)
  try:
    first = jax.jit(record_all)(params, *batches[0])
  except Exception:
    return None
  if set(first) != set(blocks) or not _is_chain(first, calls, params, blocks, rules):
    return None
  record_first, _ = _record(model, rules, {blocks[0]}, first_only=True)
  record_first = jax.jit(record_first)
  inputs = [first[blocks[0]]] + [record_first(params, *b)[blocks[0]] for b in batches[1:]]
  masks = None if row_mask is None else [row_mask(b) for b in batches]
  return Chain(calls, inputs, masks, rules)


def _is_chain(found, calls, params, blocks, rules) -> bool:
  """Whether each block's recorded arguments are the previous block's output plus the same
  other arguments (checked on one batch: the structure for every pair, the values of the
  other arguments for every pair, the output-is-input for the first pair, which costs a
  compile and a block forward)."""
  for prev, nxt in itertools.pairwise(blocks):
    a, b = calls[prev], calls[nxt]
    if a.treedef != b.treedef or a.static != b.static or len(found[prev]) != len(found[nxt]):
      return False
    if not found[prev] or found[prev][0].shape != found[nxt][0].shape:
      return False
    if any(not np.array_equal(x, y) for x, y in zip(found[prev][1:], found[nxt][1:])):
      return False
  if len(blocks) < 2:
    return bool(found[blocks[0]])
  chain = Chain(calls, [list(found[blocks[0]])], None, rules)
  chain.advance(params, blocks[0])
  if not _is_array(chain.inputs[0][0]):
    return False
  out, want = np.asarray(chain.inputs[0][0]), np.asarray(found[blocks[1]][0])
  if out.shape != want.shape:
    return False
  return bool(np.max(np.abs(out - want)) <= _TOLERANCE * max(1.0, float(np.max(np.abs(want)))))
