"""Mixed precision: stored bits, the knapsack against brute force, rules and step options."""

import itertools
import re

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxquant as jq
from jaxquant import mixed
from jaxquant.ptq import make_step
from jaxquant.rules import Rule


# --------------------------------------------------------------------------- stored bits
@given(
  st.sampled_from(
    [
      "int4:g128:asym",
      "int8",
      "int8:scale=f16",
      "nf4:g64",
      "bf16",
      "int4:g32:asym:mse:scale=f16",
      "fp8_e4m3",
      "uint8:g64",
    ]
  ),
  st.sampled_from([(128, 8), (256, 6), (384, 2)]),
)
def test_stored_bits_are_the_bytes_of_the_spec(spec, shape):
  assert mixed.stored_bits(spec, shape) == 8 * jq.QuantSpec.parse(spec).nbytes(shape)
  assert mixed.stored_bits(jq.QuantSpec.parse(spec), list(shape)) == mixed.stored_bits(spec, shape)


@pytest.mark.parametrize(
  "spec, per_weight",
  [
    # 4-bit values, one scale (16 or 32 bits) and one int8 zero point per group
    ("int4:g128:asym:scale=f16", 4 + (16 + 8) / 128),
    ("int4:g64:asym:scale=f16", 4 + (16 + 8) / 64),
    ("int4:g32:asym:scale=f16", 4 + (16 + 8) / 32),
    ("int4:g128:asym", 4 + (32 + 8) / 128),
    ("int4:g64:asym", 4 + (32 + 8) / 64),
    ("int4:g32:asym", 4 + (32 + 8) / 32),
    ("int4:g128:asym:mse:scale=f16", 4 + (16 + 8) / 128),  # calibration stores nothing
    ("int4:g128:scale=f16", 4 + 16 / 128),  # symmetric: no zero points
    ("bf16", 16),
  ],
)
def test_stored_bits_per_weight_closed_forms(spec, per_weight):
  for shape in [(128, 16), (512, 64), (1024, 2)]:
    assert mixed.stored_bits(spec, shape) == per_weight * shape[0] * shape[1]


def test_documented_closed_forms():
  n = 128 * 128
  bits = lambda s: mixed.stored_bits(s, (128, 128)) / n
  assert [bits(f"int4:g{g}:asym:scale=f16") for g in (128, 64, 32)] == [4.1875, 4.375, 4.75]
  assert [bits(f"int4:g{g}:asym") for g in (128, 64, 32)] == [4.3125, 4.625, 5.25]


@given(st.sampled_from([16, 64, 256, 1000]), st.sampled_from([2, 8, 30]))
def test_int8_per_channel_stores_one_scale_per_output_channel(d_in, d_out):
  n = d_in * d_out
  assert mixed.stored_bits("int8:scale=f16", (d_in, d_out)) == (8 + 16 / d_in) * n
  assert mixed.stored_bits("int8", (d_in, d_out)) == (8 + 32 / d_in) * n


def test_the_choices_are_ordered_by_what_they_store():
  shape = (512, 512)
  stored = [mixed.stored_bits(c, shape) for c in mixed.CHOICES]
  assert stored == sorted(stored) and len(set(stored)) == len(stored)


# --------------------------------------------------------------------------- allocate
def brute_force(sizes, errors, costs, budget):
  """``(least total error, its pick)`` over every combination that fits the budget."""
  paths = list(sizes)
  best = (np.inf, None)
  for combo in itertools.product(*(list(errors[p]) for p in paths)):
    pick = dict(zip(paths, combo))
    if sum(costs[p][c] for p, c in pick.items()) <= budget:
      total = sum(errors[p][c] for p, c in pick.items())
      if total < best[0]:
        best = (total, pick)
  return best


@st.composite
def knapsacks(draw, integer_costs=True):
  """Random small instances ``(sizes, errors, costs, avg_bits)`` with a feasible budget."""
  n_layers, n_choices = draw(st.integers(2, 5)), draw(st.integers(2, 4))
  sizes = {f"layer_{i}": draw(st.integers(1, 64)) for i in range(n_layers)}
  names = [f"c{j}" for j in range(n_choices)]
  if integer_costs:
    cost = st.integers(1, 400)
  else:
    cost = st.floats(0.5, 400.0, allow_nan=False, allow_infinity=False, allow_subnormal=False)
  err = st.floats(0.0, 100.0, allow_nan=False, allow_infinity=False, allow_subnormal=False)
  costs = {p: {c: draw(cost) for c in names} for p in sizes}
  errors = {p: {c: draw(err) for c in names} for p in sizes}
  cheapest = sum(min(cs.values()) for cs in costs.values())
  dearest = sum(max(cs.values()) for cs in costs.values())
  budget = draw(st.floats(cheapest, dearest + 1.0))
  avg_bits = budget / sum(sizes.values())
  while avg_bits * sum(sizes.values()) < cheapest:  # keep float rounding off the boundary
    avg_bits = float(np.nextafter(avg_bits, np.inf))  # (away from the boundary tested below)
  return sizes, errors, costs, avg_bits


