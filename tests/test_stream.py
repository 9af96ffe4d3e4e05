"""Streamed conversion: checkpoints quantized tensor by tensor equal the in-memory path's, stay
atomic, and hold one tensor in memory, not the model."""

import json
import subprocess
import sys
import textwrap

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from safetensors import safe_open

import jaxquant as jq
from jaxquant import interop, io, transforms
from jaxquant.apps import convert
from jaxquant.apps.cli import main
from jaxquant.apps.models import llama
from jaxquant.gguf_io import write_gguf


def _flax_tensors(seed: int = 0) -> dict[str, np.ndarray]:
  """A small model's tensors, named as a Flax tree split on '.' (kernels, a stacked kernel's
  worth of shapes, bf16, biases, an embedding and an integer leaf)."""
  rng = np.random.default_rng(seed)
  normal = lambda *s: rng.standard_normal(s, np.float32)
  return {
    "embed.embedding": normal(50, 128),
    "layer_0.attn.kernel": normal(128, 256),
    "layer_0.attn.bias": normal(256),
    "layer_0.mlp.kernel": normal(256, 128).astype(ml_dtypes.bfloat16),
    "layer_1.conv.kernel": normal(3, 3, 128, 64),
    "layer_1.norm.scale": normal(128),
    "steps": np.arange(4, dtype=np.int32),
  }


def _same_checkpoint(a, b) -> None:
  """Two checkpoint files with the same jaxquant header and the same tree, bit for bit."""
  assert io.read_header(a)["__metadata__"] == io.read_header(b)["__metadata__"]
  ta, tb = jq.load(a), jq.load(b)
  assert jax.tree.structure(ta) == jax.tree.structure(tb)
  for x, y in zip(jax.tree.leaves(ta), jax.tree.leaves(tb)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))


# Plain round to nearest is checked by the CLI, torch-layout and GGUF tests; q4_1 (float zero
# points) takes the path of every recipe with its own quantizer (HQQ too; 7 s of compiling).
@pytest.mark.parametrize("recipe", ["q4_1"])
def test_streamed_quantize_writes_what_save_of_the_recipe_writes(tmp_path, recipe):
  src = tmp_path / "src.safetensors"
  tensors = _flax_tensors()
  del tensors["layer_1.conv.kernel"]  # one compile less; 4-D kernels stream in the CLI test
  safetensors.numpy.save_file(tensors, src)
  r = jq.load_recipe(recipe)
  want = io.save(
    tmp_path / "want.safetensors",
    jq.apply_recipe(r, interop.load_safetensors_params(src)).qparams,
  )
  got, plan = interop.quantize_safetensors(
    src, tmp_path / "got.safetensors", r.rules, quantizer=convert.recipe_quantizer(r)
  )
  assert convert.streamable(r) and plan.quantized
  _same_checkpoint(want, got)
  with safe_open(str(got), "np") as f:  # safetensors itself reads the padded header
    assert sorted(f.keys()) == sorted(k for k in io.read_header(got) if k != "__metadata__")


