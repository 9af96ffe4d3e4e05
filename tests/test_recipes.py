"""Recipes: shipped YAML round-trips, shorthands expand, errors say where and what to write,
and the step registry takes new quantizers."""

import dataclasses
import textwrap
from typing import ClassVar

import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant import mixed
from jaxquant.ptq import REGISTRY, CalibrationSet, make_step, register
from jaxquant.recipes import Recipe, load_recipe, parse_recipe, recipe_names, steps_for_method

RULES = """
rules:
  - {pattern: 'embed', weight: null, expect_match: false}
  - {pattern: '.*', weight: 'int4:g128:asym'}
"""
WHERE = "configs/my-recipe.yaml"


def parse(body, rules=RULES):
  return parse_recipe("mine", textwrap.dedent(body) + rules, WHERE)


# --------------------------------------------------------------------------- shipped recipes
@pytest.mark.parametrize("name", recipe_names())
def test_shipped_recipe_loads_and_round_trips_through_yaml(name):
  recipe = load_recipe(name)
  assert recipe.name == name and recipe.steps and recipe.description
  again = parse_recipe(name, recipe.to_yaml(), "round trip")
  assert again.steps == recipe.steps
  assert again.rules == recipe.rules
  assert again.description == recipe.description
  recipe.build()  # the steps are made and in order


def test_the_shipped_recipes_include_the_documented_ones():
  names = recipe_names()
  assert {"w8", "w8a8", "w4g128", "w4g128-gptq", "w4g128-awq", "w4g128-awq-gptq"} <= set(names)
  assert names == sorted(names)
  chained = load_recipe("w4g128-awq-gptq")
  assert [n for n, _ in chained.steps] == ["awq", "gptq"]
  selectors, smoothers, quantizer = chained.build()
  assert selectors == [] and [s.name for s in smoothers] == ["awq"] and quantizer.name == "gptq"


def test_a_bare_spec_string_gets_the_default_rules():
  recipe = load_recipe("int4:g128")
  assert recipe.rules == tuple(jq.default_rules("int4:g128"))
  assert recipe.steps == (("rtn", {}),) and not recipe.needs_data


def test_mixed_shorthand_selects_then_runs_gptq():
  recipe = load_recipe("mixed:avg_bits=5")
  assert recipe.steps == (("mixed", {"avg_bits": 5.0}), ("gptq", {}))
  assert isinstance(recipe.steps[0][1]["avg_bits"], float)
  assert recipe.rules == tuple(mixed.base_rules()) and recipe.needs_data
  assert load_recipe("mixed:avg_bits=4.5").steps[0] == ("mixed", {"avg_bits": 4.5})


def test_load_recipe_from_a_file_and_unknown_names(tmp_path):
  path = tmp_path / "custom.yaml"
  path.write_text(load_recipe("w4g128-gptq").to_yaml())
  recipe = load_recipe(str(path))
  assert recipe.name == "custom" and recipe.steps == load_recipe("w4g128-gptq").steps
  with pytest.raises(FileNotFoundError, match=r"missing\.yaml"):
    load_recipe(str(tmp_path / "missing.yaml"))
  with pytest.raises(ValueError, match="Unknown recipe 'w5'") as e:
    load_recipe("w5")
  assert all(name in str(e.value) for name in recipe_names())


# --------------------------------------------------------------------------- shorthands
def test_method_awq_without_clip_expands_to_awq_then_rtn():
  recipe = parse("""
      method: awq
      options: {clip: false, grid: 10}
  """)
  assert recipe.steps == (("awq", {"grid": 10}), ("rtn", {}))


def test_method_awq_with_clip_ends_in_the_clip_search():
  assert steps_for_method("awq", {"search_rows": 512}) == (
    ("awq", {"search_rows": 512}),
    ("awq_clip", {"rows": 512}),
  )
  assert steps_for_method("awq", {})[1] == ("awq_clip", {"rows": 4096})


def test_method_smoothquant_expands_to_smoothquant_then_rtn():
  recipe = parse("""
      method: smoothquant
      options: {alpha: 0.8}
  """)
  assert recipe.steps == (("smoothquant", {"alpha": 0.8}), ("rtn", {}))


def test_method_mixed_splits_its_options_between_the_two_steps():
  steps = steps_for_method("mixed", {"avg_bits": 6, "damp": 0.05, "sensitivity": "hessian"})
  assert steps == (("mixed", {"avg_bits": 6, "sensitivity": "hessian"}), ("gptq", {"damp": 0.05}))


