"""Calibration over a mesh (8 simulated CPU devices, conftest) and over two local processes,
against the one-device results."""

import flax.linen as nn
import jax
import numpy as np
import pytest

import jaxquant as jq
from jaxquant.apps import distributed as launcher
from jaxquant.ptq import CalibrationSet, distributed, gptq
from jaxquant.ptq.capture import activation_observer, capture, hessian_observer

RULES = [jq.Rule(".*", weight="int4:g16")]


class _MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(64, name="up")(x)
    return nn.Dense(32, name="down")(nn.gelu(h))


def _setup():
  rng = np.random.default_rng(0)
  batches = [(rng.normal(size=(8, 4, 32)).astype(np.float32),) for _ in range(2)]
  params = _MLP().init(jax.random.key(0), batches[0][0])["params"]
  return _MLP(), jax.tree.map(np.asarray, params), batches


PATHS = ["up/kernel", "down/kernel"]


def _mesh(shape):
  return jax.make_mesh(shape, ("data", "model"))


@pytest.mark.parametrize("shape", [(1, 8), (8, 1)])  # 2×4: the two-process test
def test_hessians_sum_over_the_data_axis_with_one_all_reduce_per_layer(shape):
  model, params, batches = _setup()
  want = capture(model, params, RULES, batches, hessian_observer(PATHS))
  mesh = _mesh(shape)
  got = distributed.sharded_capture(model, params, RULES, batches, hessian_observer(PATHS), mesh)
  for p in PATHS:
    h, ref = distributed.local_value(got[p]["h"]), np.asarray(want[p]["h"])
    assert float(got[p]["n"]) == float(want[p]["n"]) == 64
    if shape[0] == 1:  # one shard of the rows: the very same sum
      np.testing.assert_array_equal(h, ref)
    else:  # float32 sums in another order: within a few ulps of the largest entry
      assert np.abs(h - ref).max() <= 4e-7 * np.abs(ref).max()
  # the reduction: per layer one float32 Hessian and its row count, nothing else
  parts = jax.tree.map(lambda a: jax.numpy.stack([a] * shape[0]), want)
  parts = jax.device_put(
    parts, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  )
  hlo = jax.jit(lambda a: distributed.reduce_stats(a, mesh)).lower(parts).compile().as_text()
  assert distributed.allreduce_bytes(hlo) == sum(4 * d * d + 4 for d in (32, 64))


def test_activation_maxima_are_exact_over_the_data_axis():
  model, params, batches = _setup()
  want = capture(model, params, RULES, batches, activation_observer(PATHS))
  got = distributed.sharded_capture(
    model, params, RULES, batches, activation_observer(PATHS), _mesh((8, 1))
  )
  for p in PATHS:
    np.testing.assert_array_equal(
      distributed.local_value(got[p]["abs_max"]), np.asarray(want[p]["abs_max"])
    )
    np.testing.assert_allclose(
      distributed.local_value(got[p]["abs_sum"]), np.asarray(want[p]["abs_sum"]), rtol=1e-6
    )


@pytest.mark.parametrize("spec", ["int4:g16:asym", "int8"])
def test_gptq_split_by_output_columns_is_the_whole_kernels_gptq(spec):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(256, 64)).astype(np.float32)
  w = rng.normal(size=(64, 32)).astype(np.float32)
  h = x.T @ x
  whole, _ = gptq.gptq_quantize(w, h, spec)
  for parts in (2, 4, 8):
    split, _ = distributed.gptq_columns(w, h, spec, parts=parts)
    for name in ("values", "scale", "zero_point"):
      a, b = getattr(whole, name), getattr(split, name)
      assert (a is None) == (b is None)
      if a is not None:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow  # the two-process test covers the same path on a 2×4 mesh
def test_gptq_recipe_on_a_mesh_gives_the_one_device_codes():
  model, params, batches = _setup()
  recipe = launcher.TINY_RECIPE
  one = jq.apply_recipe(recipe, params, CalibrationSet(model, batches)).qparams
  mesh = jq.apply_recipe(recipe, params, CalibrationSet(model, batches, mesh=_mesh((2, 4))))
  for p in PATHS:
    a, b = one[p.split("/")[0]]["kernel"], mesh.qparams[p.split("/")[0]]["kernel"]
    np.testing.assert_array_equal(np.asarray(a.values), np.asarray(b.values))
    np.testing.assert_array_equal(np.asarray(a.scale), np.asarray(b.scale))


def test_two_processes_write_the_one_device_checkpoint(tmp_path):
  """2 processes × 4 CPU devices (gloo over 127.0.0.1), a 2×4 mesh: the same checkpoint as
  one device in this process."""
  reports = launcher.launch(str(tmp_path / "two.st"), 2, 4, (2, 4), timeout=110)
  assert [r["process"] for r in reports] == [0, 1]
  assert all(r["processes"] == 2 and r["devices"] == 8 for r in reports)
  one = launcher.worker(str(tmp_path / "one.st"), (1, 1))
  assert reports[0]["digest"] == one["digest"]
  a, b = jq.load(tmp_path / "two.st"), jq.load(tmp_path / "one.st")
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
