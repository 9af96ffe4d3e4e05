"""Automatic mixed precision: a format per layer under an average-bits budget.

Each layer ``l`` has a few choices ``c`` (4-bit with groups of 128, 64 or 32, int8 per channel,
bf16), each with an error ``e_l(c)`` — the model-output error when that layer alone is
quantized by ``c`` (`choose_rules`), or its Hessian proxy
``tr(ΔWᵀ H ΔW) / n`` with ``ΔW = W − Q_c(W)`` and ``H = XᵀX`` — and a cost ``b_l(c)``, the
bits it stores **including its scales and zero points** (`stored_bits`: int4 g128 with f16
scales and int8 zero points is 4.1875 bits a weight, g64 4.375, g32 4.75, int8 per channel
8 + 16/d_in; with f32 scales 4.3125, 4.625, 5.25). `allocate` then solves the multiple-choice
knapsack

    min Σ_l e_l(c_l)   subject to   Σ_l b_l(c_l) ≤ avg_bits · Σ_l n_l

exactly (dynamic programming on costs rounded up to a fine grid, so the budget always holds).
The result is an ordinary rule list. As a recipe step (``mixed``, a selector in
`jaxquant.ptq.steps`) it runs before the recipe's quantizer, which it also uses to measure
each 4-bit choice (GPTQ in the shipped ``mixed:avg_bits=N``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.numerics import dequantize, quantize
from jaxquant.ptq.capture import capture, execution_order, hessian_observer
from jaxquant.ptq.driver import CalibrationSet
from jaxquant.ptq.steps import Kind, StatRequest, register
from jaxquant.rules import Rule, default_rules
from jaxquant.spec import QuantSpec, as_spec, check_group_size
from jaxquant.transforms import Plan, map_leaves, named_leaves

CANDIDATES: dict[int, str] = {4: "int4:g128:asym", 8: "int8", 16: "bf16"}
# 4-bit choices clip each group's range by least squared error (GPTQ's "mse" grid); scales are
# stored as float16, as GPTQ/AWQ checkpoints keep them.
CHOICES: tuple[str, ...] = (
  "int4:g128:asym:mse:scale=f16",
  "int4:g64:asym:mse:scale=f16",
  "int4:g32:asym:mse:scale=f16",
  "int8:scale=f16",
  "bf16",
)


def sensitivity(w: np.ndarray, h: np.ndarray, n: float, spec: QuantSpec) -> float:
  """``tr(ΔWᵀ H ΔW) / n`` for ``w [in, out]`` and ``h = XᵀX [in, in]``."""
  wj = jnp.asarray(w, jnp.float32)
  dw = wj - dequantize(quantize(wj, spec), jnp.float32)
  return float(jnp.sum(dw * (jnp.asarray(h) @ dw)) / n)


def stored_bits(spec: str | QuantSpec, shape) -> int:
  """Bits a kernel of `shape` stores under `spec`: values, scales and zero points."""
  return 8 * as_spec(spec).nbytes(tuple(shape))


def allocate(
  sizes: Mapping[str, int],
  errors: Mapping[str, Mapping],
  avg_bits: float,
  costs: Mapping[str, Mapping] | None = None,
  resolution: int = 1 << 14,
):
  """The choice per layer minimising ``Σ_l e_l(c_l)`` with ``Σ_l cost_l(c_l) ≤ avg_bits Σ n_l``.

  `errors` maps each layer to ``{choice: error}``; `costs` to ``{choice: bits}`` (default: a
  choice is its width in bits, ``n_l · c``, no overhead). Exact multiple-choice knapsack by
  dynamic programming over the budget in units of the costs' greatest common divisor, or, if
  that needs more than `resolution` steps, of ``budget / resolution`` with costs rounded up.
  """
  paths = list(sizes)
  if costs is None:
    costs = {p: {c: sizes[p] * c for c in errors[p]} for p in paths}
  budget = avg_bits * sum(sizes.values())
  cheapest = sum(min(costs[p].values()) for p in paths)
  if cheapest > budget * (1 + 1e-9):
    raise ValueError(
      f"avg_bits={avg_bits} is below the cheapest choice per layer "
      f"({cheapest / sum(sizes.values()):.4g} bits on average)."
    )
  unit = float(
    math.gcd(*(int(c) for cs in costs.values() for c in cs.values() if float(c).is_integer())) or 1
  )
  exact = all(float(c).is_integer() for cs in costs.values() for c in cs.values())
  if not exact or budget / unit > resolution:
    unit = budget / resolution
  resolution = int(budget // unit)
  best = np.zeros(resolution + 1)  # least error with at most b units spent
  picks = []
  for p in paths:
    choices = list(errors[p])
    new = np.full(resolution + 1, np.inf)
    pick = np.zeros(resolution + 1, np.int64)
    for i, c in enumerate(choices):
      k = int(np.ceil(costs[p][c] / unit - 1e-9))
      if k > resolution:
        continue
      cand = np.full(resolution + 1, np.inf)
      cand[k:] = best[: resolution + 1 - k] + errors[p][c]
      better = cand < new
      new, pick = np.where(better, cand, new), np.where(better, i, pick)
    best = new
    picks.append((choices, pick, [int(np.ceil(costs[p][c] / unit - 1e-9)) for c in choices]))
  if not np.isfinite(best).any():
    # Rounding costs up to the grid left no pick inside it, although the cheapest pick fits
    # (checked above): the budget sits at the cheapest average, so the cheapest pick it is.
    return {
      p: min(errors[p], key=functools.partial(_cost_then_error, costs[p], errors[p])) for p in paths
    }
  b = int(np.argmin(best))
  out = {}
  for p, (choices, pick, units) in zip(reversed(paths), reversed(picks)):
    i = int(pick[b])
    out[p] = choices[i]
    b -= units[i]
  return {p: out[p] for p in paths}


def _cost_then_error(costs: Mapping, errors: Mapping, choice) -> tuple:
  return costs[choice], errors[choice]


def mixed_rules(
  bits: Mapping[str, int],
  candidates: Mapping[int, str] = CANDIDATES,
  base: Sequence[Rule] = (),
) -> list[Rule]:
  """One exact-path rule per allocated layer (in front of `base`), editable and saveable.
  A choice is a width looked up in `candidates` or a spec string."""
  rules = [
    Rule(f"^{re.escape(p)}$", candidates[b] if isinstance(b, int) else b) for p, b in bits.items()
  ]
  return rules + list(base)


def average_bits(bits: Mapping[str, int], sizes: Mapping[str, int]) -> float:
  """Parameter-weighted mean of nominal widths (no scale or zero-point overhead)."""
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
    p: {
      b: sensitivity(params_leaves[p], np.asarray(acc["h"]), float(acc["n"]), spec)
      for b, spec in specs.items()
    }
    for p, acc in hessians.items()
  }
  sizes = {p: int(np.prod(np.shape(params_leaves[p]))) for p in hessians}
  return allocate(sizes, errors, avg_bits), errors


# --------------------------------------------------------------------------- the recipe step
def base_rules() -> list[Rule]:
  """The rules a ``mixed:avg_bits=N`` recipe starts from (every kernel a candidate; groups of
  32, which fit the most shapes, where the selector leaves a kernel alone)."""
  return default_rules(CHOICES[2])


def fits(spec: str | QuantSpec, shape: tuple[int, ...]) -> bool:
  """Whether `spec` can quantize a tensor of `shape` (its groups divide their axis)."""
  try:
    check_group_size(as_spec(spec), tuple(shape))
  except ValueError:
    return False
  return True


def output_errors(model, params, trials, batches, output_fn=None) -> dict:
  """Mean squared change of the model's output for each trial ``{key: (path, weights)}``,
  the layer at `path` alone replaced by `weights` — sensitivity measured where it matters,
  downstream amplification included. ``output_fn(outputs, batch)`` picks what to compare
  (default: the outputs)."""
  compare: Callable[[Any, tuple], Any] = output_fn or (lambda out, batch: out)
  params = jax.device_put(params)  # once, not on every call
  apply = jax.jit(lambda p, *batch: compare(model.apply({"params": p}, *batch), batch))
  references = [apply(params, *b) for b in batches]
  out = {}
  for key, (path, w) in trials.items():
    w = jnp.asarray(w)
    trial = map_leaves(functools.partial(_replace_at, path, w), params)
    out[key] = float(
      np.mean([float(jnp.mean((apply(trial, *b) - r) ** 2)) for b, r in zip(batches, references)])
    )
  return out


def _replace_at(path: str, value, p: str, old):
  """`value` at `path`, the old leaf elsewhere (for `map_leaves`)."""
  return value if p == path else old


def alone_weights(w: np.ndarray, h: np.ndarray, spec, quantizer: Any) -> np.ndarray:
  """What kernel ``w [in, out]`` serves as under `spec` when it alone is quantized: by the
  recipe's `quantizer` on its float-input ``h = XᵀX`` below 8 bits where it applies, round to
  nearest otherwise (at 8 bits and up the error is already small)."""
  spec = as_spec(spec)
  needs = getattr(quantizer, "needs", None)
  takes = needs is None or needs.kind == "hessian"
  if spec.bits < 8 and quantizer is not None and takes and quantizer.eligible(spec, w.shape):
    q = quantizer(w, None if needs is None else {"h": h}, spec)[0]
  else:
    q = quantize(w, spec)
  return np.asarray(dequantize(q, jnp.float32))


@register("mixed")
@dataclasses.dataclass(frozen=True)
class Mixed:
  """Per-layer formats from `CHOICES` under an ``avg_bits`` budget of stored bits.

  Every layer is quantized alone by every choice that fits its shape (`alone_weights`).
  ``sensitivity="output"`` scores a choice by the model-output error it causes on the first
  `sensitivity_batches` batches (one forward per layer and choice); ``"hessian"`` by
  ``tr(ΔWᵀHΔW) / n`` alone; ``"auto"`` (default) takes ``output`` when there are at most
  `output_trials` layer-choice pairs (a 6-layer encoder: 36 layers × 5 = 180) and ``hessian``
  beyond (a 30-layer LLM: 210 layers, where per-trial forwards would take hours on a CPU).
  ``trials``: each trial quantized by the recipe's quantizer (``"quantizer"``, e.g. GPTQ) or
  rounded to nearest (``"rtn"``); ``"auto"`` uses the quantizer up to `output_trials` pairs.
  """

  kind: ClassVar[Kind] = "select"
  needs: ClassVar[StatRequest | None] = StatRequest("hessian")
  avg_bits: float = 5.0
  sensitivity: str = "auto"
  sensitivity_batches: int = 4
  output_trials: int = 256
  trials: str = "auto"
  choices: tuple[str, ...] = CHOICES

  def __post_init__(self):
    if self.sensitivity not in ("auto", "output", "hessian"):
      raise ValueError(
        f"sensitivity must be 'auto', 'output' or 'hessian', got {self.sensitivity!r}."
      )
    if self.trials not in ("auto", "quantizer", "rtn"):
      raise ValueError(f"trials must be 'auto', 'quantizer' or 'rtn', got {self.trials!r}.")
    object.__setattr__(self, "avg_bits", float(self.avg_bits))
    object.__setattr__(self, "choices", tuple(self.choices))

  def __call__(
    self, params, plan: Plan, data: CalibrationSet, quantizer: Any
  ) -> tuple[list[Rule], dict]:
    return choose_rules(params, plan, data, self, quantizer)


def choose_rules(
  params, plan: Plan, data: CalibrationSet, step: Mixed, quantizer: Any
) -> tuple[list[Rule], dict]:
  """Rules with a format per layer from ``step.choices``, in front of the plan's rules; and
  ``{"specs", "bits", "average_bits" (stored), "nominal_bits", "errors"}``."""
  rules, choices = plan.rules, step.choices
  targets = [r.path for r in plan.quantized if len(r.shape) == 2 and r.batch_dims == 0]
  used = execution_order(data.model, params, rules, data.batches[0], targets)
  hessians = capture(data.model, params, rules, data.batches, hessian_observer(used), data.row_mask)
  leaves = {p: np.asarray(v) for p, v in named_leaves(params)}
  h = {p: np.asarray(hessians[p]["h"]) for p in used}  # off the device once per layer
  allowed = {p: [c for c in choices if fits(c, leaves[p].shape)] for p in used}
  few = sum(map(len, allowed.values())) <= step.output_trials
  by_quantizer = step.trials == "quantizer" or (step.trials == "auto" and few)
  trial_quantizer = quantizer if by_quantizer else None
  trials = {
    (p, c): (p, alone_weights(leaves[p], h[p], c, trial_quantizer))
    for p in used
    for c in allowed[p]
  }
  sensitivity = step.sensitivity
  if sensitivity == "auto":  # one forward per trial, unless there are too many
    sensitivity = "output" if few else "hessian"
  if sensitivity == "output":
    errors = output_errors(
      data.model, params, trials, data.batches[: step.sensitivity_batches], data.output_fn
    )
  else:
    errors = {
      (p, c): float(np.sum((dw := leaves[p] - w) * (h[p] @ dw)) / float(hessians[p]["n"]))
      for (p, c), (_, w) in trials.items()
    }
  sizes = {p: leaves[p].size for p in used}
  per_layer = {p: {c: errors[p, c] for c in allowed[p]} for p in used}
  costs = {p: {c: stored_bits(c, leaves[p].shape) for c in allowed[p]} for p in used}
  chosen = allocate(sizes, per_layer, step.avg_bits, costs)
  bits = {p: as_spec(c).bits for p, c in chosen.items()}
  stored = sum(costs[p][c] for p, c in chosen.items()) / sum(sizes.values())
  info = {
    "specs": chosen,
    "bits": bits,
    "average_bits": stored,
    "nominal_bits": average_bits(bits, sizes),
    "errors": {p: {str(c): e for c, e in es.items()} for p, es in per_layer.items()},
    "sensitivity": sensitivity,
    "trials": "quantizer" if trial_quantizer is not None else "rtn",
  }
  return mixed_rules(chosen, base=rules), info
