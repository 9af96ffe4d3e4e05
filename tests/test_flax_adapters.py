"""Unchanged Linen and NNX models with Dense, DenseGeneral, Einsum and Conv in all three modes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import export

import jaxquant as jq
from jaxquant import flax as jqf
from jaxquant import ops
from jaxquant.flax import nnx as jqn


@pytest.fixture(autouse=True)
def _xla_lowerings():
  """These tests pin XLA's own integer lowerings; the kernels are tested in test_cpu_kernels."""
  with ops.lowering_scope(kernels=False):
    yield


RULES = [
  jq.Rule("conv", weight="int8", act="int8:tensor"),
  jq.Rule(".*", weight="int8", act="int8:token"),
]
# group along a contraction axis of each kernel: heads [64, 4, 16], mix [4, 16, 32]
WEIGHT_ONLY_INT4 = [
  jq.Rule("heads", weight="int4:g16@0"),
  jq.Rule("mix", weight="int4:g16@1"),
  jq.Rule(".*", weight="int4:g16"),
]


class LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(64, name="up")(x)
    h = nn.DenseGeneral((4, 16), name="heads")(h)
    h = nn.Einsum((4, 16, 32), "bthk,hkd->btd", name="mix")(h)
    h = nn.Conv(32, (3,), name="conv")(jax.nn.gelu(h))
    return nn.Dense(8, name="down")(h)


class NnxNet(nnx.Module):
  def __init__(self, rngs):
    self.up = nnx.Linear(32, 64, rngs=rngs)
    self.heads = nnx.LinearGeneral(64, (4, 16), rngs=rngs)
    self.mix = nnx.Einsum("bthk,hkd->btd", (4, 16, 32), (32,), rngs=rngs)
    self.conv = nnx.Conv(32, 32, (3,), rngs=rngs)
    self.down = nnx.Linear(32, 8, rngs=rngs)

  def __call__(self, x):
    h = self.heads(self.up(x))
    return self.down(self.conv(jax.nn.gelu(self.mix(h))))


def _rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.fixture(scope="module")
def x():
  return jax.random.normal(jax.random.key(0), (2, 10, 32))


@pytest.fixture(scope="module")
def linen(x):
  model = LinenNet()
  params = model.init(jax.random.key(1), x)["params"]
  return model, params, model.apply({"params": params}, x)


@pytest.fixture(scope="module")
def linen_stats(linen, x):
  model, params, _ = linen
  cal = jqf.quantize_model(model, RULES, "calibrate")
  step = jax.jit(cal.apply)
  _, stats = step({"params": params}, x, key=jax.random.key(0))
  _, stats = step({"params": params}, 0.5 * x, stats=stats, key=jax.random.key(1))
  return stats


def test_linen_calibrate_collects_stats_without_changing_outputs(linen, x, linen_stats):
  model, params, ref = linen
  assert sorted(linen_stats) == [
    "conv/kernel",
    "down/kernel",
    "heads/kernel",
    "mix/kernel",
    "up/kernel",
  ]
  assert float(linen_stats["up/kernel"]["count"]) == 2 * x.size
  np.testing.assert_allclose(float(linen_stats["up/kernel"]["absmax"]), float(jnp.max(jnp.abs(x))))
  out, _ = jqf.quantize_model(model, RULES, "calibrate").apply({"params": params}, x)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rules, tol", [(RULES, 0.05), (WEIGHT_ONLY_INT4, 0.35)])  # 5 random layers
def test_linen_serve_and_fake_agree_under_jit(linen, x, linen_stats, rules, tol):
  model, params, ref = linen
  serve = jqf.quantize_model(model, rules, "serve", calibration=linen_stats)
  fake = jqf.quantize_model(model, rules, "fake", calibration=linen_stats)
  y_serve = jax.jit(serve.apply)({"params": jq.quantize_params(params, rules)}, x)
  y_fake = jax.jit(fake.apply)({"params": params}, x)
  np.testing.assert_allclose(np.asarray(y_serve), np.asarray(y_fake), rtol=1e-4, atol=1e-5)
  assert 0 < _rel(y_serve, ref) < tol


