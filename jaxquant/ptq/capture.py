"""Calibration capture: what enters each quantized layer, accumulated on the fly.

Layer-sequential like the GPTQ reference, at the granularity of blocks (a transformer layer):
the model is run over the calibration batches once per block, with every earlier block
already replaced by its quantized weights, and only the current block's layers accumulate
``XᵀX`` (or any other observer). Memory stays at one accumulator per layer of the block.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxquant.flax import quantize_model
from jaxquant.rules import Rule

# A block is the path up to the first numbered layer component: encoder/layer_3, layers_0...
DEFAULT_BLOCK = r"^(.*?(?:^|/)(?:layer|layers|block|blocks|h)_?\d+)(?:/|$)"

Observer = Callable[[str, Any, jax.Array], Any]


def block_of(path: str, pattern: str = DEFAULT_BLOCK) -> str:
  """The block a kernel path belongs to (its own parent folder when no block matches)."""
  m = re.search(pattern, path)
  return m.group(1) if m else path.rsplit("/", 2)[0]


def _rows(x: jax.Array) -> jax.Array:
  return x.reshape(-1, x.shape[-1]).astype(jnp.float32)


def hessian_observer(paths: Iterable[str]) -> Observer:
  """Accumulates ``{"h": Σ xᵀx, "n": rows}`` over the inputs ``x [..., d_in]`` of `paths`."""
  wanted = frozenset(paths)

  def observe(path, previous, x):
    if path not in wanted:
      return None
    rows = _rows(x)
    h = rows.T @ rows
    n = jnp.asarray(rows.shape[0], jnp.float32)
    if previous is None:
      return {"h": h, "n": n}
    return {"h": previous["h"] + h, "n": previous["n"] + n}

  return observe


def activation_observer(paths: Iterable[str], rows_per_batch: int = 128) -> Observer:
  """Per-channel ``Σ|x|``, ``max|x|``, row count, and a few rows of ``x`` per batch (AWQ,
  SmoothQuant)."""
  wanted = frozenset(paths)

  def observe(path, previous, x):
    if path not in wanted:
      return None
    rows = _rows(x)
    step = max(rows.shape[0] // rows_per_batch, 1)
    sample = rows[::step][:rows_per_batch]
    current = {"abs_sum": jnp.sum(jnp.abs(rows), 0), "abs_max": jnp.max(jnp.abs(rows), 0),
               "n": jnp.asarray(rows.shape[0], jnp.float32), "rows": [sample]}  # fmt: skip
    if previous is None:
      return current
    return {"abs_sum": previous["abs_sum"] + current["abs_sum"],
            "abs_max": jnp.maximum(previous["abs_max"], current["abs_max"]),
            "n": previous["n"] + current["n"], "rows": previous["rows"] + [sample]}  # fmt: skip

  return observe


def capture(
    model,
    params: dict,
    rules: Sequence[Rule],
    batches: Sequence[tuple],
    observer: Observer,
) -> dict[str, Any]:
  """Runs the Linen `model` on every batch (argument tuples for ``apply``) and returns what
  `observer` accumulated per kernel path. The forward is float (calibrate mode)."""
  cal = quantize_model(model, rules, "calibrate")

  def step(p, acc, *args):
    return cal.apply({"params": p}, *args, stats=acc, observer=observer)[1]

  jitted = jax.jit(step)
  acc = None
  for batch in batches:
    acc = jitted(params, acc, *batch)
  return acc or {}
