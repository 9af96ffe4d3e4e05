"""Automatic mixed precision: per-layer widths from {4, 8, 16} bits under an average budget.

Sensitivity of layer l at width b is the output error that quantizing it alone adds on the
calibration inputs, through the layer's Hessian: ``e_l(b) = tr(ΔWᵀ H ΔW) / n`` with
``ΔW = W − Q_b(W)`` and ``H = XᵀX``. A greedy allocation then starts every layer at 4 bits and
repeatedly buys the upgrade (4→8 or 8→16) with the largest error drop per added bit until the
parameter-weighted average reaches the budget. The result is an ordinary rule list.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from jaxquant.numerics import dequantize, quantize
from jaxquant.rules import Rule
from jaxquant.spec import QuantSpec, as_spec

CANDIDATES: dict[int, str] = {4: "int4:g128:asym", 8: "int8", 16: "bf16"}


def sensitivity(w: np.ndarray, h: np.ndarray, n: float, spec: QuantSpec) -> float:
  """``tr(ΔWᵀ H ΔW) / n`` for ``w [in, out]`` and ``h = XᵀX [in, in]``."""
  wj = jnp.asarray(w, jnp.float32)
  dw = wj - dequantize(quantize(wj, spec), jnp.float32)
  return float(jnp.sum(dw * (jnp.asarray(h) @ dw)) / n)


def allocate(
    sizes: Mapping[str, int], errors: Mapping[str, Mapping[int, float]], avg_bits: float
) -> dict[str, int]:
  """Widths per layer minimising ``Σ e_l(b_l)`` (greedily) with ``Σ n_l b_l ≤ avg_bits Σ n_l``."""
  widths = sorted(next(iter(errors.values())))
  if avg_bits < widths[0]:
    raise ValueError(f"avg_bits={avg_bits} is below the narrowest width {widths[0]}.")
  bits = {p: widths[0] for p in sizes}
  budget = avg_bits * sum(sizes.values()) - widths[0] * sum(sizes.values())
  while True:
    best = None
    for p, b in bits.items():
      i = widths.index(b)
      if i + 1 == len(widths):
        continue
      nxt = widths[i + 1]
      cost = sizes[p] * (nxt - b)
      if cost > budget:
        continue
      gain = (errors[p][b] - errors[p][nxt]) / cost
      if best is None or gain > best[0]:
        best = (gain, p, nxt, cost)
    if best is None:
      return bits
    _, p, nxt, cost = best
    bits[p] = nxt
    budget -= cost


def mixed_rules(
    bits: Mapping[str, int],
    candidates: Mapping[int, str] = CANDIDATES,
    base: Sequence[Rule] = (),
) -> list[Rule]:
  """One exact-path rule per allocated layer (in front of `base`), editable and saveable."""
  rules = [Rule(f"^{re.escape(p)}$", candidates[b]) for p, b in bits.items()]
  return rules + list(base)


def average_bits(bits: Mapping[str, int], sizes: Mapping[str, int]) -> float:
  total = sum(sizes[p] for p in bits)
  return sum(bits[p] * sizes[p] for p in bits) / total


def choose_widths(
    params_leaves: Mapping[str, np.ndarray],
    hessians: Mapping[str, dict],
    avg_bits: float,
    candidates: Mapping[int, str] = CANDIDATES,
) -> tuple[dict[str, int], dict[str, dict[int, float]]]:
  """``(bits per path, errors per path and width)`` for the layers in `hessians`."""
  specs = {b: as_spec(s) for b, s in candidates.items()}
  errors = {
      p: {b: sensitivity(params_leaves[p], np.asarray(acc["h"]), float(acc["n"]), spec)
          for b, spec in specs.items()}
      for p, acc in hessians.items()
  }  # fmt: skip
  sizes = {p: int(np.prod(np.shape(params_leaves[p]))) for p in hessians}
  return allocate(sizes, errors, avg_bits), errors