def _spent(pick, costs):
  return sum(costs[p][c] for p, c in pick.items())


def _total(pick, errors):
  return sum(errors[p][c] for p, c in pick.items())


@given(knapsacks())
def test_allocate_is_the_brute_force_optimum_for_integer_costs(case):
  sizes, errors, costs, avg_bits = case
  got = mixed.allocate(sizes, errors, avg_bits, costs)
  assert list(got) == list(sizes) and all(got[p] in errors[p] for p in sizes)
  budget = avg_bits * sum(sizes.values())
  assert _spent(got, costs) <= budget
  best, _ = brute_force(sizes, errors, costs, budget)
  assert _total(got, errors) == pytest.approx(best, rel=1e-6, abs=1e-9)


@given(knapsacks(integer_costs=False), st.sampled_from([64, 1024, 1 << 14]))
def test_allocate_keeps_the_budget_with_fractional_costs(case, resolution):
  sizes, errors, costs, avg_bits = case
  # costs are rounded up by at most one grid step (budget / resolution) per layer; leave the
  # cheapest pick that much room (the boundary itself is tested below)
  cheapest = sum(min(cs.values()) for cs in costs.values())
  room = 1 - (len(sizes) + 1) / resolution
  avg_bits = max(avg_bits, cheapest / room / sum(sizes.values()))
  budget = avg_bits * sum(sizes.values())
  got = mixed.allocate(sizes, errors, avg_bits, costs, resolution=resolution)
  assert _spent(got, costs) <= budget * (1 + 1e-9)
  # every pick that fits with that room to spare is seen, so none of them is better
  best, _ = brute_force(sizes, errors, costs, budget * room)
  assert _total(got, errors) <= best + 1e-9 * (1 + abs(best))


@pytest.mark.parametrize("costs_b", [{"c0": 21.5, "c1": 21.0}, {"c0": 22.5, "c1": 21.0}])
def test_allocate_at_exactly_the_cheapest_average_with_fractional_costs(costs_b):
  # the only feasible picks spend exactly the budget (22 bits); rounded up to the grid of
  # budget / 16384 they no longer fit
  sizes = {"a": 1, "b": 1}
  costs = {"a": {"c0": 1.0, "c1": 1.0}, "b": costs_b}
  errors = {"a": {"c0": 0.0, "c1": 0.0}, "b": {"c0": 0.0, "c1": 0.0}}
  try:
    got = mixed.allocate(sizes, errors, 11.0, costs)
  except ValueError:
    return  # refusing with a ValueError would be fine too
  assert _spent(got, costs) <= 22.0


def test_allocate_at_exactly_the_cheapest_average_with_integer_costs():
  sizes = {"a": 4, "b": 7}
  costs = {"a": {"fast": 20, "lean": 5}, "b": {"fast": 20, "lean": 10}}
  errors = {"a": {"fast": 0.0, "lean": 1.0}, "b": {"fast": 0.0, "lean": 1.0}}
  avg_bits = 15 / 11  # the cheapest pick's average, as a caller would compute it
  try:
    got = mixed.allocate(sizes, errors, avg_bits, costs)
  except ValueError:
    return  # refusing with a ValueError would be fine too
  assert got == {"a": "lean", "b": "lean"}


@st.composite
def width_instances(draw):
  n_layers = draw(st.integers(2, 5))
  widths = draw(st.lists(st.sampled_from([2, 3, 4, 8, 16]), min_size=2, max_size=4, unique=True))
  sizes = {f"l{i}": draw(st.integers(1, 50)) for i in range(n_layers)}
  err = st.floats(0.0, 10.0, allow_nan=False, allow_subnormal=False)
  errors = {p: {w: draw(err) for w in widths} for p in sizes}
  avg_bits = draw(st.floats(min(widths), max(widths)))
  return sizes, errors, avg_bits


@given(width_instances())
def test_allocate_without_costs_counts_each_weight_at_its_width(case):
  sizes, errors, avg_bits = case
  got = mixed.allocate(sizes, errors, avg_bits)
  costs = {p: {w: sizes[p] * w for w in errors[p]} for p in sizes}
  budget = avg_bits * sum(sizes.values())
  assert _spent(got, costs) <= budget
  assert mixed.average_bits(got, sizes) <= avg_bits * (1 + 1e-12)
  best, _ = brute_force(sizes, errors, costs, budget)
  assert _total(got, errors) == pytest.approx(best, rel=1e-6, abs=1e-9)


