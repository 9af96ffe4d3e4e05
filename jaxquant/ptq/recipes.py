"""Apply a recipe's method: ``(recipe, model, params, calibration batches) -> qparams``."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant import mixed
from jaxquant.numerics import dequantize, quantize
from jaxquant.ptq.capture import capture, hessian_observer
from jaxquant.ptq.gptq import GPTQConfig, gptq_quantize
from jaxquant.ptq.hqq import hqq_quantize
from jaxquant.ptq.sequential import execution_order, gptq_eligible, gptq_params
from jaxquant.ptq.smooth import SmoothGroup, awq_params, smoothquant_params
from jaxquant.rules import Recipe, Rule
from jaxquant.spec import as_spec
from jaxquant.transforms import map_leaves, named_leaves, plan, quantize_params

NEEDS_DATA = ("gptq", "awq", "smoothquant", "mixed")


@dataclasses.dataclass
class Quantized:
  """What applying a recipe gives: quantized params, the rules that serve them, and notes."""

  qparams: dict
  rules: tuple[Rule, ...]
  info: dict
  reference: dict | None = None  # the float weights that were quantized, if not the inputs


def _gptq_config(options: dict) -> GPTQConfig:
  known = {f.name for f in dataclasses.fields(GPTQConfig)}
  unknown = set(options) - known
  if unknown:
    raise ValueError(f"Unknown GPTQ options {sorted(unknown)}; use {sorted(known)}.")
  return GPTQConfig(**options)


def _hqq(params: dict, rules: Sequence[Rule], options: dict) -> dict:
  targets = {r.path: r.spec for r in plan(params, rules).quantized
             if r.spec.info.kind == "int" and not r.spec.symmetric}  # fmt: skip
  leaves = dict(named_leaves(params))
  done = {p: hqq_quantize(leaves[p], spec, **options) for p, spec in targets.items()}
  return quantize_params(map_leaves(lambda path, v: done.get(path, v), params), rules)


def output_errors(model, params, trials, batches, output_fn=None) -> dict:
  """Mean squared change of the model's output for each trial ``{key: (path, weights)}``,
  the layer at `path` alone replaced by `weights` — sensitivity measured where it matters,
  downstream amplification included. ``output_fn(outputs, batch)`` picks what to compare
  (default: the outputs)."""
  output_fn = output_fn or (lambda out, batch: out)
  params = jax.device_put(params)  # once, not on every call
  apply = jax.jit(lambda p, *batch: output_fn(model.apply({"params": p}, *batch), batch))
  references = [apply(params, *b) for b in batches]
  out = {}
  for key, (path, w) in trials.items():
    w = jnp.asarray(w)
    trial = map_leaves(lambda p, v, w=w, path=path: w if p == path else v, params)
    out[key] = float(np.mean([float(jnp.mean((apply(trial, *b) - r) ** 2))
                              for b, r in zip(batches, references)]))  # fmt: skip
  return out


def alone_weights(w: np.ndarray, h: np.ndarray, spec, config: GPTQConfig) -> np.ndarray:
  """What kernel ``w [in, out]`` serves as under `spec` when it alone is quantized: GPTQ on
  its float-input ``h = XᵀX`` below 8 bits, round to nearest otherwise (at 8 bits and up the
  error is already small, and GPTQ only lowers it further)."""
  spec = as_spec(spec)
  gptq = spec.bits < 8 and gptq_eligible(spec, w.shape)
  q = gptq_quantize(w, h, spec, config)[0] if gptq else quantize(w, spec)
  return np.asarray(dequantize(q, jnp.float32))


def choose_mixed_rules(model, params, rules, batches, avg_bits: float,
                       sensitivity: str = "output", output_fn=None,
                       sensitivity_batches: int = 4, choices=mixed.CHOICES,
                       row_mask=None, config: GPTQConfig | None = None,
                       ) -> tuple[list[Rule], dict]:  # fmt: skip
  """Rules with a format per layer from `choices` (see `jaxquant.mixed`).

  Every layer is quantized alone by every choice (`alone_weights`: GPTQ for 4 bits, on its
  Hessian from the float model). ``sensitivity="output"`` (default) scores a
  choice by the model-output error it causes on the first `sensitivity_batches` batches;
  ``"hessian"`` by ``tr(ΔWᵀHΔW) / n`` alone. Costs are stored bits with scales and zero
  points (`mixed.stored_bits`), so ``avg_bits`` is what the kernels really take.
  """
  if sensitivity not in ("output", "hessian"):
    raise ValueError(f"sensitivity must be 'output' or 'hessian', got {sensitivity!r}.")
  config = config or GPTQConfig()
  targets = [r.path for r in plan(params, rules).quantized if gptq_eligible(r.spec, r.shape)]
  used = execution_order(model, params, rules, batches[0], targets)
  hessians = capture(model, params, rules, batches, hessian_observer(used), row_mask)
  leaves = {p: np.asarray(v) for p, v in named_leaves(params)}
  h = {p: np.asarray(hessians[p]["h"]) for p in used}  # off the device once per layer
  trials = {(p, c): (p, alone_weights(leaves[p], h[p], c, config))
            for p in used for c in choices}  # fmt: skip
  if sensitivity == "output":
    errors = output_errors(model, params, trials, batches[:sensitivity_batches], output_fn)
  else:
    errors = {(p, c): float(np.sum((dw := leaves[p] - w) * (h[p] @ dw))
                            / float(hessians[p]["n"])) for (p, c), (_, w) in trials.items()}  # fmt: skip
  sizes = {p: leaves[p].size for p in used}
  per_layer = {p: {c: errors[p, c] for c in choices} for p in used}
  costs = {p: {c: mixed.stored_bits(c, leaves[p].shape) for c in choices} for p in used}
  chosen = mixed.allocate(sizes, per_layer, avg_bits, costs)
  bits = {p: as_spec(c).bits for p, c in chosen.items()}
  stored = sum(costs[p][c] for p, c in chosen.items()) / sum(sizes.values())
  info = {"specs": chosen, "bits": bits, "average_bits": stored,
          "nominal_bits": mixed.average_bits(bits, sizes),
          "errors": {p: {str(c): e for c, e in es.items()} for p, es in per_layer.items()}}  # fmt: skip
  return mixed.mixed_rules(chosen, base=rules), info


MIXED_OPTIONS = ("avg_bits", "sensitivity")  # the rest of a mixed recipe's options are GPTQ's


def resolved_recipe(recipe: Recipe, result: Quantized) -> Recipe:
  """The recipe that reproduces `result` without searching again: for ``mixed``, its chosen
  rule list applied by GPTQ with the same options (save it with ``to_yaml()`` into
  ``configs/`` and edit it at will); any other recipe as it is."""
  if recipe.method != "mixed":
    return recipe
  options = {k: v for k, v in recipe.options.items() if k not in MIXED_OPTIONS}
  chosen = ", ".join(f"{n} {c}" for c, n in sorted(Counter(result.info["specs"].values()).items()))
  description = f"The formats {recipe.name} chose per layer ({chosen}), applied by GPTQ."
  return Recipe(f"{recipe.name} (chosen)", tuple(result.rules), description, "gptq", options)


def apply_recipe(
    recipe: Recipe,
    params: dict,
    model=None,
    batches: Sequence[tuple] | None = None,
    smoothing_groups: Sequence[SmoothGroup] | None = None,
    progress: bool = False,
    output_fn=None,
    row_mask=None,
) -> Quantized:
  """Quantizes `params` by `recipe`. Data-driven methods need the Linen `model` and
  calibration `batches` (argument tuples for ``model.apply``); ``row_mask(batch)`` marks the
  real (non-padding) rows that calibration statistics count (default: all rows);
  `output_fn(outputs, batch)` is what mixed precision compares when it measures sensitivity
  (default: the outputs)."""
  rules, options, method = tuple(recipe.rules), dict(recipe.options), recipe.method
  if method in NEEDS_DATA and (model is None or not batches):
    raise ValueError(
        f"Recipe {recipe.name!r} uses {method}, which needs a runnable model and calibration "
        "batches; quantize the packaged model (--model minilm) or use an rtn/hqq recipe."
    )
  if method == "rtn":
    return Quantized(quantize_params(params, rules, progress=progress), rules, {})
  if method == "hqq":
    return Quantized(_hqq(params, rules, options), rules, {})
  if method == "gptq":
    q, info = gptq_params(model, params, rules, batches, config=_gptq_config(options),
                          progress=progress, row_mask=row_mask)  # fmt: skip
    return Quantized(q, rules, {"damp": {p: i["damp"] for p, i in info.items()}})
  if method == "awq":
    q, info = awq_params(model, params, rules, batches, groups=smoothing_groups,
                         row_mask=row_mask, progress=progress, **options)  # fmt: skip
    return Quantized(q, rules, info, info.pop("reference"))
  if method == "smoothquant":
    q, info = smoothquant_params(model, params, rules, batches, groups=smoothing_groups,
                                 row_mask=row_mask, **options)  # fmt: skip
    return Quantized(q, rules, info, info.pop("reference"))
  # mixed: widths from Hessian sensitivities, then GPTQ for the integer layers
  avg_bits = float(options.pop("avg_bits", 5.0))
  sensitivity = options.pop("sensitivity", "output")
  config = _gptq_config(options)
  mixed_rules, info = choose_mixed_rules(model, params, rules, batches, avg_bits, sensitivity,
                                         output_fn, row_mask=row_mask, config=config)  # fmt: skip
  q, _ = gptq_params(model, params, mixed_rules, batches, config=config, progress=progress,
                     row_mask=row_mask)  # fmt: skip
  return Quantized(q, tuple(mixed_rules), info)
