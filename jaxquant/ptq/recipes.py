"""Apply a recipe's method: ``(recipe, model, params, calibration batches) -> qparams``."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant import mixed
from jaxquant.numerics import dequantize, quantize
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


def output_errors(model, params, paths, batches, spec, output_fn=None) -> dict[str, float]:
  """Mean squared change of the model's output when each layer alone is quantized by `spec`
  (round to nearest) — sensitivity measured where it matters, downstream amplification
  included. ``output_fn(outputs, batch)`` picks what to compare (default: the outputs)."""
  output_fn = output_fn or (lambda out, batch: out)
  apply = jax.jit(lambda p, *batch: output_fn(model.apply({"params": p}, *batch), batch))
  references = [apply(params, *b) for b in batches]
  leaves = dict(named_leaves(params))
  out = {}
  for path in paths:
    w = dequantize(quantize(leaves[path], spec))
    trial = map_leaves(lambda p, v, w=w, path=path: w if p == path else v, params)
    out[path] = float(np.mean([float(jnp.mean((apply(trial, *b) - r) ** 2))
                               for b, r in zip(batches, references)]))  # fmt: skip
  return out


def choose_mixed_rules(model, params, rules, batches, avg_bits: float,
                       sensitivity: str = "output", output_fn=None,
                       sensitivity_batches: int = 2) -> tuple[list[Rule], dict]:  # fmt: skip
  """Rules with a width per layer (see `jaxquant.mixed`).

  ``sensitivity="hessian"`` ranks layers by ``tr(ΔWᵀHΔW)`` alone; ``"output"`` (default)
  measures the model-output error of dropping each layer alone to 4 bits and scales the
  Hessian proxy of its 8- and 16-bit errors by the same factor.
  """
  targets = [r.path for r in plan(params, rules).quantized if gptq_eligible(r.spec, r.shape)]
  used = execution_order(model, params, rules, batches[0], targets)
  hessians = capture(model, params, rules, batches, hessian_observer(used))
  leaves = {p: np.asarray(v) for p, v in named_leaves(params)}
  bits, errors = mixed.choose_widths(leaves, hessians, avg_bits)
  sizes = {p: leaves[p].size for p in bits}
  if sensitivity == "output":
    measured = output_errors(model, params, used, batches[:sensitivity_batches],
                             mixed.CANDIDATES[4], output_fn)  # fmt: skip
    errors = {p: {b: e * measured[p] / max(es[4], 1e-30) for b, e in es.items()}
              for p, es in errors.items()}  # fmt: skip
    bits = mixed.allocate(sizes, errors, avg_bits)
  elif sensitivity != "hessian":
    raise ValueError(f"sensitivity must be 'output' or 'hessian', got {sensitivity!r}.")
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
    output_fn=None,
) -> Quantized:
  """Quantizes `params` by `recipe`. Data-driven methods need the Linen `model` and
  calibration `batches` (argument tuples for ``model.apply``); `output_fn(outputs, batch)`
  is what mixed precision compares when it measures sensitivity (default: the outputs)."""
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
  sensitivity = options.pop("sensitivity", "output")
  mixed_rules, info = choose_mixed_rules(model, params, rules, batches, avg_bits, sensitivity,
                                         output_fn)  # fmt: skip
  q, _ = gptq_params(model, params, mixed_rules, batches, config=_gptq_config(options),
                     progress=progress)  # fmt: skip
  return Quantized(q, tuple(mixed_rules), info)