@given(knapsacks(), st.floats(0.01, 0.99))
def test_allocate_below_the_cheapest_choice_is_a_value_error(case, fraction):
  sizes, errors, costs, _ = case
  cheapest = sum(min(cs.values()) for cs in costs.values())
  avg_bits = fraction * cheapest / sum(sizes.values())
  with pytest.raises(ValueError, match="cheapest") as e:
    mixed.allocate(sizes, errors, avg_bits, costs)
  assert f"avg_bits={avg_bits}" in str(e.value)


# --------------------------------------------------------------------------- rules
def test_mixed_rules_put_exact_path_rules_in_front_of_the_base():
  base = jq.default_rules("int4:g128")
  bits = {"enc/a/kernel": 8, "enc/b/kernel": 16, "enc/c/kernel": "nf4:g64"}
  rules = mixed.mixed_rules(bits, base=base)
  assert rules[3:] == base and len(rules) == 5
  assert [r.pattern for r in rules[:3]] == [f"^{re.escape(p)}$" for p in bits]
  assert rules[0].weight == jq.QuantSpec.parse(mixed.CANDIDATES[8])
  assert rules[1].weight == jq.QuantSpec.parse(mixed.CANDIDATES[16])
  assert rules[2].weight == jq.QuantSpec.parse("nf4:g64")
  assert all(r.expect_match for r in rules[:3])
  assert not rules[0].matches("enc/a/kernel2") and not rules[0].matches("x/enc/a/kernel")
  custom = mixed.mixed_rules({"p": 4}, candidates={4: "int4:g32"})
  assert len(custom) == 1 and custom[0].weight == jq.QuantSpec.parse("int4:g32")


PATH_CHARS = st.sampled_from(list("ab/_0.+*?()[]{}|^$\\-"))


@given(st.lists(st.text(PATH_CHARS, min_size=1, max_size=12), min_size=1, max_size=4, unique=True))
def test_mixed_rules_match_their_own_path_only_whatever_its_characters(paths):
  rules = mixed.mixed_rules(dict.fromkeys(paths, 8), base=[Rule(".*", "int4:g128")])
  for i, p in enumerate(paths):
    assert rules[i].matches(p)
    for q in paths[:i] + paths[i + 1 :] + [p + "a", "a" + p, p[:-1]]:
      assert not rules[i].matches(q) or q == p
    assert jq.rules.first_match(p, rules) == i


@given(
  st.dictionaries(
    st.sampled_from(["a", "b", "c", "d"]),
    st.tuples(st.sampled_from([4, 8, 16]), st.integers(1, 10_000)),
    min_size=1,
  )
)
def test_average_bits_is_the_size_weighted_mean_width(layers):
  bits = {p: b for p, (b, _) in layers.items()}
  sizes = {p: n for p, (_, n) in layers.items()}
  sizes["unused"] = 10**9  # only the allocated layers count
  expected = sum(bits[p] * sizes[p] for p in bits) / sum(sizes[p] for p in bits)
  assert mixed.average_bits(bits, sizes) == pytest.approx(expected, rel=1e-12)
  assert min(bits.values()) <= mixed.average_bits(bits, sizes) <= max(bits.values())


def test_sensitivity_is_the_output_error_of_the_rounded_kernel():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(40, 16)).astype(np.float32)
  w = rng.normal(size=(16, 8)).astype(np.float32)
  spec = jq.QuantSpec.parse("int4:g8")
  dw = w - np.asarray(jq.dequantize(jq.quantize(jnp.asarray(w), spec), jnp.float32))
  got = mixed.sensitivity(w, x.T @ x, 40.0, spec)
  assert got == pytest.approx(np.sum((x @ dw) ** 2) / 40.0, rel=1e-4)
  assert got > 0 and mixed.sensitivity(w, np.zeros((16, 16), np.float32), 40.0, spec) == 0.0


# --------------------------------------------------------------------------- the step
def test_mixed_step_options_are_validated():
  with pytest.raises(ValueError, match="bogus"):
    mixed.Mixed(sensitivity="bogus")
  step = make_step("mixed", {"avg_bits": 5})
  assert isinstance(step, mixed.Mixed)
  assert step.avg_bits == 5.0 and isinstance(step.avg_bits, float)
  assert step.kind == "select" and step.needs.kind == "hessian"
  with pytest.raises(ValueError, match="frobnicate"):
    make_step("mixed", {"frobnicate": 1})
  with pytest.raises(ValueError, match="bogus"):
    make_step("mixed", {"sensitivity": "bogus"})
  assert make_step("mixed", {"choices": ["int8", "bf16"]}).choices == ("int8", "bf16")
  assert make_step("mixed", {"sensitivity": "hessian"}).sensitivity == "hessian"
