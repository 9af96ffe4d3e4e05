"""Recipes: a named rule list and the PTQ steps that apply it, shipped as YAML beside this file.

A recipe is the one thing that says *how* a model is quantized: which parameters get which
spec (`jaxquant.rules`), and the chain of registered steps (`jaxquant.ptq.steps`) — selectors,
smoothers, one quantizer — that turns them into QArrays::

    description: AWQ scales, then GPTQ, int4 groups of 128.
    steps:
      - awq: {duo: true, grid: 20, search_rows: 4096}
      - gptq: {act_order: true, damp: 0.01}
    rules:
      - {pattern: 'embed', weight: null, expect_match: false}
      - {pattern: '.*', weight: 'int4:g128:asym:mse:scale=f16'}

``method: NAME`` with ``options: {...}`` is a one-step shorthand (``method: awq`` means the
AWQ scale search then its clip search). `load_recipe` also takes a bare spec string
(``int4:g128``) and ``mixed:avg_bits=N``; `apply_recipe` runs one.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import re
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from jaxquant import mixed, transforms
from jaxquant.ptq.driver import CalibrationSet, needs_data, run
from jaxquant.ptq.steps import make_step
from jaxquant.rules import Rule, default_rules
from jaxquant.spec import QuantSpec
from jaxquant.transforms import Plan

StepEntry = tuple[str, Mapping[str, Any]]


@dataclasses.dataclass(frozen=True)
class Recipe:
  """A named rule list and the steps that apply it (``(name, options)`` pairs, in order)."""

  name: str
  rules: tuple[Rule, ...]
  description: str = ""
  steps: tuple[StepEntry, ...] = (("rtn", {}),)

  def __post_init__(self):
    object.__setattr__(self, "rules", tuple(self.rules))
    object.__setattr__(self, "steps", tuple((n, dict(o)) for n, o in self.steps))
    try:
      self.build()
    except ValueError as e:
      raise ValueError(f"Recipe {self.name!r}: {e}") from None

  def build(self) -> tuple[list[Any], list[Any], Any]:
    """``(selectors, smoothers, quantizer)``: the steps made and checked for order (selectors,
    then smoothers, then at most one quantizer; round to nearest when none is named). Made
    once: the steps are frozen dataclasses."""
    if "_built" not in self.__dict__:
      self.__dict__["_built"] = self._make_steps()  # frozen dataclass: the cache bypasses it
    return self.__dict__["_built"]

  def _make_steps(self) -> tuple[list[Any], list[Any], Any]:
    made = [make_step(n, o) for n, o in self.steps]
    order = {"select": 0, "smooth": 1, "quantize": 2}
    ranks = [order[s.kind] for s in made]
    if ranks != sorted(ranks) or ranks.count(2) > 1:
      raise ValueError(
        f"steps {[n for n, _ in self.steps]} are out of order: write selectors (mixed), then "
        "smoothers (smoothquant, awq), then at most one quantizer (rtn, gptq, awq_clip, hqq)."
      )
    selectors = [s for s in made if s.kind == "select"]
    smoothers = [s for s in made if s.kind == "smooth"]
    quantizers = [s for s in made if s.kind == "quantize"]
    return selectors, smoothers, (quantizers[0] if quantizers else make_step("rtn"))

  @property
  def needs_data(self) -> bool:
    """Whether applying the recipe needs a model and calibration batches."""
    selectors, smoothers, quantizer = self.build()
    return needs_data([*selectors, *smoothers, quantizer])

  @property
  def step_names(self) -> str:
    return " + ".join(n for n, _ in self.steps)

  def to_yaml(self) -> str:
    body = {
      "description": self.description,
      "steps": [{n: dict(o)} for n, o in self.steps],
      "rules": [r.to_dict() for r in self.rules],
    }
    return yaml.safe_dump(body, sort_keys=False, allow_unicode=True)


# --------------------------------------------------------------------------- loading
def recipe_names() -> list[str]:
  """Names of the recipes that ship with jaxquant."""
  files = importlib.resources.files(__name__).iterdir()
  return sorted(p.name[: -len(".yaml")] for p in files if p.name.endswith(".yaml"))


def steps_for_method(method: str, options: Mapping[str, Any]) -> tuple[StepEntry, ...]:
  """The steps a one-step ``method:`` (with its ``options:``) stands for."""
  options = dict(options)
  if method == "awq":
    clip = options.pop("clip", True)
    last = ("awq_clip", {"rows": options.get("search_rows", 4096)}) if clip else ("rtn", {})
    return (("awq", options), last)
  if method == "smoothquant":
    return (("smoothquant", options), ("rtn", {}))
  if method == "mixed":
    own = ("avg_bits", "sensitivity", "sensitivity_batches")
    chosen: dict[str, Any] = {k: options.pop(k) for k in own if k in options}
    return (("mixed", chosen), ("gptq", options))
  return ((method, options),)


def load_recipe(name_or_path: str) -> Recipe:
  """A recipe by shipped name (``w8a8``), YAML path, ``mixed:avg_bits=N``, or bare spec
  string (``int4:g128``: `default_rules` with that weight spec)."""
  path = Path(name_or_path)
  if path.suffix in (".yaml", ".yml"):
    if not path.is_file():
      problem = "is a folder" if path.is_dir() else "does not exist"
      raise FileNotFoundError(f"Recipe file {path} {problem}; give a recipe .yaml file.")
    try:
      text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
      raise ValueError(
        f"Recipe file {path} is not UTF-8 text ({e.reason} at byte {e.start})."
      ) from None
    return parse_recipe(path.stem, text, str(path))
  m = re.fullmatch(r"mixed:avg_bits=(\d+(?:\.\d+)?)", name_or_path)
  if m:
    bits = float(m.group(1))
    return Recipe(
      name_or_path,
      tuple(mixed.base_rules()),
      f"per-layer widths from {{4, 8, 16}} bits averaging {m.group(1)}",
      (("mixed", {"avg_bits": bits}), ("gptq", {})),
    )
  shipped = importlib.resources.files(__name__) / f"{name_or_path}.yaml"
  if shipped.is_file():
    return parse_recipe(name_or_path, shipped.read_text(), f"recipe {name_or_path}.yaml")
  try:
    spec = QuantSpec.parse(name_or_path)
  except ValueError:
    raise ValueError(
      f"Unknown recipe {name_or_path!r}: not a shipped recipe ({', '.join(recipe_names())}), "
      "not a .yaml file, not 'mixed:avg_bits=N', and not a spec string such as 'int8' or "
      "'int4:g128'."
    ) from None
  return Recipe(name_or_path, tuple(default_rules(spec)), f"default rules with weights {spec}")


_RULE_KEYS = {"pattern", "weight", "act", "expect_match", "batch_dims"}


def parse_recipe(name: str, text: str, where: str) -> Recipe:
  """A recipe from its YAML text; errors name `where` and the entry at fault."""
  try:
    data = yaml.safe_load(text)
  except yaml.YAMLError as e:
    raise ValueError(f"{where}: not valid YAML ({_yaml_problem(e)}); fix the file.") from None
  if not isinstance(data, dict) or not isinstance(data.get("rules"), list):
    raise ValueError(f"{where}: a recipe is a mapping with a 'rules' list.")
  unknown = set(data) - {"description", "rules", "method", "options", "steps"}
  if unknown:
    raise ValueError(
      f"{where}: unknown keys {sorted(unknown)}; use 'description', 'steps' "
      "(or 'method' and 'options') and 'rules'."
    )
  rules = []
  for i, entry in enumerate(data["rules"]):
    if not isinstance(entry, dict) or "pattern" not in entry:
      raise ValueError(f"{where}: rules[{i}] needs a 'pattern' (and 'weight', 'act').")
    extra = set(entry) - _RULE_KEYS
    if extra:
      raise ValueError(
        f"{where}: rules[{i}] has unknown keys {sorted(extra)}; use {sorted(_RULE_KEYS)}."
      )
    try:
      rules.append(
        Rule(
          str(entry["pattern"]),
          entry.get("weight"),
          entry.get("act"),
          bool(entry.get("expect_match", True)),
          entry.get("batch_dims", 0),
        )
      )
    except (ValueError, TypeError) as e:
      raise ValueError(f"{where}: rules[{i}]: {e}") from None
  steps = _parse_steps(data, where)
  try:
    return Recipe(name, tuple(rules), str(data.get("description", "")), steps)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None


def _yaml_problem(error: yaml.YAMLError) -> str:
  """``"expected ',' or '}' at line 3, column 1"``: a YAML error in one line."""
  problem = getattr(error, "problem", None) or str(error).splitlines()[0]
  mark = getattr(error, "problem_mark", None)
  return problem if mark is None else f"{problem} at line {mark.line + 1}, column {mark.column + 1}"


def _parse_steps(data: dict, where: str) -> tuple[StepEntry, ...]:
  if "steps" in data:
    if "method" in data or "options" in data:
      raise ValueError(f"{where}: give either 'steps' or 'method'/'options', not both.")
    if not isinstance(data["steps"], list) or not data["steps"]:
      raise ValueError(
        f"{where}: 'steps' is a non-empty list such as [{{awq: {{}}}}, {{gptq: {{damp: 0.01}}}}]."
      )
    steps = []
    for i, entry in enumerate(data["steps"]):
      if isinstance(entry, str):
        entry = {entry: {}}
      if not isinstance(entry, dict) or len(entry) != 1:
        raise ValueError(f"{where}: steps[{i}] is one 'name: {{options}}' mapping.")
      ((step_name, options),) = entry.items()
      if not isinstance(options, dict | type(None)):
        raise ValueError(f"{where}: steps[{i}] ({step_name}): options must be a mapping.")
      steps.append((str(step_name), options or {}))
    return tuple(steps)
  options = data.get("options") or {}
  if not isinstance(options, dict):
    raise ValueError(f"{where}: 'options' must be a mapping.")
  return steps_for_method(str(data.get("method", "rtn")), options)


# --------------------------------------------------------------------------- applying
@dataclasses.dataclass
class Quantized:
  """What applying a recipe gives: quantized params, the rules and plan that serve them, the
  float weights they were quantized from (smoothing applied), and per-step notes."""

  qparams: Any
  rules: tuple[Rule, ...]
  plan: Plan
  reference: Any
  info: dict


def apply_recipe(
  recipe: Recipe,
  params,
  data: CalibrationSet | None = None,
  *,
  plan: Plan | None = None,
  progress: bool | Callable = False,
) -> Quantized:
  """Quantizes `params` by `recipe`: its selectors choose the rules (mixed precision), then
  one layer-sequential pass of its smoothers and quantizer (`jaxquant.ptq.driver.run`). The
  plan is made once per rule list and passed down (`Quantized.plan`); pass `plan` if you made it
  already for these params and ``recipe.rules``. Data-driven steps need `data`: the Linen model
  and calibration batches."""
  selectors, smoothers, quantizer = recipe.build()
  if recipe.needs_data and (data is None or not data.batches):
    raise ValueError(
      f"Recipe {recipe.name!r} runs {recipe.step_names}, which need a runnable model and "
      "calibration batches (a jaxquant.ptq.CalibrationSet); or use an rtn/hqq recipe."
    )
  if plan is not None and plan.rules != recipe.rules:
    raise ValueError(
      f"apply_recipe: the plan given was made from other rules than {recipe.name}'s."
    )
  p = plan if plan is not None else transforms.plan(params, recipe.rules)
  p.check()
  leaves = dict(transforms.named_leaves(params))
  transforms.check_quantizable(leaves, p)  # non-finite or out-of-range weights fail first
  info: dict[str, Any] = {}
  for selector in selectors:
    rules, info[selector.name] = selector(params, p, data, quantizer)
    p = transforms.plan(params, rules)
    p.check()
  if selectors:  # the specs they chose, checked before any quantizing
    transforms.check_quantizable(leaves, p)
  result = run(params, p, smoothers, quantizer, data, progress)
  info.update(result.info)
  return Quantized(result.qparams, p.rules, p, result.reference, info)


def resolved_recipe(recipe: Recipe, result: Quantized) -> Recipe:
  """The recipe that reproduces `result` without searching again: the rules its selectors
  chose, applied by its other steps (save it with ``to_yaml()`` and edit it at will); a recipe
  without selectors as it is."""
  selectors = [n for n, _ in recipe.steps if make_step(n).kind == "select"]
  if not selectors:
    return recipe
  steps = tuple((n, o) for n, o in recipe.steps if n not in selectors)
  chosen = result.info.get("mixed", {}).get("specs", {})
  counts = ", ".join(f"{n} {c}" for c, n in sorted(Counter(chosen.values()).items()))
  rest = " + ".join(n for n, _ in steps) or "rtn"
  description = f"The formats {recipe.name} chose per layer ({counts}), applied by {rest}."
  return Recipe(f"{recipe.name} (chosen)", result.rules, description, steps or (("rtn", {}),))
