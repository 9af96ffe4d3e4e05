"""Checkpoints: exact round trips, size on disk as the theory says, atomic writes, clear errors."""

import json
import os
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
from flax import nnx
from safetensors.numpy import save_file

import jaxquant as jq
from jaxquant.io import read_header
from jaxquant.transforms import named_leaves

SPECS = [
  "int8",
  "int8:token",
  "uint8:tensor",
  "int4:g16",
  "int4:g16:asym",
  "uint4:g32",
  "nf4:g16",
  "fp8_e4m3",
  "fp8_e5m2",
  "bf16",
  "int4:g16:asym:scale=f16",
  "int8:scale=bf16",
]


def _tree(spec):
  x = jax.random.normal(jax.random.key(0), (64, 96))
  return {
    "layers": [
      {"kernel": jq.quantize(x, spec), "bias": jnp.arange(96, dtype=jnp.float32)},
      {"kernel": jq.quantize(x * 2, spec), "bias": jnp.ones(96, jnp.bfloat16)},
    ],
    "step": jnp.array(7, jnp.int32),
  }


def _assert_same(a, b):
  la, lb = named_leaves(a), named_leaves(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (path, x), (_, y) in zip(la, lb):
    assert type(x) is type(y) or (isinstance(x, jax.Array) and isinstance(y, jax.Array)), path
    if isinstance(x, jq.QArray):
      assert (x.spec, x.shape, x.dtype, x.packed) == (y.spec, y.shape, y.dtype, y.packed), path
      for cx, cy in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
        assert cx.dtype == cy.dtype
        np.testing.assert_array_equal(np.asarray(cx), np.asarray(cy))
    else:
      assert x.dtype == y.dtype, path
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("spec", SPECS)
def test_round_trip_is_exact(tmp_path, spec):
  tree = _tree(spec)
  path = jq.save(tmp_path / "ckpt.safetensors", tree)
  loaded = jq.load(path)
  assert isinstance(loaded["layers"], list)
  _assert_same(tree, loaded)


@pytest.mark.parametrize(
  "spec", ["int8", "int4:g128", "int4:g128:asym", "nf4:g64", "int4:g128:asym:scale=f16"]
)
def test_file_size_is_the_theory_plus_a_small_header(tmp_path, spec):
  x = jax.random.normal(jax.random.key(1), (1536, 384))
  q = {"w": jq.quantize(x, spec)}
  path = jq.save(tmp_path / "q.safetensors", q)
  header_bytes = 8 + int.from_bytes(path.read_bytes()[:8], "little")
  assert os.path.getsize(path) - header_bytes == jq.QuantSpec.parse(spec).nbytes(x.shape)
  assert header_bytes < 2048


def test_header_describes_every_leaf(tmp_path):
  path = jq.save(tmp_path / "c.safetensors", _tree("int4:g16:asym"))
  header = json.loads(read_header(path)["__metadata__"]["jaxquant"])
  assert header["format"] == "jaxquant" and header["version"] == jq.__version__
  entry = {e["name"]: e for e in header["leaves"]}["layers/0/kernel"]
  assert entry["spec"] == "int4:g16:asym" and entry["shape"] == [64, 96] and entry["packed"]


def test_folder_paths_and_nnx_state(tmp_path):
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.a = nnx.Linear(32, 32, rngs=rngs)

  model = Net(nnx.Rngs(0))
  q = jq.quantize_params(nnx.state(model, nnx.Param), jq.default_rules("int8"))
  path = jq.save(tmp_path, q)  # an existing folder: model.safetensors inside
  assert path == tmp_path / "model.safetensors"
  loaded = jq.load(tmp_path)
  assert isinstance(loaded["a"]["kernel"], jq.QArray)
  restored = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(restored, jq.dequantize_params(loaded))
  nnx.update(model, restored)
  np.testing.assert_array_equal(
    np.asarray(model.a.kernel.get_value()), np.asarray(jq.dequantize(loaded["a"]["kernel"]))
  )


def test_failed_write_leaves_the_old_file_and_no_debris(tmp_path, monkeypatch):
  target = tmp_path / "m.safetensors"
  jq.save(target, _tree("int8"))
  before = target.read_bytes()

  def crash(specs, filename, metadata=None):
    with open(filename, "wb") as f:
      f.write(b"partial")
    raise OSError("disk full")

  monkeypatch.setattr(safetensors, "serialize_file", crash)
  with pytest.raises(OSError, match="disk full"):
    jq.save(target, _tree("int4:g16"))
  assert target.read_bytes() == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_bad_leaf_is_rejected_before_anything_is_written(tmp_path):
  with pytest.raises(TypeError, match=r"meta/name: cannot store a str"):
    jq.save(tmp_path / "x.safetensors", {"w": jnp.ones(3), "meta": {"name": "bert"}})
  assert not list(tmp_path.iterdir())


def test_truncated_file_is_a_clear_error(tmp_path):
  path = jq.save(tmp_path / "t.safetensors", _tree("int8"))
  data = path.read_bytes()
  for cut in (len(data) - 10, 100, 4):
    path.write_bytes(data[:cut])
    with pytest.raises(ValueError, match="truncated"):
      jq.load(path)


def test_foreign_files_are_named_as_such(tmp_path):
  plain = tmp_path / "plain.safetensors"
  save_file({"w": np.ones((2, 2), np.float32)}, str(plain))
  with pytest.raises(ValueError, match="not a jaxquant checkpoint"):
    jq.load(plain)
  junk = tmp_path / "junk.safetensors"
  junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
  with pytest.raises(ValueError, match="not a safetensors file"):
    jq.load(junk)


def test_saved_checkpoint_has_ordinary_file_permissions(tmp_path):
  path = jq.save(tmp_path / "m.safetensors", {"w": jq.quantize(jnp.ones((4, 4)), "int8")})
  umask = os.umask(0)
  os.umask(umask)
  assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask
