"""QArray as a pytree: jit, vmap, tree_map, and sharding over 8 simulated CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxquant as jq

SPECS = ["int8", "int8:token", "int4:g16:asym", "nf4:g16", "fp8_e4m3", "bf16"]


@pytest.fixture(scope="module")
def x():
  return jax.random.normal(jax.random.key(0), (64, 32))


@pytest.mark.parametrize("spec", SPECS)
def test_passes_through_jit_unchanged(x, spec):
  q = jq.quantize(x, spec)
  out = jax.jit(lambda a: a)(q)
  assert isinstance(out, jq.QArray) and out.spec == q.spec and out.shape == q.shape
  np.testing.assert_array_equal(np.asarray(jq.dequantize(out)), np.asarray(jq.dequantize(q)))
  np.testing.assert_array_equal(np.asarray(jax.jit(jq.dequantize)(q)), np.asarray(jq.dequantize(q)))


def test_metadata_is_static_and_children_are_arrays(x):
  q = jq.quantize(x, "int4:g16:asym")
  leaves, treedef = jax.tree.flatten(q)
  assert len(leaves) == 3 and all(isinstance(a, jax.Array) for a in leaves)
  assert jax.tree.unflatten(treedef, leaves).spec == q.spec
  symmetric = jq.quantize(x, "int8")
  assert len(jax.tree.leaves(symmetric)) == 2  # no zero point


@pytest.mark.parametrize("spec", SPECS)
def test_vmap_quantizes_each_slice_like_a_loop(spec):
  xs = jax.random.normal(jax.random.key(1), (3, 32, 16))
  qs = jax.vmap(lambda a: jq.quantize(a, spec))(xs)
  batched = jax.vmap(jq.dequantize)(qs)
  for i in range(3):
    np.testing.assert_array_equal(
      np.asarray(batched[i]), np.asarray(jq.dequantize(jq.quantize(xs[i], spec)))
    )


def test_tree_map_and_stacking_keep_the_metadata(x):
  qs = [jq.quantize(x * (i + 1), "int4:g8") for i in range(2)]
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *qs)
  assert stacked.spec == qs[0].spec and stacked.values.shape[0] == 2
  np.testing.assert_allclose(
    np.asarray(jax.vmap(jq.dequantize)(stacked)[1]), np.asarray(jq.dequantize(qs[1]))
  )


def test_no_gradient_flows_into_integer_codes(x):
  q = jq.quantize(x, "int8")

  def loss(scale):
    return jnp.sum(jq.dequantize(jq.QArray(q.values, scale, None, q.spec, q.dtype)))

  g = jax.grad(loss)(q.scale)  # gradient w.r.t. the float scale works; codes are constants
  assert g.shape == q.scale.shape and bool(jnp.all(jnp.isfinite(g)))


# --------------------------------------------------------------------------- sharding
@pytest.fixture(scope="module")
def mesh():
  devices = jax.devices()
  if len(devices) < 8:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (set in conftest)")
  return Mesh(np.array(devices[:8]).reshape(2, 4), ("data", "model"))


@pytest.mark.parametrize(
  "spec, pspec",
  [
    ("int8", P("data", "model")),
    ("int8", P(None, "model")),
    ("int4:g16", P("data", "model")),
    ("int4:g16:asym", P("model", None)),
    ("nf4:g8", P(None, "model")),
    ("int8:token", P("data", None)),
    ("fp8_e4m3:tensor", P("data", "model")),
  ],
)
def test_named_sharding_is_kept_consistently(mesh, spec, pspec):
  x = jax.random.normal(jax.random.key(2), (64, 128))
  sharding = NamedSharding(mesh, pspec)
  q = jq.quantize(x, spec)
  target = jq.qarray_sharding(q, sharding)
  placed = jax.device_put(q, target)
  assert placed.values.sharding.is_equivalent_to(target.values, placed.values.ndim)
  if placed.scale is not None:
    assert placed.scale.sharding.is_equivalent_to(target.scale, placed.scale.ndim)
  # quantizing a sharded input under jit, with the derived out_shardings, agrees bit for bit
  xs = jax.device_put(x, sharding)
  jitted = jax.jit(lambda a: jq.quantize(a, spec), out_shardings=target)(xs)
  for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(q)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert jitted.values.sharding.is_equivalent_to(target.values, jitted.values.ndim)
  # and dequantizing the sharded QArray gives the unsharded result, sharded like x
  out = jax.jit(jq.dequantize, out_shardings=sharding)(placed)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(jq.dequantize(q)))


def test_per_channel_scales_split_with_their_values(mesh):
  x = jax.random.normal(jax.random.key(3), (64, 128))
  q = jq.quantize(x, "int8")  # one scale per output column: shape (1, 128)
  target = jq.qarray_sharding(q, NamedSharding(mesh, P("data", "model")))
  assert target.scale.spec == P(None, "model")  # replicated over rows, split over columns
  placed = jax.device_put(q, target)
  for shard in placed.scale.addressable_shards:
    assert shard.data.shape == (1, 32)


# --------------------------------------------------------------------------- lowering
@pytest.mark.parametrize("spec", ["int8", "int4:g16:asym", "nf4:g16", "fp8_e4m3"])
def test_quantize_and_dequantize_lower_for_cpu_cuda_and_tpu(spec):
  from jax import export

  x = jax.ShapeDtypeStruct((64, 32), jnp.float32)
  exported = export.export(
    jax.jit(lambda a: jq.dequantize(jq.quantize(a, spec))), platforms=("cpu", "cuda", "tpu")
  )(x)
  assert exported.platforms == ("cpu", "cuda", "tpu")
  restored = export.deserialize(exported.serialize())
  a = jax.random.normal(jax.random.key(4), (64, 32))
  np.testing.assert_array_equal(
    np.asarray(restored.call(a)), np.asarray(jq.dequantize(jq.quantize(a, spec)))
  )
