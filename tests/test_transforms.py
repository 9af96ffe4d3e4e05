"""Rules, plan and the param transforms on Linen params and NNX State."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq
from jaxquant.transforms import named_leaves


class LinenNet(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    h = nn.Embed(100, 32, name="embed")(tokens)
    h = nn.Dense(64, name="up")(h)
    h = nn.LayerNorm(name="norm")(h)
    h = nn.Conv(64, (3,), name="conv")(h)
    return nn.Dense(16, name="down")(jax.nn.gelu(h))


@pytest.fixture(scope="module")
def linen_params():
  return LinenNet().init(jax.random.key(0), jnp.zeros((2, 8), jnp.int32))["params"]


class NnxNet(nnx.Module):
  def __init__(self, rngs):
    self.up = nnx.Linear(32, 64, rngs=rngs)
    self.blocks = nnx.List([nnx.Linear(64, 64, rngs=rngs) for _ in range(2)])
    self.norm = nnx.LayerNorm(64, rngs=rngs)


def test_plan_lists_every_leaf_with_bytes_before_and_after(linen_params):
  p = jq.plan(linen_params, jq.default_rules("int8"))
  paths = {r.path: r for r in p.rows}
  assert paths["up/kernel"].spec == jq.QuantSpec.parse("int8")
  assert paths["up/kernel"].bytes_before == 32 * 64 * 4
  assert paths["up/kernel"].bytes_after == 32 * 64 + 64 * 4
  assert paths["conv/kernel"].spec is not None  # [3, 64, 64]: per output channel
  assert paths["embed/embedding"].spec is None and paths["embed/embedding"].note == "kept by rule"
  assert paths["up/bias"].spec is None and "<2 dims" in paths["up/bias"].note
  assert paths["norm/scale"].spec is None
  assert p.bytes_after < p.bytes_before
  assert "up/kernel" in str(p) and "tensors quantized" in str(p)


def test_first_matching_rule_wins(linen_params):
  rules = [
    jq.Rule("down", weight="int4:g16"),
    jq.Rule("kernel", weight="int8"),
    jq.Rule("down/kernel", weight="nf4"),
  ]
  with pytest.warns(UserWarning, match="'down/kernel' matched no parameter"):
    q = jq.quantize_params(linen_params, rules)
  assert q["down"]["kernel"].spec == jq.QuantSpec.parse("int4:g16")
  assert q["up"]["kernel"].spec == jq.QuantSpec.parse("int8")


def test_quantize_then_dequantize_keeps_the_tree_and_stays_close(linen_params):
  q = jq.quantize_params(linen_params, jq.default_rules("int8"))
  assert jax.tree.structure(jq.dequantize_params(q)) == jax.tree.structure(linen_params)
  assert isinstance(q["up"]["kernel"], jq.QArray) and not isinstance(q["up"]["bias"], jq.QArray)
  deq = jq.dequantize_params(q)
  for (path, a), (_, b) in zip(named_leaves(linen_params), named_leaves(deq)):
    rel = float(jnp.linalg.norm(a - b) / (jnp.linalg.norm(a) + 1e-12))
    assert rel < 0.01, path
  # the quantized model still runs, and its output is close to the float one
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 100)
  ref = LinenNet().apply({"params": linen_params}, tokens)
  out = LinenNet().apply({"params": deq}, tokens)
  assert float(jnp.max(jnp.abs(out - ref))) < 0.05 * float(jnp.max(jnp.abs(ref)))


def test_quantize_params_on_nnx_state_keeps_variables():
  model = NnxNet(nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  q = jq.quantize_params(state, jq.default_rules("int4:g32"))
  kernel = q["blocks"][0]["kernel"]
  assert isinstance(kernel, nnx.Param) and isinstance(kernel.get_value(), jq.QArray)
  paths = [p for p, _ in named_leaves(q)]
  assert "blocks/1/kernel" in paths
  restored = jq.dequantize_params(q)
  nnx.update(model, restored)
  np.testing.assert_allclose(
    np.asarray(model.up.kernel.get_value()),
    np.asarray(jq.dequantize(q["up"]["kernel"].get_value())),
  )


def test_fake_quant_params_is_differentiable_and_jittable(linen_params):
  rules = jq.default_rules("int8")
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 100)

  @jax.jit
  def loss(params):
    out = LinenNet().apply({"params": jq.fake_quant_params(params, rules)}, tokens)
    return jnp.mean(out**2)

  grads = jax.grad(loss)(linen_params)
  assert float(jnp.abs(grads["up"]["kernel"]).sum()) > 0
  assert float(jnp.abs(grads["embed"]["embedding"]).sum()) > 0
  fq = jq.fake_quant_params(linen_params, rules)
  deq = jq.dequantize_params(jq.quantize_params(linen_params, rules))
  np.testing.assert_array_equal(np.asarray(fq["up"]["kernel"]), np.asarray(deq["up"]["kernel"]))


def test_stochastic_rules_need_and_use_a_key(linen_params):
  rules = [jq.Rule("kernel", weight="int4:g16:stochastic")]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    with pytest.raises(ValueError, match="PRNG key"):
      jq.quantize_params(linen_params, rules)
    a = jq.quantize_params(linen_params, rules, key=jax.random.key(0))
    b = jq.quantize_params(linen_params, rules, key=jax.random.key(1))
  assert not np.array_equal(
    np.asarray(a["up"]["kernel"].values), np.asarray(b["up"]["kernel"].values)
  )


# --------------------------------------------------------------------------- bad input
def test_nan_is_reported_by_path_before_any_work(linen_params, monkeypatch):
  bad = jax.tree.map(lambda a: a, linen_params)
  bad["down"]["kernel"] = bad["down"]["kernel"].at[0, 0].set(jnp.nan)
  calls = []
  monkeypatch.setattr(jq.transforms, "quantize", lambda *a, **k: calls.append(1))
  with pytest.raises(ValueError, match=r"down/kernel: contains 1 NaN"):
    jq.quantize_params(bad, jq.default_rules("int8"))
  assert not calls  # nothing was quantized before the error


def test_bad_group_sizes_are_all_listed_with_their_paths(linen_params):
  with pytest.raises(ValueError) as err:
    jq.quantize_params(linen_params, [jq.Rule("kernel", weight="int4:g48")])
  text = str(err.value)
  assert "up/kernel: group size 48 does not divide axis 0 of size 32" in text
  assert "down/kernel: group size 48 does not divide axis 0 of size 64" in text
  assert "e.g. 32, 16" in text


def test_a_rule_that_matches_nothing_warns(linen_params):
  with pytest.warns(UserWarning, match=r"'attention' matched no parameter"):
    jq.quantize_params(linen_params, [jq.Rule("attention", weight="int8")])


def test_invalid_regex_and_spec_in_a_rule_are_errors():
  with pytest.raises(ValueError, match="not a valid regular expression"):
    jq.Rule("dense[", weight="int8")
  with pytest.raises(ValueError, match=r"Rule 'dense', weight: Unknown format 'int9'"):
    jq.Rule("dense", weight="int9")


def test_integer_leaves_are_kept_not_quantized():
  params = {"ids": jnp.arange(6).reshape(2, 3), "w": jnp.ones((4, 4))}
  q = jq.quantize_params(params, [jq.Rule(".*", weight="int8")])
  assert q["ids"].dtype == jnp.int32 and isinstance(q["w"], jq.QArray)
  assert (
    "kept (int32)" in {r.path: r.note for r in jq.plan(params, [jq.Rule(".*", "int8")]).rows}["ids"]
  )


def test_recipes_load_by_name_file_or_spec(tmp_path):
  assert jq.load_recipe("int8").rules[-1].weight == jq.QuantSpec.parse("int8")
  assert jq.load_recipe("int4:g64").rules[-1].weight == jq.QuantSpec.parse("int4:g64")
  f = tmp_path / "mine.yaml"
  f.write_text("rules:\n  - {pattern: 'kernel', weight: 'int4:g32:asym'}\n")
  assert jq.load_recipe(str(f)).rules[0].weight.symmetric is False
  f.write_text("rules:\n  - {pattern: 'kernel', wieght: 'int8'}\n")
  with pytest.raises(ValueError, match=r"rules\[0\] has unknown keys \['wieght'\]"):
    jq.load_recipe(str(f))
  with pytest.raises(ValueError, match="Unknown recipe 'nope'"):
    jq.load_recipe("nope")
