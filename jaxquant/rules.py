"""Rules: which parameters get which spec, by regex over their '/'-joined paths.

A rule list is ordered and the first rule whose pattern matches a path (``re.search``) decides
that parameter: its `weight` spec quantizes the parameter (None keeps it in float), its `act`
spec is what the Flax adapters use for the activations entering that layer. Only floating
parameters with two or more dimensions are quantized; biases, norm scales and scalars stay as
they are whatever the rules say.

A rule's `batch_dims` says how many leading axes of a matched parameter index a stack of
layers (``nn.scan``, ``lax.scan``): each slice is quantized on its own, as ``jax.vmap`` would,
so no scale mixes two layers. Recipes (`jaxquant.recipes`) are rule lists saved as YAML.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

from jaxquant.spec import QuantSpec, SpecLike, as_spec


@dataclasses.dataclass(frozen=True, init=False)
class Rule:
  """``(pattern → weight spec, activation spec)``; a None spec leaves that tensor in float.

  A rule that decides no parameter warns, unless `expect_match` is False (for generic rules
  such as the embedding exclusion in `default_rules`). `batch_dims` leading axes of a matched
  parameter are a stack of layers, each slice quantized on its own.
  """

  pattern: str
  weight: QuantSpec | None = None
  act: QuantSpec | None = None
  expect_match: bool = True
  batch_dims: int = 0

  # Written out (not generated) because the specs may be given as strings: the fields always
  # hold parsed `QuantSpec`s (or None).
  def __init__(
    self,
    pattern: str,
    weight: SpecLike | None = None,
    act: SpecLike | None = None,
    expect_match: bool = True,
    batch_dims: int = 0,
  ) -> None:
    object.__setattr__(self, "pattern", pattern)
    object.__setattr__(self, "expect_match", expect_match)
    object.__setattr__(self, "batch_dims", batch_dims)
    try:
      re.compile(self.pattern)
    except re.error as e:
      raise ValueError(
        f"Rule pattern {self.pattern!r} is not a valid regular expression ({e}); "
        "escape literal characters with re.escape."
      ) from None
    if (
      isinstance(self.batch_dims, bool)
      or not isinstance(self.batch_dims, int)
      or self.batch_dims < 0
    ):
      raise ValueError(
        f"Rule {self.pattern!r}: batch_dims must be a non-negative int (the leading axes "
        f"that index stacked layers), got {self.batch_dims!r}."
      )
    object.__setattr__(self, "weight", _spec_for(weight, self.pattern, "weight"))
    object.__setattr__(self, "act", _spec_for(act, self.pattern, "act"))

  def matches(self, path: str) -> bool:
    return re.search(self.pattern, path) is not None

  def to_dict(self) -> dict[str, Any]:
    out: dict[str, Any] = {
      "pattern": self.pattern,
      "weight": None if self.weight is None else str(self.weight),
      "act": None if self.act is None else str(self.act),
    }
    if not self.expect_match:
      out["expect_match"] = False
    if self.batch_dims:
      out["batch_dims"] = self.batch_dims
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
