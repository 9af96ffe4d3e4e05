"""Stacked layers: QArrays under `jax.vmap` and `lax.scan`, `batch_dims` rules, and a Linen
model whose layers are an `nn.scan`, served quantized."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq
from jaxquant import flax as jqf
from jaxquant import ops
from jaxquant.flax import nnx as jqn
from jaxquant.ops import explain, qdot_general


@pytest.fixture(autouse=True)
def _xla_lowerings():
  """These tests pin XLA's own integer lowerings; the kernels are tested in test_cpu_kernels."""
  with ops.lowering_scope(kernels=False):
    yield


DENSE = (((1,), (0,)), ((), ()))
STACK_SPECS = [
  "int8",
  "int8:channel@0",
  "int4:g16:asym",
  "uint4:g16",
  "nf4:g16",
  "fp8_e4m3",
  "int8:tensor",
  "bf16",
]


@pytest.fixture(scope="module")
def stack():
  return jax.random.normal(jax.random.key(0), (3, 64, 33))  # odd last axis: a padded nibble


def _per_layer(stack, spec):
  return np.stack([np.asarray(jq.dequantize(jq.quantize(w, spec))) for w in stack])


@pytest.mark.parametrize("spec", STACK_SPECS)
def test_vmap_of_quantize_gives_a_qarray_whose_shape_is_the_stack(stack, spec):
  q = jax.vmap(lambda w: jq.quantize(w, spec))(stack)
  assert q.shape == stack.shape and q.ndim == 3 and q.size == stack.size
  np.testing.assert_array_equal(np.asarray(jq.dequantize(q)), _per_layer(stack, spec))
  np.testing.assert_array_equal(np.asarray(jax.vmap(jq.dequantize)(q)), _per_layer(stack, spec))


@pytest.mark.parametrize("spec", STACK_SPECS)
def test_batch_dims_quantize_each_slice_as_vmap_would(stack, spec):
  q = jq.quantize(stack, spec, batch_dims=1)
  v = jax.vmap(lambda w: jq.quantize(w, spec))(stack)
  for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(v)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(
    np.asarray(jq.fake_quant(stack, spec, batch_dims=1)), _per_layer(stack, spec)
  )


def test_whole_stack_scales_differ_from_per_layer_ones(stack):
  """Without batch_dims a channel scale spans all layers: the slices are not independent."""
  loud = stack.at[0].multiply(10.0)
  shared = np.asarray(jq.dequantize(jq.quantize(loud, "int8")))
  assert not np.array_equal(shared[1:], _per_layer(loud, "int8")[1:])


@pytest.mark.parametrize("spec", ["int8", "int4:g16:asym", "nf4:g16"])
def test_scan_slices_a_stacked_qarray_into_layers(stack, spec):
  q = jq.quantize(stack, spec, batch_dims=1)
  x = jax.random.normal(jax.random.key(1), (5, 64))

  def body(carry, layer):
    assert isinstance(layer, jq.QArray) and layer.shape == (64, 33)
    return carry, qdot_general(x, layer, DENSE)

  _, ys = jax.lax.scan(body, None, q)
  want = np.einsum("mk,lkn->lmn", np.asarray(x), _per_layer(stack, spec))
  np.testing.assert_allclose(np.asarray(ys), want, rtol=1e-5, atol=1e-5)


def test_vmapped_int8_contraction_keeps_the_integer_dot(stack):
  w = stack[..., :32]
  q = jq.quantize(w, "int8", batch_dims=1)
  xs = jax.random.normal(jax.random.key(2), (3, 4, 64))
  fn = jax.vmap(lambda q, x: qdot_general(x, q, DENSE, lhs_spec="int8:token"))
  got = np.asarray(fn(q, xs))
  want = np.stack(
    [
      np.asarray(
        qdot_general(x, jax.tree.map(lambda a, i=i: a[i], q), DENSE, lhs_spec="int8:token")
      )
      for i, x in enumerate(xs)
    ]
  )
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  assert "i32" in str(jax.make_jaxpr(fn)(q, xs))


def test_serving_layout_of_a_stack_keeps_its_values(stack):
  q = jq.quantize(stack[..., :32], "int4:g16:asym", batch_dims=1)
  stored = jq.ops.contraction_minor(q, (1,))
  assert stored.shape == q.shape and stored.values.shape == (3, 32, 32)
  np.testing.assert_array_equal(np.asarray(jq.dequantize(stored)), np.asarray(jq.dequantize(q)))
  layer = jax.tree.map(lambda a: a[1], stored)
  assert layer.shape == (64, 32)
  np.testing.assert_array_equal(np.asarray(jq.dequantize(layer)), np.asarray(jq.dequantize(q))[1])


def test_construction_checks_the_children_agree():
  q = jq.quantize(jnp.ones((8, 4)), "int4:g4:asym")
  with pytest.raises(ValueError, match="scale shape"):
    jq.QArray(q.values, q.scale[..., :2], q.zero_point[..., :2], q.spec, q.dtype, q.packed, q.pad)
  with pytest.raises(ValueError, match="values are int8"):
    jq.QArray(q.values.astype(jnp.int8), q.scale, q.zero_point, q.spec, q.dtype, True, 0)
  with pytest.raises(ValueError, match="zero point"):
    jq.QArray(q.values, q.scale, None, q.spec, q.dtype, q.packed, q.pad)
  with pytest.raises(ValueError, match="pad"):
    jq.QArray(q.values, q.scale, q.zero_point, q.spec, q.dtype, False, 1)


