"""Rules: which parameters get which spec, by regex over their '/'-joined paths.

A rule list is ordered and the first rule whose pattern matches a path (``re.search``) decides
that parameter: its `weight` spec quantizes the parameter (None keeps it in float), its `act`
spec is what the Flax adapters use for the activations entering that layer. Only floating
parameters with two or more dimensions are quantized; biases, norm scales and scalars stay as
they are whatever the rules say.

Recipes are rule lists saved as YAML (see ``configs/``)::

    description: INT8 weights, one scale per output channel.
    rules:
      - {pattern: 'embed', weight: null}
      - {pattern: '.*', weight: 'int8'}
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import re
from collections.abc import Sequence
from pathlib import Path

import yaml

from jaxquant.spec import QuantSpec, SpecLike, as_spec


@dataclasses.dataclass(frozen=True)
class Rule:
  """``(pattern → weight spec, activation spec)``; a None spec leaves that tensor in float.

  A rule that decides no parameter warns, unless `expect_match` is False (for generic rules
  such as the embedding exclusion in `default_rules`).
  """

  pattern: str
  weight: QuantSpec | None = None
  act: QuantSpec | None = None
  expect_match: bool = True

  def __post_init__(self):
    try:
      re.compile(self.pattern)
    except re.error as e:
      raise ValueError(
          f"Rule pattern {self.pattern!r} is not a valid regular expression ({e}); "
          "escape literal characters with re.escape."
      ) from None
    object.__setattr__(self, "weight", _spec_for(self.weight, self.pattern, "weight"))
    object.__setattr__(self, "act", _spec_for(self.act, self.pattern, "act"))

  def matches(self, path: str) -> bool:
    return re.search(self.pattern, path) is not None

  def to_dict(self) -> dict:
    out = {
        "pattern": self.pattern,
        "weight": None if self.weight is None else str(self.weight),
        "act": None if self.act is None else str(self.act),
    }
    if not self.expect_match:
      out["expect_match"] = False
    return out


def _spec_for(spec: SpecLike | None, pattern: str, which: str) -> QuantSpec | None:
  try:
    return as_spec(spec)
  except (ValueError, TypeError) as e:
    raise type(e)(f"Rule {pattern!r}, {which}: {e}") from None


def default_rules(
    weight: SpecLike = "int8",
    act: SpecLike | None = None,
    embeddings: SpecLike | None = None,
) -> list[Rule]:
  """Quantize every kernel with `weight`; embedding tables with `embeddings` (None: keep)."""
  return [
      Rule(r"(^|/)[^/]*embed[^/]*(/|$)", weight=embeddings, expect_match=False),
      Rule(".*", weight, act),
  ]


def first_match(path: str, rules: Sequence[Rule]) -> int | None:
  """Index of the first rule matching `path`, or None."""
  for i, rule in enumerate(rules):
    if rule.matches(path):
      return i
  return None


# --------------------------------------------------------------------------- recipes
METHODS = ("rtn", "gptq", "awq", "smoothquant", "hqq", "mixed")


@dataclasses.dataclass(frozen=True)
class Recipe:
  """A named rule list, the PTQ method that applies it, and the method's options.

  Stored as ``configs/NAME.yaml``; `method` is one of `METHODS` (``rtn`` is plain
  round-to-nearest; the others live in `jaxquant.ptq` and `jaxquant.mixed`).
  """

  name: str
  rules: tuple[Rule, ...]
  description: str = ""
  method: str = "rtn"
  options: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"Recipe {self.name!r}: unknown method {self.method!r}; use one of "
                       f"{', '.join(METHODS)}.")  # fmt: skip

  def to_yaml(self) -> str:
    body = {"description": self.description, "method": self.method, "options": self.options,
            "rules": [r.to_dict() for r in self.rules]}  # fmt: skip
    return yaml.safe_dump(body, sort_keys=False)


def recipe_names() -> list[str]:
  """Names of the recipes that ship with jaxquant."""
  return sorted(p.name[: -len(".yaml")] for p in _recipe_dir().iterdir() if p.name.endswith(".yaml"))


def _recipe_dir():
  return importlib.resources.files("jaxquant.recipes")


def load_recipe(name_or_path: str) -> Recipe:
  """A recipe by shipped name (``int8``), YAML path, or bare spec string (``int4:g128``).

  A bare spec string means `default_rules` with that weight spec.
  """
  path = Path(name_or_path)
  if path.suffix in (".yaml", ".yml"):
    if not path.is_file():
      raise FileNotFoundError(f"Recipe file {path} does not exist.")
    return _parse_recipe(path.stem, path.read_text(), str(path))
  mixed = re.fullmatch(r"mixed:avg_bits=(\d+(?:\.\d+)?)", name_or_path)
  if mixed:
    from jaxquant.mixed import CHOICES  # here: jaxquant.mixed imports this module

    return Recipe(name_or_path, tuple(default_rules(CHOICES[0])),
                  f"per-layer widths from {{4, 8, 16}} bits averaging {mixed.group(1)}",
                  "mixed", {"avg_bits": float(mixed.group(1))})  # fmt: skip
  shipped = _recipe_dir() / f"{name_or_path}.yaml"
  if shipped.is_file():
    return _parse_recipe(name_or_path, shipped.read_text(), f"configs/{name_or_path}.yaml")
  try:
    spec = QuantSpec.parse(name_or_path)
  except ValueError:
    raise ValueError(
        f"Unknown recipe {name_or_path!r}: not a shipped recipe ({', '.join(recipe_names())}), "
        "not a .yaml file, not 'mixed:avg_bits=N', and not a spec string such as 'int8' or "
        "'int4:g128'."
    ) from None
  return Recipe(name_or_path, tuple(default_rules(spec)), f"default rules with weights {spec}")


def _parse_recipe(name: str, text: str, where: str) -> Recipe:
  data = yaml.safe_load(text)
  if not isinstance(data, dict) or not isinstance(data.get("rules"), list):
    raise ValueError(f"{where}: a recipe is a mapping with a 'rules' list.")  # noqa: TRY004
  unknown = set(data) - {"description", "rules", "method", "options"}
  if unknown:
    raise ValueError(f"{where}: unknown keys {sorted(unknown)}; use 'description', 'method', "
                     "'options' and 'rules'.")  # fmt: skip
  rules = []
  for i, entry in enumerate(data["rules"]):
    if not isinstance(entry, dict) or "pattern" not in entry:
      raise ValueError(f"{where}: rules[{i}] needs a 'pattern' (and 'weight', 'act').")
    extra = set(entry) - {"pattern", "weight", "act", "expect_match"}
    if extra:
      raise ValueError(f"{where}: rules[{i}] has unknown keys {sorted(extra)}.")
    try:
      rules.append(Rule(str(entry["pattern"]), entry.get("weight"), entry.get("act"),
                        bool(entry.get("expect_match", True))))
    except (ValueError, TypeError) as e:
      raise ValueError(f"{where}: rules[{i}]: {e}") from None
  options = data.get("options") or {}
  if not isinstance(options, dict):
    raise ValueError(f"{where}: 'options' must be a mapping.")  # noqa: TRY004
  try:
    return Recipe(name, tuple(rules), str(data.get("description", "")),
                  str(data.get("method", "rtn")), dict(options))  # fmt: skip
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None
