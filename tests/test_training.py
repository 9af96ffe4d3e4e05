"""Precision policy, loss scaling, QAT step, LSQ and PACT, conversion to serving."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxquant as jq
from jaxquant import flax as jqf
from jaxquant import training
from jaxquant.training import DynamicLossScale, Policy, TrainState


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = jax.nn.gelu(nn.Dense(64, name="fc1")(x))
    return nn.Dense(8, name="fc2")(x)


RULES = [jq.Rule(".*", weight="int8", act="int8:tensor")]
W_ONLY = [jq.Rule(".*", weight="int4:g16")]


def _loss(apply, params, batch):
  out = apply({"params": params}, batch["x"])
  return jnp.mean((out.astype(jnp.float32) - batch["y"].astype(jnp.float32)) ** 2)


@pytest.fixture(scope="module")
def data():
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (64, 32))
  y = jnp.tanh(x @ jax.random.normal(kw, (32, 8)) * 0.3)
  params = MLP().init(jax.random.key(1), x)["params"]
  return {"x": x, "y": y}, params


def test_policy_parses_and_casts():
  p = Policy.parse("params=float32,compute=bfloat16,output=float32")
  assert (
    p.compute_dtype == jnp.bfloat16 and str(p) == "params=float32,compute=bfloat16,output=float32"
  )
  tree = {"w": jnp.ones(3), "ids": jnp.arange(3)}
  cast = p.cast_to_compute(tree)
  assert cast["w"].dtype == jnp.bfloat16 and cast["ids"].dtype == tree["ids"].dtype
  with pytest.raises(ValueError, match="Unknown dtype 'bf17'"):
    Policy.parse("compute=bf17")
  with pytest.raises(ValueError, match="Bad policy part"):
    Policy.parse("compute")


def test_bf16_step_keeps_fp32_master_weights_and_moments(data):
  batch, params = data
  opt = optax.adam(1e-3)
  policy = Policy.parse("params=float32,compute=bfloat16,output=float32")
  step = training.make_train_step(MLP(), W_ONLY, opt, _loss, policy)
  state = TrainState.create(params, opt)
  jaxpr = str(jax.make_jaxpr(step)(state, batch))
  dots = [ln for ln in jaxpr.splitlines() if "dot_general" in ln]
  assert dots and all("bf16" in ln for ln in dots)  # forward and backward matmuls in BF16
  state, metrics = step(state, batch)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.params))
  mu = state.opt_state[0].mu
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(mu))
  assert bool(metrics["finite"])


def test_qat_step_reduces_the_loss(data):
  batch, params = data
  opt = optax.adam(3e-3)
  step = training.make_train_step(MLP(), W_ONLY, opt, _loss)
  state = TrainState.create(params, opt)
  first = None
  for _ in range(30):
    state, metrics = step(state, batch)
    first = float(metrics["loss"]) if first is None else first
  assert float(metrics["loss"]) < 0.7 * first


def test_loss_scaling_skips_non_finite_steps_and_recovers(data):
  batch, params = data
  opt = optax.sgd(1e-2)
  policy = Policy.parse("compute=float16")
  step = training.make_train_step(MLP(), W_ONLY, opt, _loss, policy)
  state = TrainState.create(params, opt, DynamicLossScale(period=2))
  bad = {"x": batch["x"].at[0, 0].set(jnp.inf), "y": batch["y"]}
  after_bad, metrics = step(state, bad)
  assert not bool(metrics["finite"])
  assert float(after_bad.loss_scale.scale) == float(state.loss_scale.scale) / 2
  for a, b in zip(jax.tree.leaves(after_bad.params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  good, metrics = step(after_bad, batch)
  good, metrics = step(good, batch)
  assert bool(metrics["finite"]) and int(good.step) == 2
  assert float(good.loss_scale.scale) == float(after_bad.loss_scale.scale) * 2  # grew after 2
  assert not np.array_equal(
    np.asarray(good.params["fc1"]["kernel"]), np.asarray(state.params["fc1"]["kernel"])
  )


def test_lsq_gradient_matches_its_formula():
  x = jnp.array([[-3.0, -0.26, 0.1, 0.74, 9.0]])
  s = jnp.array([[0.5]])
  spec = jq.QuantSpec.parse("int4:tensor")  # Q = 7
  g_x, g_s = jax.grad(lambda x, s: jnp.sum(training.lsq_fake_quant(x, s, spec)), (0, 1))(x, s)
  v = np.asarray(x / s)
  inside = np.abs(v) <= 7
  np.testing.assert_array_equal(np.asarray(g_x), inside.astype(np.float32))
  expected = np.sum(np.where(inside, np.round(v) - v, np.sign(v) * 7)) / np.sqrt(5 * 7)
  np.testing.assert_allclose(float(g_s[0, 0]), expected, rtol=1e-5)


def test_pact_alpha_gets_the_clipped_gradient():
  x = jnp.array([-5.0, -0.5, 0.2, 2.0, 7.0])
  g_x, g_a = jax.grad(lambda x, a: jnp.sum(training.pact_fake_quant(x, a, "int8")), (0, 1))(
    x, jnp.asarray(1.5)
  )
  np.testing.assert_array_equal(np.asarray(g_x), [0, 1, 1, 0, 0])
  assert float(g_a) == pytest.approx(-1 + 1 + 1)


def test_lsq_and_pact_parameters_train_and_convert_matches_fake(data):
  batch, params = data
  qat = training.add_learned_quantizers(params, RULES, activations=True, pact_init=3.0)
  assert set(qat["fc1"]) == {"kernel", "bias", "lsq_scale", "pact_alpha"}
  opt = optax.adam(3e-3)
  step = training.make_train_step(MLP(), RULES, opt, _loss)
  state = TrainState.create(qat, opt)
  for _ in range(10):
    state, _ = step(state, batch)
  for name in ("lsq_scale", "pact_alpha"):
    assert not np.allclose(np.asarray(state.params["fc1"][name]), np.asarray(qat["fc1"][name]))
  fake = jqf.quantize_model(MLP(), RULES, "fake").apply({"params": state.params}, batch["x"])
  qparams, stats = training.convert(state.params, RULES)
  assert isinstance(qparams["fc1"]["kernel"], jq.QArray) and "lsq_scale" not in qparams["fc1"]
  serve = jqf.quantize_model(MLP(), RULES, "serve", calibration=stats)
  out = jax.jit(serve.apply)({"params": qparams}, batch["x"])
  np.testing.assert_allclose(np.asarray(out), np.asarray(fake), rtol=1e-4, atol=1e-4)
  text = jax.jit(serve.apply).lower({"params": qparams}, batch["x"]).as_text()
  assert "xi8>) -> tensor<64x64xi32>" in text


def test_learned_parameters_outside_fake_mode_are_an_error(data):
  batch, params = data
  qat = training.add_learned_quantizers(params, RULES)
  serve = jqf.quantize_model(MLP(), RULES, "serve")
  with pytest.raises(ValueError, match=r"jaxquant\.training\.convert"):
    serve.apply({"params": qat}, batch["x"])
