"""Orbax checkpoints of quantized trees: saved sharded on one mesh, restored straight into the
shardings of another, bit for bit, with every QArray's static metadata and no template."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxquant as jq
from jaxquant import io
from jaxquant.ops.lowerings import serving_layout
from jaxquant.qarray import QArray

AXES = ("data", "model")


def _mesh(shape: tuple[int, int]) -> jax.sharding.Mesh:
  return jax.make_mesh(shape, AXES, devices=jax.devices()[: shape[0] * shape[1]])


def _rule(mesh) -> io.LeafSharding:
  """Kernels split over both axes (rows over data, columns over model); vectors replicated."""
  return lambda path, shape: NamedSharding(mesh, P(*AXES) if len(shape) >= 2 else P())


def _tree() -> dict:
  """int8 per channel, int4 groups with zero points (packed), a kernel stored contraction-minor
  (`perm`), bf16 and int32 leaves."""
  rng = np.random.default_rng(0)
  w = rng.standard_normal((64, 128), np.float32)
  q8 = jq.quantize(w, "int8")
  return {
    "layers": [
      {"kernel": q8, "bias": jnp.asarray(w[0])},
      {"kernel": jq.quantize(w, "int4:g32:asym"), "norm": jnp.asarray(w[1], jnp.bfloat16)},
    ],
    "served": serving_layout({"kernel": q8})["kernel"],
    "step": jnp.asarray(7, jnp.int32),
  }


def _placed(tree, mesh):
  rule = _rule(mesh)

  def put(path, leaf):
    s = rule(path, leaf.shape)
    return jax.device_put(leaf, jq.qarray_sharding(leaf, s) if isinstance(leaf, QArray) else s)

  return jq.transforms.map_leaves(put, tree)


def _bits(x) -> np.ndarray:
  return np.asarray(jax.device_get(x)).reshape(-1).view(np.uint8)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  tree = _placed(_tree(), _mesh((2, 4)))
  assert tree["layers"][0]["kernel"].values.sharding.spec == P(*AXES)
  assert tree["served"].perm == (1, 0) and tree["layers"][1]["kernel"].packed
  return tree, io.save_orbax(tmp_path_factory.mktemp("orbax") / "ckpt", tree)


@pytest.mark.parametrize("shape", [(8, 1), (1, 8), (2, 4)])
def test_restore_into_another_mesh_is_bit_exact_with_the_target_shardings(saved, shape):
  tree, path = saved
  mesh = _mesh(shape)
  back = io.load_orbax(path, _rule(mesh))
  assert jax.tree.structure(back) == jax.tree.structure(tree)  # spec, dtype, packing, pad, perm
  for (p, a), (_, b) in zip(jq.transforms.named_leaves(tree), jq.transforms.named_leaves(back)):
    if isinstance(a, QArray):
      want = jq.qarray_sharding(a, _rule(mesh)(p, a.shape))
      for c in ("values", "scale", "zero_point"):
        x, y, s = getattr(a, c), getattr(b, c), getattr(want, c)
        assert (x is None) == (y is None), (p, c)
        if x is not None:
          assert y.dtype == x.dtype and y.shape == x.shape and y.sharding == s, (p, c)
          np.testing.assert_array_equal(_bits(y), _bits(x))
    else:
      assert b.dtype == a.dtype and b.sharding == _rule(mesh)(p, a.shape)
      np.testing.assert_array_equal(_bits(b), _bits(a))


def test_restore_without_shardings_lands_on_one_device_and_matches_jq_load(saved, tmp_path):
  tree, path = saved
  back = io.load_orbax(path)
  file = jq.load(jq.save(tmp_path / "m.safetensors", tree))
  assert jax.tree.structure(back) == jax.tree.structure(file)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(file)):
    assert a.sharding.device_set == {jax.devices()[0]}
    np.testing.assert_array_equal(_bits(a), _bits(b))
  abstract = io.abstract_orbax(path)
  assert jax.tree.structure(abstract) == jax.tree.structure(tree)
  assert abstract["layers"][1]["kernel"].values.shape == tree["layers"][1]["kernel"].values.shape


def test_a_plain_orbax_checkpoint_is_refused_with_a_clear_error(tmp_path):
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "plain", {"w": jnp.ones(3)})
  with pytest.raises(ValueError, match=r"plain: an Orbax checkpoint without a jaxquant layout"):
    io.load_orbax(tmp_path / "plain")
  with pytest.raises(FileNotFoundError, match=r"no such Orbax checkpoint folder"):
    io.load_orbax(tmp_path / "missing")
