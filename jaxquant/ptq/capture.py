"""Calibration capture: what enters each quantized layer, accumulated on the fly.

Layer-sequential like the GPTQ reference, at the granularity of blocks (a transformer layer):
the model is run over the calibration batches once per block, with every earlier block
already replaced by its quantized weights, and only the current block's layers accumulate
``XᵀX`` (or any other observer). Memory stays at one accumulator per layer of the block.

Padding is not data: with ``row_mask(batch) -> [..]`` (e.g. the attention mask ``[B, S]``)
observers see which rows of ``x [..., d_in]`` are real and count only those.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.flax import quantize_model
from jaxquant.rules import Rule

# A block is the path up to the first numbered layer component: encoder/layer_3, layers_0...
DEFAULT_BLOCK = r"^(.*?(?:^|/)(?:layer|layers|block|blocks|h)_?\d+)(?:/|$)"

Observer = Callable[..., Any]  # (path, previous or None, x, mask or None) -> new or None
RowMask = Callable[[tuple], jax.Array]


def block_of(path: str, pattern: str = DEFAULT_BLOCK) -> str:
  """The block a kernel path belongs to (its own parent folder when no block matches)."""
  m = re.search(pattern, path)
  return m.group(1) if m else path.rsplit("/", 2)[0]


def _rows(x: jax.Array) -> jax.Array:
  return x.reshape(-1, x.shape[-1]).astype(jnp.float32)


def _weights(x: jax.Array, mask: jax.Array | None) -> jax.Array:
  """``[rows]`` 0/1 weights of `x`'s rows (all ones without a mask)."""
  if mask is None:
    return jnp.ones(x.size // x.shape[-1], jnp.float32)
  return jnp.broadcast_to(mask, x.shape[:-1]).reshape(-1).astype(jnp.float32)


def hessian_observer(paths: Iterable[str]) -> Observer:
  """Accumulates ``{"h": Σ xᵀx, "n": rows}`` over the real rows of the inputs
  ``x [..., d_in]`` of `paths`."""
  wanted = frozenset(paths)

  def observe(path, previous, x, mask=None):
    if path not in wanted:
      return None
    rows, m = _rows(x), _weights(x, mask)
    h = (rows * m[:, None]).T @ rows
    n = jnp.sum(m)
    if previous is None:
      return {"h": h, "n": n}
    return {"h": previous["h"] + h, "n": previous["n"] + n}

  return observe


def activation_observer(paths: Iterable[str]) -> Observer:
  """Per-channel ``Σ|x|``, ``max|x|`` and the row count over the real rows of the inputs
  ``x [..., d_in]`` of `paths` (SmoothQuant)."""
  wanted = frozenset(paths)

  def observe(path, previous, x, mask=None):
    if path not in wanted:
      return None
    m = _weights(x, mask)
    a = jnp.abs(_rows(x)) * m[:, None]
    current = {"abs_sum": jnp.sum(a, 0), "abs_max": jnp.max(a, 0), "n": jnp.sum(m)}
    if previous is None:
      return current
    return {
      "abs_sum": previous["abs_sum"] + current["abs_sum"],
      "abs_max": jnp.maximum(previous["abs_max"], current["abs_max"]),
      "n": previous["n"] + current["n"],
    }

  return observe


def with_row_mask(observer: Observer, row_mask, batch: tuple) -> Observer:
  """`observer` with ``mask = row_mask(batch)`` as its fourth argument (as is without one)."""
  if row_mask is None:
    return observer
  mask = row_mask(batch)
  return lambda path, previous, x: observer(path, previous, x, mask)


def capture(
  model,
  params: dict,
  rules: Sequence[Rule],
  batches: Sequence[tuple],
  observer: Observer,
  row_mask: RowMask | None = None,
) -> dict[str, Any]:
  """Runs the Linen `model` on every batch (argument tuples for ``apply``) and returns what
  `observer` accumulated per kernel path. The forward is float (calibrate mode).

  With `row_mask`, the observer is called as ``observer(path, previous, x, mask)`` where
  ``mask = row_mask(batch)`` broadcasts against ``x.shape[:-1]`` (1 = a real row).
  """
  cal = quantize_model(model, rules, "calibrate")

  def step(p, acc, *args):
    obs = with_row_mask(observer, row_mask, args)
    return cal.apply({"params": p}, *args, stats=acc, observer=obs)[1]

  jitted = jax.jit(step)
  params = jax.device_put(params)  # once, not on every call
  acc = None
  for batch in batches:
    acc = jitted(params, acc, *batch)
  return acc or {}


def collect_inputs(
  model,
  params: dict,
  rules: Sequence[Rule],
  batches: Sequence[tuple],
  paths: Iterable[str],
  row_mask: RowMask | None = None,
) -> dict[str, np.ndarray]:
  """Every real input row of the layers `paths` over all batches: ``{path: [n, d_in]}``
  float32 (AWQ's search data). The forward is float (calibrate mode)."""
  wanted = frozenset(paths)
  cal = quantize_model(model, rules, "calibrate")

  def step(p, *args):
    mask = None if row_mask is None else row_mask(args)

    def observe(path, previous, x):
      return {"x": _rows(x), "m": _weights(x, mask)} if path in wanted else None

    return cal.apply({"params": p}, *args, stats=None, observer=observe)[1]

  jitted = jax.jit(step)
  params = jax.device_put(params)  # once, not on every call
  out: dict[str, list[np.ndarray]] = {}
  for batch in batches:
    for path, got in jitted(params, *batch).items():
      x, m = np.asarray(got["x"]), np.asarray(got["m"])
      out.setdefault(path, []).append(x[m > 0])
  return {path: np.concatenate(rows) for path, rows in out.items()}


def execution_order(model, params, rules: Sequence[Rule], batch: tuple, paths) -> list[str]:
  """Kernel paths among `paths` in the order the model calls their layers (one trace: the
  observer runs in call order while tracing, whereas a jitted dict comes back key-sorted,
  which would put ``layers_10`` before ``layers_2``)."""
  wanted = set(paths)
  seen: dict[str, None] = {}

  def observe(path, previous, x, *_):
    if path in wanted:
      seen[path] = None
    return None

  capture(model, params, rules, [batch], observe)
  return list(seen)


def blocks_in_order(order: Sequence[str], pattern: str = DEFAULT_BLOCK) -> list[list[str]]:
  """`order` cut into consecutive blocks by `block_of`, in order of first appearance."""
  blocks: dict[str, list[str]] = {}
  for path in order:
    blocks.setdefault(block_of(path, pattern), []).append(path)
  return list(blocks.values())