def test_torch_layout_and_sharded_folders_stream_like_load_safetensors_params(tmp_path):
  rng = np.random.default_rng(1)
  tensors = {
    "model.layers.0.q_proj.weight": rng.standard_normal((64, 128), np.float32),
    "model.layers.0.q_proj.bias": rng.standard_normal(64).astype(np.float32),
    "model.layers.1.conv.weight": rng.standard_normal((32, 64, 3, 3), np.float32),
    "model.embed_tokens.weight": rng.standard_normal((20, 128), np.float32),
  }
  names = sorted(tensors)
  folder = tmp_path / "hf"
  folder.mkdir()
  weight_map = {}
  for i, part in enumerate((names[:2], names[2:])):
    file = f"model-{i + 1:05d}-of-00002.safetensors"
    safetensors.numpy.save_file({n: tensors[n] for n in part}, folder / file)
    weight_map.update(dict.fromkeys(part, file))
  (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  single = tmp_path / "all.safetensors"
  safetensors.numpy.save_file(tensors, single)
  rules = jq.default_rules("int8")
  params = interop.load_safetensors_params(single, "torch")
  want = io.save(tmp_path / "want.safetensors", jq.quantize_params(params, rules))
  got, _ = interop.quantize_safetensors(folder, tmp_path / "got.safetensors", rules, layout="torch")
  _same_checkpoint(want, got)


def test_a_failing_tensor_leaves_the_old_file_and_no_temporary(tmp_path):
  tensors = _flax_tensors()
  tensors["layer_1.conv.kernel"][0, 0, 0, 0] = np.nan  # read and checked mid-stream
  src = tmp_path / "src.safetensors"
  safetensors.numpy.save_file(tensors, src)
  out = tmp_path / "out"
  out.mkdir()
  (out / io.DEFAULT_FILENAME).write_bytes(b"old")
  with pytest.raises(ValueError, match=r"layer_1/conv/kernel: contains 1 NaN"):
    interop.quantize_safetensors(src, out, jq.default_rules("int8"))
  assert [p.name for p in out.iterdir()] == [io.DEFAULT_FILENAME]
  assert (out / io.DEFAULT_FILENAME).read_bytes() == b"old"


def test_a_leaf_that_does_not_match_its_layout_is_refused(tmp_path):
  shapes = {"w": jax.ShapeDtypeStruct((4, 8), np.float32)}
  with pytest.raises(ValueError, match=r"w: made as float32\[4, 9\]"):
    io.save_streamed(tmp_path / "x.safetensors", shapes, lambda _: np.zeros((4, 9), np.float32))
  assert not list(tmp_path.iterdir())


TINY = llama.LlamaConfig(
  vocab=40, dim=32, layers=2, heads=4, kv_heads=2, head_dim=8, mlp=64, tie_embeddings=True
)


def _tiny_params() -> dict:
  """Random float32 params of the tiny Llama's shapes (no initialisation to compile)."""
  rng = np.random.default_rng(0)
  normal = lambda s: rng.standard_normal(s.shape, np.float32)
  return jax.tree.map(normal, llama.param_shapes(TINY))


def _tiny_gguf(path) -> None:
  """A tiny Llama as a GGUF file (F32 tensors, Q/K rows in llama.cpp's order)."""
  tensors, _ = llama.gguf_tensors(TINY, _tiny_params())
  keys = {
    "block_count": TINY.layers,
    "embedding_length": TINY.dim,
    "feed_forward_length": TINY.mlp,
    "attention.head_count": TINY.heads,
    "attention.head_count_kv": TINY.kv_heads,
  }
  meta: dict = {f"llama.{k}": v for k, v in keys.items()}
  types = {k: ["UINT32"] for k in meta}
  meta["llama.attention.layer_norm_rms_epsilon"] = TINY.norm_eps
  types["llama.attention.layer_norm_rms_epsilon"] = ["FLOAT32"]
  write_gguf(path, "llama", meta, types, tensors)


def test_lazy_llm_sources_read_what_the_loaders_give(tmp_path):
  _tiny_gguf(tmp_path / "t.gguf")
  hf = tmp_path / "hf"
  hf.mkdir()
  tensors = llama.hf_tensors(TINY, _tiny_params())
  tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
  safetensors.numpy.save_file(tensors, hf / "model.safetensors")
  (hf / "config.json").write_text(json.dumps(llama.hf_config(TINY)))
  for (_, want), (_, got) in [
    (llama.load_gguf(tmp_path / "t.gguf"), convert.lazy_gguf_params(str(tmp_path / "t.gguf"))),
    (llama.load_hf(hf), convert.lazy_hf_params(str(hf))),
  ]:
    pairs = zip(transforms.named_leaves(want), transforms.named_leaves(got.shapes), strict=True)
    for (p, a), (q, b) in pairs:
      assert p == q and a.shape == b.shape and a.dtype == b.dtype
      np.testing.assert_array_equal(np.asarray(a), got.read(p))


def test_the_cli_streams_data_free_recipes_into_a_normal_checkpoint(tmp_path):
  src = tmp_path / "src.safetensors"
  safetensors.numpy.save_file(_flax_tensors(), src)
  out = tmp_path / "q"
  assert main(["plan", "--model", str(src), "--recipe", "w4g64"]) == 0  # shapes only
  assert main(["quantize", "--model", str(src), "--recipe", "w4g64", "--out", str(out)]) == 0
  want = io.save(
    tmp_path / "want.safetensors",
    jq.quantize_params(interop.load_safetensors_params(src), jq.load_recipe("w4g64").rules),
  )
  _same_checkpoint(want, out / io.DEFAULT_FILENAME)
  report = json.loads((out / "report.json").read_text())
  assert report["recipe"] == "w4g64"
  assert set(report["errors"]) == {
    "layer_0/attn/kernel",
    "layer_0/mlp/kernel",
    "layer_1/conv/kernel",
  }
  assert all(e["rel_error"] > 0 for e in report["errors"].values())


def test_the_cli_streams_a_gguf_model_like_the_loaded_one(tmp_path):
  _tiny_gguf(tmp_path / "t.gguf")
  out = tmp_path / "q"
  argv = ["quantize", "--model", str(tmp_path / "t.gguf"), "--recipe", "w8", "--out", str(out)]
  assert main(argv) == 0
  _, params = llama.load_gguf(tmp_path / "t.gguf")
  want = io.save(
    tmp_path / "want.safetensors", jq.apply_recipe(jq.load_recipe("w8"), params).qparams
  )
  _same_checkpoint(want, out / io.DEFAULT_FILENAME)


PROBE = """
import sys
import numpy as np, jax, jaxquant as jq
from jaxquant import interop

def status(key):
  return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024

def growth(work):
  open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM to the current RSS
  base = status("VmRSS")
  kept = work()
  return status("VmHWM") - base

jq.quantize(np.ones((256, 256), np.float32), "int8").values.block_until_ready()
rules = jq.default_rules("int8")
print(growth(lambda: interop.quantize_safetensors(sys.argv[1], sys.argv[2], rules)))
print(growth(lambda: jq.load(sys.argv[2])))
"""


def test_streamed_quantize_and_load_stay_within_their_memory_bounds(tmp_path):
  src, out = tmp_path / "big.safetensors", tmp_path / "q" / io.DEFAULT_FILENAME
  w = np.random.default_rng(0).standard_normal((512, 2048), np.float32)  # 4 MiB a tensor
  safetensors.numpy.save_file({f"layer_{i}.kernel": w + i for i in range(24)}, src)  # 96 MiB
  run = subprocess.run(
    [sys.executable, "-c", textwrap.dedent(PROBE), str(src), str(out)],
    capture_output=True,
    text=True,
    check=True,
  )
  quantize, load = map(int, run.stdout.split()[-2:])
  model, file = src.stat().st_size, out.stat().st_size
  assert quantize < model / 3, (
    f"quantize grew {quantize / 2**20:.0f} MiB, model {model / 2**20:.0f}"
  )
  assert load < 1.3 * file, f"load grew {load / 2**20:.0f} MiB for a {file / 2**20:.0f} MiB file"