# --------------------------------------------------------------------------- nn.scan
class Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    h = jax.nn.gelu(nn.Dense(48, name="up")(x))
    return x + nn.Dense(32, name="down")(h), None


class Scanned(nn.Module):
  """Four identical blocks as one `nn.scan`: params stacked ``[4, ...]``, as MaxText keeps them."""

  @nn.compact
  def __call__(self, x):
    layers = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=4)
    x, _ = layers(name="layers")(x, None)
    return nn.Dense(8, name="head")(x)


@pytest.fixture(scope="module")
def scanned():
  model = Scanned()
  x = jax.random.normal(jax.random.key(3), (2, 6, 32))
  params = model.init(jax.random.key(4), x)["params"]
  return model, params, x


STACKED_RULES = [
  jq.Rule("layers/", "int8", "int8:token", batch_dims=1),
  jq.Rule(".*", "int8", "int8:token"),
]


def test_a_scanned_model_quantizes_per_layer_and_serves_the_integer_path(scanned):
  model, params, x = scanned
  assert params["layers"]["up"]["kernel"].shape == (4, 32, 48)
  plan = jq.plan(params, STACKED_RULES)
  row = next(r for r in plan.rows if r.path == "layers/up/kernel")
  assert row.batch_dims == 1 and row.bytes_after == 4 * row.spec.nbytes((32, 48))
  qparams = jq.quantize_params(params, STACKED_RULES)
  up = qparams["layers"]["up"]["kernel"]
  assert up.shape == (4, 32, 48) and up.scale.shape == (4, 1, 48)
  serve = jqf.quantize_model(model, STACKED_RULES, "serve")
  fake = jqf.quantize_model(model, STACKED_RULES, "fake")
  got = np.asarray(jax.jit(serve.apply)({"params": qparams}, x))
  want = np.asarray(fake.apply({"params": params}, x))
  ref = np.asarray(model.apply({"params": params}, x))
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)  # serve = fake up to rounding
  assert np.max(np.abs(got - ref)) < 0.05 * np.max(np.abs(ref))
  jaxpr = str(jax.make_jaxpr(serve.apply)({"params": qparams}, x))
  assert "preferred_element_type=int32" in jaxpr
  layer = jax.tree.map(lambda a: a[2], up)
  assert str(
    explain(jax.ShapeDtypeStruct((12, 32), jnp.float32), layer, None, "int8:token")
  ).startswith("int8")


def test_a_scanned_model_round_trips_through_a_checkpoint(scanned, tmp_path):
  _, params, _ = scanned
  qparams = jq.quantize_params(params, [jq.Rule("layers/", "int4:g16:asym", batch_dims=1)])
  jq.save(tmp_path / "m.safetensors", qparams)
  back = jq.load(tmp_path / "m.safetensors")
  up, again = qparams["layers"]["up"]["kernel"], back["layers"]["up"]["kernel"]
  assert again.shape == up.shape == (4, 32, 48)
  np.testing.assert_array_equal(np.asarray(jq.dequantize(again)), np.asarray(jq.dequantize(up)))


def test_vmap_over_stacked_params_of_an_unchanged_layer(scanned):
  """`jax.vmap` over a stack of serve-mode Dense params (an ensemble) works like a loop."""
  dense = nn.Dense(48)
  rules = [jq.Rule("kernel", "int4:g16", batch_dims=1)]
  stacked = {
    "kernel": jax.random.normal(jax.random.key(5), (3, 32, 48)),
    "bias": jnp.zeros((3, 48)),
  }
  qstack = jq.quantize_params(stacked, rules)
  serve = jqf.quantize_model(dense, [jq.Rule("kernel", "int4:g16")], "serve")
  x = jax.random.normal(jax.random.key(6), (5, 32))
  got = jax.vmap(lambda p: serve.apply({"params": p}, x))(qstack)
  for i in range(3):
    one = jax.tree.map(lambda a, i=i: a[i], qstack)
    np.testing.assert_allclose(
      np.asarray(got[i]), np.asarray(serve.apply({"params": one}, x)), rtol=1e-5, atol=1e-5
    )


def test_nnx_serve_model_under_vmap_over_stacked_states():
  """An NNX serve-mode layer's state stacks (QArray kernels included) and vmaps like a loop."""
  rules = [jq.Rule(".*", "int8", "int8:token")]
  models = [jqn.quantize_model(nnx.Linear(32, 16, rngs=nnx.Rngs(i)), rules) for i in range(3)]
  graphdef, _ = nnx.split(models[0])
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *[nnx.split(m)[1] for m in models])
  assert stacked["kernel"].get_value().shape == (3, 32, 16)
  x = jax.random.normal(jax.random.key(7), (5, 32))
  got = jax.vmap(lambda s: nnx.merge(graphdef, s)(x))(stacked)
  for i, m in enumerate(models):
    np.testing.assert_allclose(np.asarray(got[i]), np.asarray(m(x)), rtol=1e-5, atol=1e-5)
