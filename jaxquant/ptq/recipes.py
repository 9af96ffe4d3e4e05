"""Apply a recipe's method: ``(recipe, model, params, calibration batches) -> qparams``."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from jaxquant import mixed
from jaxquant.ptq.capture import capture, hessian_observer
from jaxquant.ptq.gptq import GPTQConfig
from jaxquant.ptq.hqq import hqq_quantize
from jaxquant.ptq.sequential import execution_order, gptq_eligible, gptq_params
from jaxquant.ptq.smooth import SmoothGroup, awq_params, smoothquant_params
from jaxquant.rules import Recipe, Rule
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


def choose_mixed_rules(model, params, rules, batches, avg_bits: float) -> tuple[list[Rule], dict]:
  """Rules with a width per layer (see `jaxquant.mixed`) from calibration Hessians."""
  targets = [r.path for r in plan(params, rules).quantized if gptq_eligible(r.spec, r.shape)]
  used = execution_order(model, params, rules, batches[0], targets)
  hessians = capture(model, params, rules, batches, hessian_observer(used))
  leaves = {p: np.asarray(v) for p, v in named_leaves(params)}
  bits, errors = mixed.choose_widths(leaves, hessians, avg_bits)
  sizes = {p: leaves[p].size for p in bits}
  info = {"bits": bits, "average_bits": mixed.average_bits(bits, sizes),
          "errors": {p: {str(b): e for b, e in es.items()} for p, es in errors.items()}}  # fmt: skip
  return mixed.mixed_rules(bits, base=rules), info


def apply_recipe(
    recipe: Recipe,
    params: dict,
    model=None,
    batches: Sequence[tuple] | None = None,
    smoothing_groups: Sequence[SmoothGroup] | None = None,
    progress: bool = False,
) -> Quantized:
  """Quantizes `params` by `recipe`. Data-driven methods need the Linen `model` and
  calibration `batches` (argument tuples for ``model.apply``)."""
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
                          progress=progress)  # fmt: skip
    return Quantized(q, rules, {"damp": {p: i["damp"] for p, i in info.items()}})
  if method == "awq":
    q, info = awq_params(model, params, rules, batches, groups=smoothing_groups, **options)
    return Quantized(q, rules, info, info.pop("reference"))
  if method == "smoothquant":
    q, info = smoothquant_params(model, params, rules, batches, groups=smoothing_groups,
                                 **options)  # fmt: skip
    return Quantized(q, rules, info, info.pop("reference"))
  # mixed: widths from Hessian sensitivities, then GPTQ for the integer layers
  avg_bits = float(options.pop("avg_bits", 5.0))
  mixed_rules, info = choose_mixed_rules(model, params, rules, batches, avg_bits)
  q, _ = gptq_params(model, params, mixed_rules, batches, config=_gptq_config(options),
                     progress=progress)  # fmt: skip
  return Quantized(q, tuple(mixed_rules), info)
