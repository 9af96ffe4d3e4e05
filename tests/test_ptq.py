"""GPTQ, AWQ, SmoothQuant, HQQ and mixed precision: against references and invariants."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant import flax as jqf
from jaxquant import mixed
from jaxquant.apps import evaluate
from jaxquant.numerics import codes, quantization_error
from jaxquant.ptq import gptq as gptq_mod
from jaxquant.ptq.hqq import hqq_quantize
from jaxquant.ptq.smooth import SmoothGroup, apply_smoothing, awq_search, smoothquant_scales


def _layer(seed=0, n_in=64, n_out=24, rows=512):
  rng = np.random.default_rng(seed)
  # correlated inputs with a few loud channels, like real activations
  x = rng.normal(size=(rows, n_in)) @ rng.normal(size=(n_in, n_in)) * 0.3
  x[:, :3] *= 8
  w = rng.normal(size=(n_in, n_out)) * 0.1
  return x.astype(np.float32), w.astype(np.float32)


def reference_gptq(w, h, spec, damp=0.01, act_order=False):
  """GPTQ written out directly: one row at a time, every later row updated at once."""
  spec = jq.QuantSpec.parse(spec)
  W, H = np.array(w, np.float64), np.array(h, np.float64)
  dead = np.diag(H) == 0
  H[dead, dead], W[dead, :] = 1.0, 0.0
  group = spec.group_size if spec.granularity == "group" else None
  fixed = None
  if group is None or act_order:
    blocks = range(0, W.shape[0], group or W.shape[0])
    fixed = [gptq_mod.group_scales(W[g : g + (group or W.shape[0])], spec) for g in blocks]
  perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(W.shape[0])
  W, H = W[perm], H[perm][:, perm]
  U, _ = gptq_mod.damped_inverse_factor(H, damp, 8)
  out = np.zeros_like(W)
  lo, hi = spec.int_range
  for i in range(W.shape[0]):
    row = perm[i]
    if fixed is not None:
      scale, zero = fixed[0 if group is None else row // group]
    elif row % group == 0:
      scale, zero = gptq_mod.group_scales(W[i : i + group], spec)
    c = np.clip(np.round(W[i] / scale) + zero, lo, hi)
    out[i] = c
    e = (W[i] - (c - zero) * scale) / U[i, i]
    W[i:] -= np.outer(U[i, i:], e)
  return out[np.argsort(perm)]


@pytest.mark.parametrize(
  "spec, act_order, block",
  [
    ("int4:g16:asym", False, 16),
    ("int4:g16", True, 32),
    ("int8", True, 8),
    ("int4", False, 64),
    ("int4:g16:asym:mse:scale=f16", True, 16),
  ],
)
def test_gptq_matches_a_direct_numpy_implementation(spec, act_order, block):
  x, w = _layer()
  h = x.T.astype(np.float64) @ x
  q, _ = gptq_mod.gptq_quantize(
    w, h, spec, gptq_mod.GPTQConfig(act_order=act_order, block_size=block)
  )
  np.testing.assert_array_equal(
    np.asarray(codes(q)), reference_gptq(w, h, spec, act_order=act_order)
  )


@pytest.mark.parametrize("spec", ["int4:g16:asym", "int4:g16", "int8"])
def test_gptq_output_error_beats_round_to_nearest(spec):
  x, w = _layer(1)
  q, _ = gptq_mod.gptq_quantize(w, x.T @ x, spec)
  err = lambda qa: float(np.sum((x @ w - x @ np.asarray(jq.dequantize(qa))) ** 2))
  assert err(q) < 0.8 * err(jq.quantize(w, spec))


@pytest.mark.parametrize("spec", ["int4:g16:asym", "int4:g16", "int8"])
def test_gptq_mse_scales_never_round_worse_than_the_full_range(spec):
  _, w = _layer(4)
  lo, hi = jq.QuantSpec.parse(spec).int_range

  def err(rows, scale, zero):
    return np.sum((rows - (np.clip(np.round(rows / scale) + zero, lo, hi) - zero) * scale) ** 2, 0)

  for rows in (w[:16], w):
    full = gptq_mod.group_scales(rows, jq.QuantSpec.parse(spec))
    mse = gptq_mod.group_scales(rows, jq.QuantSpec.parse(spec + ":mse"))
    assert np.all(err(rows, *mse) <= err(rows, *full) * (1 + 1e-6))
    assert np.any(mse[0] < full[0]) or "int8" in spec  # at 4 bits some clip pays


def test_gptq_raises_damping_when_cholesky_fails_and_handles_dead_inputs():
  x, w = _layer(2, n_in=32)
  h = x.T @ x
  indefinite = h.copy()
  indefinite[0, 1] = indefinite[1, 0] = 10 * np.sqrt(h[0, 0] * h[1, 1])  # not PSD any more
  indefinite[5, :] = indefinite[:, 5] = 0.0  # a dead input
  q, info = gptq_mod.gptq_quantize(w, indefinite, "int4:g16", gptq_mod.GPTQConfig(damp=1e-4))
  assert info["damp"] > 1e-4 * np.mean(np.diag(indefinite)) and info["dead"] == 1
  assert np.all(np.asarray(codes(q))[5] == 0)
  with pytest.raises(ValueError, match="stays singular"):
    gptq_mod.gptq_quantize(w, -np.eye(32), "int4:g16", gptq_mod.GPTQConfig(max_damp_tries=2))


def test_gptq_rejects_specs_it_cannot_serve():
  x, w = _layer()
  with pytest.raises(ValueError, match="integer spec"):
    gptq_mod.gptq_quantize(w, x.T @ x, "nf4:g16")


# --------------------------------------------------------------------------- smoothing
def test_smoothquant_scales_balance_activations_and_weights():
  act = np.array([8.0, 1.0, 0.5])
  w = np.array([[0.5, -0.1], [1.0, 0.2], [0.1, 0.1]])
  s = smoothquant_scales(act, [w], alpha=0.5)
  np.testing.assert_allclose(s, np.sqrt(act) / np.sqrt([0.5, 1.0, 0.1]), rtol=1e-6)
  np.testing.assert_allclose(act / s, np.max(np.abs(w), 1) * s, rtol=1e-6)  # equal maxima


def test_awq_search_is_never_worse_than_round_to_nearest():
  x, w = _layer(3)
  s, _, ratio = awq_search(x, np.mean(np.abs(x), 0), [w], jq.QuantSpec.parse("int4:g16:asym"))
  assert ratio <= 1.0 and s.shape == (64,) and np.all(s > 0)
  assert ratio < 0.95  # loud channels: scaling pays


def test_folding_and_input_scales_leave_the_float_model_unchanged():
  from jaxquant import flax as jqf
  from jaxquant.apps.models import minilm

  pytest.importorskip(minilm.PACKAGE)
  params = minilm.load_params()
  groups = minilm.smoothing_groups()
  rng = np.random.default_rng(0)
  scales = {
    i: rng.uniform(
      0.5, 2.0, 384 if "output/dense" not in g.layers[0] or "attention" in g.layers[0] else 1536
    )
    for i, g in enumerate(groups)
  }
  smoothed = apply_smoothing(params, groups, scales)
  assert "input_scale" in smoothed["encoder"]["layer_0"]["output"]["dense"]
  batch = evaluate.minilm_batches(
    ["The quick brown fox jumps over the lazy dog.", "Return a new view of the dictionary's keys."]
  )[0]
  model = jqf.quantize_model(minilm.MiniLM(), [], "fake")  # runs the layers through the seams
  ref = minilm.MiniLM().apply({"params": params}, *batch)
  out = model.apply({"params": smoothed}, *batch)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-4)


def test_fold_kinds_are_validated():
  with pytest.raises(ValueError, match="Unknown fold kind"):
    apply_smoothing(
      {"a": {"kernel": jnp.ones((2, 2))}}, [SmoothGroup(("a/kernel",), ("x", "b"))], {0: np.ones(2)}
    )


# --------------------------------------------------------------------------- HQQ
def test_hqq_lowers_the_robust_error_without_data():
  w = np.asarray(jax.random.t(jax.random.key(0), 3.0, (256, 64)) * 0.05)
  spec = "int4:g64:asym"
  rtn, hqq = jq.quantize(w, spec), hqq_quantize(w, spec)
  l07 = lambda q: float(np.sum(np.abs(w - np.asarray(jq.dequantize(q))) ** 0.7))
  assert l07(hqq) < l07(rtn)
  assert quantization_error(w, hqq)["rel_error"] < 1.05 * quantization_error(w, rtn)["rel_error"]
  assert hqq.zero_point.dtype == jnp.float32 and hqq.packed


def test_hqq_needs_an_asymmetric_integer_spec():
  with pytest.raises(ValueError, match="asymmetric integer"):
    hqq_quantize(jnp.ones((64, 4)), "int4:g64")


# --------------------------------------------------------------------------- mixed
def test_allocation_meets_the_budget_and_spends_it_where_it_pays():
  sizes = {"a": 100, "b": 100, "c": 200}
  errors = {
    "a": {4: 10.0, 8: 1.0, 16: 0.0},
    "b": {4: 1.0, 8: 0.9, 16: 0.0},
    "c": {4: 5.0, 8: 0.5, 16: 0.0},
  }
  bits = mixed.allocate(sizes, errors, avg_bits=5.0)
  assert mixed.average_bits(bits, sizes) <= 5.0
  assert bits == {"a": 8, "b": 4, "c": 4}  # a buys the most error per bit
  assert mixed.allocate(sizes, errors, avg_bits=4.0) == {"a": 4, "b": 4, "c": 4}
  more = mixed.allocate(sizes, errors, avg_bits=8.0)
  total = lambda b: sum(errors[p][b[p]] for p in b)
  assert total(more) < total(bits) and mixed.average_bits(more, sizes) <= 8.0


def test_mixed_rules_are_an_ordinary_editable_rule_list():
  rules = mixed.mixed_rules(
    {"enc/layer_0/q/kernel": 8, "enc/layer_1/q/kernel": 4}, base=jq.default_rules("int4:g16")
  )
  params = {"enc": {f"layer_{i}": {"q": {"kernel": jnp.ones((32, 32))}} for i in range(2)}}
  p = jq.plan(params, rules)
  specs = {r.path: str(r.spec) for r in p.rows}
  assert specs == {"enc/layer_0/q/kernel": "int8", "enc/layer_1/q/kernel": "int4:g128:asym"}
  recipe = jq.Recipe("mine", tuple(rules), steps=(("gptq", {}),))
  assert "int4:g128:asym" in recipe.to_yaml()


def test_a_mixed_result_resolves_to_a_gptq_recipe_that_reproduces_it(tmp_path):
  from jaxquant.recipes import Quantized, resolved_recipe

  recipe = jq.load_recipe("mixed:avg_bits=5")
  recipe = dataclasses.replace(recipe, steps=(recipe.steps[0], ("gptq", {"damp": 0.05})))
  chosen = {"enc/a/kernel": "int8:scale=f16", "enc/b/kernel": "int4:g64:asym:mse:scale=f16"}
  rules = mixed.mixed_rules(chosen, base=recipe.rules)
  result = Quantized({}, tuple(rules), jq.plan({}, rules), {}, {"mixed": {"specs": chosen}})
  fixed = resolved_recipe(recipe, result)
  assert (fixed.steps, fixed.rules) == ((("gptq", {"damp": 0.05}),), tuple(rules))
  assert "1 int8:scale=f16" in fixed.description
  (tmp_path / "chosen.yaml").write_text(fixed.to_yaml())
  again = jq.load_recipe(str(tmp_path / "chosen.yaml"))
  assert (again.steps, again.rules) == (fixed.steps, fixed.rules)
  plain = jq.load_recipe("w4g128-gptq")
  assert (
    resolved_recipe(plain, Quantized({}, plain.rules, jq.plan({}, plain.rules), {}, {})) is plain
  )


def test_allocation_is_the_exact_knapsack_optimum_under_stored_bits():
  import itertools

  rng = np.random.default_rng(0)
  sizes = {f"l{i}": int(n) for i, n in enumerate(rng.integers(1, 5, 6) * 4096)}
  choices = ("int4:g128:asym", "int4:g32:asym", "int8", "bf16")
  costs = {p: {c: mixed.stored_bits(c, (128, n // 128)) for c in choices} for p, n in sizes.items()}
  errors = {
    p: dict(zip(choices, np.sort(rng.exponential(size=4))[::-1] * rng.uniform(1, 50)))
    for p in sizes
  }
  got = mixed.allocate(sizes, errors, 6.0, costs)
  budget = 6.0 * sum(sizes.values())
  spent = lambda pick: sum(costs[p][c] for p, c in pick.items())
  total = lambda pick: sum(errors[p][c] for p, c in pick.items())
  feasible = [dict(zip(sizes, combo)) for combo in itertools.product(choices, repeat=len(sizes))]
  best = min((f for f in feasible if spent(f) <= budget), key=total)
  assert spent(got) <= budget and total(got) == pytest.approx(total(best), rel=1e-3)
  with pytest.raises(ValueError, match="cheapest"):
    mixed.allocate(sizes, errors, 4.2, costs)  # int4 g128 alone stores 4.3125 bits a weight


def test_allocation_spends_the_budget_on_the_sensitive_layer():
  sizes = {"quiet": 1 << 14, "loud": 1 << 14}
  choices = ("int4:g128:asym", "int8")
  costs = {p: {c: mixed.stored_bits(c, (128, 128)) for c in choices} for p in sizes}
  errors = {
    "quiet": {"int4:g128:asym": 1.0, "int8": 0.01},
    "loud": {"int4:g128:asym": 50.0, "int8": 0.5},
  }
  assert mixed.allocate(sizes, errors, 6.5, costs) == {"quiet": "int4:g128:asym", "loud": "int8"}
  assert mixed.stored_bits("int4:g128:asym", (128, 128)) == 4.3125 * 128 * 128


def test_awq_group_search_lowers_the_summed_output_error_of_layers_sharing_an_input():
  x, w1 = _layer(4)
  w2 = np.random.default_rng(5).normal(size=w1.shape).astype(np.float32) * 0.1
  spec = jq.QuantSpec.parse("int4:g16:asym")
  s, _, ratio = awq_search(x, np.mean(np.abs(x), 0), [w1, w2], spec)
  err = lambda s: sum(
    float(
      np.sum((x @ w - (x / s) @ np.asarray(jq.dequantize(jq.quantize(w * s[:, None], spec)))) ** 2)
    )
    for w in (w1, w2)
  )
  assert err(s) == pytest.approx(ratio * err(np.ones(64, np.float32)), rel=1e-3)
  assert err(s) < 0.9 * err(np.ones(64, np.float32))


class _TwoBlocks(nn.Module):
  """Two blocks ``x ← x + down(relu(up(x)))`` over ``[B, S, 32]`` inputs."""

  @nn.compact
  def __call__(self, x):
    for i in range(2):
      h = nn.relu(nn.Dense(64, name=f"layers_{i}_up")(x))
      x = x + nn.Dense(32, name=f"layers_{i}_down")(h)
    return x


def _two_blocks():
  model = _TwoBlocks()
  x = jax.random.normal(jax.random.key(0), (4, 16, 32)).at[..., :2].multiply(8.0)
  params = model.init(jax.random.key(1), x)["params"]
  return model, params, [(x[:2],), (x[2:],)]


def test_row_mask_keeps_padding_out_of_the_calibration_statistics():
  from jaxquant.ptq.capture import capture, collect_inputs, hessian_observer

  model, params, batches = _two_blocks()
  rules = jq.default_rules("int4:g16:asym")
  padded = [(jnp.concatenate([b[0], 100.0 * jnp.ones((2, 4, 32))], axis=1),) for b in batches]
  real = lambda batch: jnp.arange(batch[0].shape[1]) < 16
  path = "layers_0_up/kernel"
  want = capture(model, params, rules, batches, hessian_observer([path]))[path]
  got = capture(model, params, rules, padded, hessian_observer([path]), real)[path]
  np.testing.assert_allclose(np.asarray(got["h"]), np.asarray(want["h"]), rtol=1e-5)
  assert float(got["n"]) == float(want["n"]) == 64
  assert collect_inputs(model, params, rules, padded, [path], real)[path].shape == (64, 32)


def test_awq_recipe_beats_round_to_nearest_on_the_model_output():
  from jaxquant.recipes import apply_recipe

  model, params, batches = _two_blocks()
  rules = (jq.Rule(".*", "int4:g16:asym"),)
  ref = [model.apply({"params": params}, *b) for b in batches]

  def err(result):
    fq = jqf.quantize_model(model, result.rules, "serve")
    return sum(
      float(jnp.sum((fq.apply({"params": result.qparams}, *b) - r) ** 2))
      for b, r in zip(batches, ref)
    )

  data = jq.ptq.CalibrationSet(model, batches)
  awq = apply_recipe(jq.Recipe("awq", rules, steps=(("awq", {}), ("awq_clip", {}))), params, data)
  rtn = apply_recipe(jq.Recipe("rtn", rules), params, data)
  assert set(awq.info["awq"]) >= {"layers_0_up/kernel", "layers_1_down/kernel"}
  assert err(awq) < 0.8 * err(rtn)