def test_linen_serve_lowers_dense_to_an_integer_dot(linen, x, linen_stats):
  model, params, _ = linen
  serve = jqf.quantize_model(model, RULES, "serve", calibration=linen_stats)
  text = jax.jit(serve.apply).lower({"params": jq.quantize_params(params, RULES)}, x).as_text()
  dots = [ln for ln in text.splitlines() if "stablehlo.dot_general" in ln]
  assert any("tensor<2x10x32xi8>, tensor<32x64xi8>) -> tensor<2x10x64xi32>" in d for d in dots)
  assert sum("i32>" in d for d in dots) == 4  # up, heads, mix, down
  assert any("stablehlo.convolution" in ln and "xi32>" in ln for ln in text.splitlines())


def test_linen_serve_exports_for_cpu_cuda_tpu(linen, x):
  model, params, _ = linen
  serve = jqf.quantize_model(model, RULES[1:], "serve")
  qparams = jq.quantize_params(params, RULES[1:])
  fn = jax.jit(serve.apply)
  exported = export.export(fn, platforms=("cpu", "cuda", "tpu"))({"params": qparams}, x)
  restored = export.deserialize(exported.serialize())
  np.testing.assert_array_equal(
    np.asarray(restored.call({"params": qparams}, x)), np.asarray(fn({"params": qparams}, x))
  )


def test_linen_fake_mode_gradients_reach_every_kernel(linen, x, linen_stats):
  model, params, _ = linen
  fake = jqf.quantize_model(model, RULES, "fake", calibration=linen_stats)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(fake.apply({"params": p}, x) ** 2)))(params)
  for name in ("up", "heads", "mix", "conv", "down"):
    assert float(jnp.abs(grads[name]["kernel"]).sum()) > 0, name


def test_static_activation_spec_without_calibration_is_a_clear_error(linen, x):
  model, params, _ = linen
  serve = jqf.quantize_model(model, RULES, "serve")
  with pytest.raises(ValueError, match=r"conv/kernel: activation spec int8:tensor is per-tensor"):
    serve.apply({"params": jq.quantize_params(params, RULES)}, x)


def test_layers_no_rule_matches_run_unchanged(linen, x):
  model, params, ref = linen
  serve = jqf.quantize_model(model, [jq.Rule("nothing-matches", weight="int8")], "serve")
  np.testing.assert_array_equal(np.asarray(serve.apply({"params": params}, x)), np.asarray(ref))


# --------------------------------------------------------------------------- NNX
def test_nnx_all_modes(x):
  model = NnxNet(nnx.Rngs(0))
  ref = model(x)
  step = nnx.jit(lambda m, v: m(v))
  cal = jqn.quantize_model(model, RULES, "calibrate")
  np.testing.assert_allclose(np.asarray(step(cal, x)), np.asarray(ref), rtol=1e-5, atol=1e-6)
  step(cal, 0.5 * x)
  stats = jqn.activation_stats(cal)
  assert float(stats["conv/kernel"]["count"]) > 0 and len(stats) == 5
  serve = jqn.quantize_model(model, RULES, "serve", calibration=stats)
  fake = jqn.quantize_model(model, RULES, "fake", calibration=stats)
  assert isinstance(serve.up.kernel.get_value(), jq.QArray)
  assert type(model.up) is nnx.Linear and not isinstance(model.up.kernel.get_value(), jq.QArray)
  y_serve, y_fake = step(serve, x), step(fake, x)
  np.testing.assert_allclose(np.asarray(y_serve), np.asarray(y_fake), rtol=1e-4, atol=1e-5)
  assert 0 < _rel(y_serve, ref) < 0.05
  grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(fake)
  assert float(jnp.abs(grads.mix.kernel.get_value()).sum()) > 0


def test_nnx_serve_lowers_to_integer_dots(x):
  model = NnxNet(nnx.Rngs(0))
  serve = jqn.quantize_model(model, RULES[1:], "serve")
  graphdef, state = nnx.split(serve)
  text = jax.jit(lambda s, v: nnx.merge(graphdef, s)(v)).lower(state, x).as_text()
  assert sum("stablehlo.dot_general" in ln and "i32>" in ln for ln in text.splitlines()) == 4


def test_quantize_params_on_nnx_state_matches_serve_model(x):
  model = NnxNet(nnx.Rngs(0))
  q_state = jq.quantize_params(nnx.state(model, nnx.Param), WEIGHT_ONLY_INT4)
  serve = jqn.quantize_model(model, WEIGHT_ONLY_INT4, "serve")
  np.testing.assert_array_equal(
    np.asarray(q_state["up"]["kernel"].get_value().values),
    np.asarray(serve.up.kernel.get_value().values),
  )