def test_no_method_is_round_to_nearest_and_steps_may_be_bare_names():
  assert parse("description: plain\n").steps == (("rtn", {}),)
  assert parse("steps: [{mixed: null}, gptq]\n").steps == (("mixed", {}), ("gptq", {}))
  assert parse("steps: [{awq: {}}, gptq]\n").steps == (("awq", {}), ("gptq", {}))


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
  "body, rules, message",
  [
    ("colour: blue\n", RULES, r"unknown keys \['colour'\]; use 'description', 'steps'"),
    ("steps: [gptq]\nmethod: awq\n", RULES, "give either 'steps' or 'method'/'options'"),
    ("steps: [gptq]\noptions: {damp: 0.1}\n", RULES, "not both"),
    ("steps: []\n", RULES, "'steps' is a non-empty list"),
    ("steps: [{gptq: {}, awq: {}}]\n", RULES, r"steps\[0\] is one 'name: \{options\}'"),
    ("steps: [{gptq: 3}]\n", RULES, r"steps\[0\] \(gptq\): options must be a mapping"),
    ("options: [1]\n", RULES, "'options' must be a mapping"),
    (
      "steps: [{gptq: {dampening: 0.1}}]\n",
      RULES,
      r"Step 'gptq': unknown options \['dampening'\]; it takes \[.*'damp'",
    ),
    ("steps: [gptq, awq]\n", RULES, "out of order: write selectors"),
    ("steps: [rtn, gptq]\n", RULES, "at most one quantizer"),
    ("steps: [gptq, mixed]\n", RULES, "out of order"),
    ("", "rules:\n  - {weight: int8}\n", r"rules\[0\] needs a 'pattern'"),
    ("", "rules:\n  - {pattern: a}\n  - int8\n", r"rules\[1\] needs a 'pattern'"),
    ("", "rules:\n  - {pattern: a, weights: int8}\n", r"rules\[0\] has unknown keys \['weights'\]"),
    (
      "",
      "rules:\n  - {pattern: '.*', weight: int3}\n",
      r"rules\[0\]: Rule '.\*', weight: .*'int3'; write FORMAT",
    ),
    ("", "rules:\n  - {pattern: '(', weight: int8}\n", r"rules\[0\]: .*re\.escape"),
    ("", "rules:\n  - {pattern: a, batch_dims: -1}\n", r"rules\[0\]: .*non-negative int"),
    ("", "rules: {pattern: a}\n", "a recipe is a mapping with a 'rules' list"),
  ],
)
def test_recipe_errors_name_the_file_and_the_fix(body, rules, message):
  with pytest.raises(ValueError, match=message) as e:
    parse(body, rules)
  assert str(e.value).startswith(WHERE + ": ")


def test_unknown_step_lists_the_registered_names():
  with pytest.raises(ValueError, match="Unknown PTQ step 'gtpq'") as e:
    parse("steps: [gtpq]\n")
  assert str(e.value).startswith(WHERE + ": ")
  assert all(name in str(e.value) for name in REGISTRY)
  assert {"rtn", "gptq", "awq", "awq_clip", "hqq", "smoothquant", "mixed"} <= set(REGISTRY)


def test_out_of_order_recipes_are_rejected_when_built_directly():
  rules = tuple(jq.default_rules("int8"))
  with pytest.raises(ValueError, match=r"Recipe 'bad': steps .* are out of order"):
    Recipe("bad", rules, steps=(("rtn", {}), ("smoothquant", {})))
  with pytest.raises(ValueError, match="Recipe 'bad2': Step 'hqq': unknown options"):
    Recipe("bad2", rules, steps=(("hqq", {"iterations": 3}),))


# --------------------------------------------------------------------------- needs_data
@pytest.mark.parametrize(
  "steps, needs",
  [
    ((("gptq", {}),), True),
    ((("awq", {}), ("rtn", {})), True),
    ((("awq", {}), ("awq_clip", {})), True),
    ((("smoothquant", {}),), True),
    ((("mixed", {}), ("rtn", {})), True),
    ((("rtn", {}),), False),
    ((("hqq", {}),), False),
  ],
)
def test_needs_data(steps, needs):
  assert Recipe("r", tuple(jq.default_rules("int4:g128:asym")), steps=steps).needs_data is needs


def test_a_data_needing_recipe_without_data_is_a_value_error():
  params = {"dense": {"kernel": jnp.ones((128, 16)), "bias": jnp.zeros(16)}}
  recipe = load_recipe("w4g128-gptq")
  with pytest.raises(ValueError, match="calibration") as e:
    jq.apply_recipe(recipe, params)
  assert "gptq" in str(e.value)
  with pytest.raises(ValueError, match="calibration"):
    jq.apply_recipe(recipe, params, CalibrationSet(model=None, batches=[]))


# --------------------------------------------------------------------------- registry
CALLS = []


@dataclasses.dataclass(frozen=True)
class HalfStepRTN:
  """Round to nearest after scaling by `factor` (a visible change), logging each call."""

  kind: ClassVar[str] = "quantize"
  needs: ClassVar[None] = None
  factor: float = 1.0

  def eligible(self, spec, shape):
    return len(shape) == 2

  def __call__(self, w, stats, spec):
    CALLS.append((tuple(np.shape(w)), str(spec), stats))
    return jq.quantize(jnp.asarray(w) * self.factor, spec), {}


def test_a_registered_quantizer_is_usable_in_a_recipe_by_name():
  name = "test_half_step_rtn"
  assert name not in REGISTRY
  CALLS.clear()
  try:
    register(name)(HalfStepRTN)
    assert REGISTRY[name] is HalfStepRTN and HalfStepRTN.name == name
    register(name)(HalfStepRTN)  # registering the same class again is harmless
    with pytest.raises(ValueError, match="already registered"):
      register(name)(dataclasses.make_dataclass("Other", []))
    step = make_step(name, {"factor": 2.0})
    assert step.factor == 2.0
    recipe = parse(
      f"steps: [{{{name}: {{factor: 2.0}}}}]\n", "rules:\n  - {pattern: '.*', weight: 'int8'}\n"
    )
    assert recipe.steps == ((name, {"factor": 2.0}),) and not recipe.needs_data
    params = {"dense": {"kernel": jnp.ones((32, 16)) * 0.5, "bias": jnp.zeros(16)}}
    result = jq.apply_recipe(recipe, params, None)
    kernel = result.qparams["dense"]["kernel"]
    assert isinstance(kernel, jq.QArray)
    np.testing.assert_allclose(np.asarray(jq.dequantize(kernel)), 1.0, rtol=1e-6)  # 0.5 * 2
    np.testing.assert_array_equal(result.qparams["dense"]["bias"], params["dense"]["bias"])
    assert CALLS == [((32, 16), "int8", None)]  # the kernel only, no statistics
  finally:
    REGISTRY.pop(name, None)
  assert name not in REGISTRY
  with pytest.raises(ValueError, match="Unknown PTQ step"):
    make_step(name)
