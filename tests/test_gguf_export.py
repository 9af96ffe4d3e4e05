"""GGUF export: each QArray as the block type that holds it exactly, bit-exact round trips
through the `gguf` package, clear errors for specs no block type holds, SmolLM2 written back."""

import contextlib
import dataclasses
import functools
import io as io_module
import json

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxquant as jq
from jaxquant import gguf_io, numerics
from jaxquant.apps.cli import main
from jaxquant.apps.models import llama

Q = gguf.GGMLQuantizationType
EXACT = {"Q8_0": "int8:g32:scale=f16", "Q4_0": "int4:g32:scale=f16"}


def _leaves_equal(a: jq.QArray, b: jq.QArray) -> bool:
  return (a.spec, a.shape) == (b.spec, b.shape) and all(
    x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


def _tensor(kind: str, raw: np.ndarray, out: int, n: int) -> gguf_io.GGUFTensor:
  return gguf_io.GGUFTensor("t", kind, (out, n), raw)


@pytest.mark.parametrize("kind", list(EXACT))
@settings(max_examples=5, deadline=None)
@given(blocks=st.integers(1, 4), out=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_symmetric_blocks_round_trip_and_match_gguf_bit_for_bit(kind, blocks, out, seed):
  n = 32 * blocks
  w = np.random.default_rng(seed).standard_normal((n, out)).astype(np.float32) * 3
  q = jq.quantize(w, EXACT[kind])  # a Flax kernel [in, out]
  got, raw = gguf_io.block_bytes(q, "w")
  assert got == kind and raw.shape == (out, blocks * (34 if kind == "Q8_0" else 18))
  ggml = gguf.quants.dequantize(raw, Q[kind]).reshape(out, n)
  np.testing.assert_array_equal(ggml, np.asarray(jq.dequantize(q)).T)  # bit for bit
  assert _leaves_equal(gguf_io.to_qarray(_tensor(kind, raw, out, n)), q)


@settings(max_examples=5, deadline=None)
@given(
  blocks=st.integers(1, 4),
  out=st.integers(1, 9),
  seed=st.integers(0, 2**16),
  shift=st.floats(-3, 3),
  constant=st.booleans(),
)
def test_q4_1_bytes_survive_gguf_to_jaxquant_to_gguf(blocks, out, seed, shift, constant):
  n = 32 * blocks
  w = np.random.default_rng(seed).normal(shift, 1.0, (out, n)).astype(np.float32)
  if constant:  # a block of one value: d = 0 in ggml
    w[0, :32] = shift
  raw = gguf.quants.quantize(w, Q.Q4_1)
  q = gguf_io.to_qarray(_tensor("Q4_1", raw, out, n))
  kind, again = gguf_io.block_bytes(q, "w")
  assert kind == "Q4_1"
  ggml = gguf.quants.dequantize(again, Q.Q4_1).reshape(out, n)
  ours = np.asarray(jq.dequantize(q)).T
  # (q − z)·d against ggml's q·d + m: float32 rounding only
  span = np.abs(w).max() + 1e-30
  assert np.abs(ggml - ours).max() <= 4 * np.finfo(np.float32).eps * span
  np.testing.assert_array_equal(
    gguf.quants.dequantize(again, Q.Q4_1), gguf.quants.dequantize(raw, Q.Q4_1)
  )
  assert _leaves_equal(gguf_io.to_qarray(_tensor("Q4_1", again, out, n)), q)


def test_rows_reorder_exactly():
  w = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
  q = jq.quantize(w, "int8:g32:scale=f16")
  rows = np.array([3, 1, 0, 2, 7, 6, 5, 4])
  _, raw = gguf_io.block_bytes(q, "w", rows)
  ggml = gguf.quants.dequantize(raw, Q.Q8_0).reshape(8, 64)
  np.testing.assert_array_equal(ggml, np.asarray(jq.dequantize(q)).T[rows])


@pytest.mark.parametrize(
  ("spec", "nearest"),
  [
    ("int8", "Q8_0 holds int8:g32:scale=f16"),
    ("int4:g64", "Q4_0 holds int4:g32:scale=f16"),
    ("int4:g32:asym:scale=f16", "Q4_1 holds uint4:g32:asym"),
    ("nf4:g32", "Q4_0"),
    ("int8:g32", "Q8_0"),  # float32 scales that float16 does not hold
    ("int4:g32@-1:scale=f16", "Q4_0"),  # groups along the output axis
  ],
)
def test_specs_no_block_type_holds_name_the_leaf_and_the_nearest(spec, nearest):
  w = np.random.default_rng(1).standard_normal((64, 64)).astype(np.float32)
  with pytest.raises(gguf_io.NotExportable, match=rf"^layers_0/mlp/up_proj/kernel: .*{nearest}"):
    gguf_io.block_bytes(jq.quantize(w, spec), "layers_0/mlp/up_proj/kernel")


def test_integer_zero_points_export_only_when_float16_holds_the_minimums():
  w = np.random.default_rng(2).standard_normal((64, 16)).astype(np.float32)
  q = jq.quantize(w, "uint4:g32:asym:scale=f16")
  try:
    gguf_io.block_bytes(q, "w")
  except gguf_io.NotExportable as e:
    assert "float16 does not hold" in str(e)
  else:  # when it exports, it is exact
    _, raw = gguf_io.block_bytes(q, "w")
    ggml = gguf.quants.dequantize(raw, Q.Q4_1).reshape(16, 64)
    np.testing.assert_allclose(ggml, np.asarray(jq.dequantize(q)).T, rtol=0, atol=1e-5)


@functools.lru_cache(maxsize=1)
def _smol_slice(layers: int = 2):
  """The first `layers` blocks of the packaged SmolLM2, linear kernels as the file's QArrays."""
  file = gguf_io.read_gguf(llama.smollm2_path())
  cfg = dataclasses.replace(llama.LlamaConfig.from_gguf(file.metadata, file.tensors), layers=layers)
  keep = [n for n in file.tensors if not n.startswith("blk.") or int(n.split(".")[1]) < layers]
  return file, cfg, llama.gguf_params(file, cfg, quantized=True, layers=layers), keep


def test_smollm2_tensors_are_written_back_byte_for_byte():
  file, cfg, params, keep = _smol_slice()
  tensors, added = llama.gguf_tensors(cfg, params, table_type="Q8_0")
  assert added == {"embed_tokens/embedding": 0.0}
  by_name = {t.name: t for t in tensors}
  assert sorted(by_name) == sorted(keep)
  for name in keep:
    src, out = file[name], by_name[name]
    assert out.type == src.type, name
    np.testing.assert_array_equal(
      np.asarray(out.data).reshape(-1), np.asarray(src.data).reshape(-1)
    )


def test_an_exported_file_reads_back_with_its_metadata_and_tensors(tmp_path):
  file, cfg, params, _ = _smol_slice()
  q = dict(params)
  # a jaxquant quantization of one layer's MLP, as a user's recipe would leave it
  up = params["layers_0"]["mlp"]["up_proj"]["kernel"]
  q["layers_0"] = {**params["layers_0"], "mlp": {**params["layers_0"]["mlp"]}}
  q["layers_0"]["mlp"]["up_proj"] = {"kernel": jq.quantize(jq.dequantize(up), "int4:g32:scale=f16")}
  path, added = llama.export_gguf(tmp_path / "m.gguf", cfg, q, file)
  back = gguf_io.read_gguf(path)
  assert back.metadata["llama.block_count"] == 2
  assert back.metadata["tokenizer.ggml.tokens"] == file.metadata["tokenizer.ggml.tokens"]
  assert back["blk.0.ffn_up.weight"].type == "Q4_0" and back["token_embd.weight"].type == "F32"
  again = gguf_io.to_qarray(back["blk.0.ffn_up.weight"])
  assert _leaves_equal(again, q["layers_0"]["mlp"]["up_proj"]["kernel"])
  np.testing.assert_array_equal(
    np.asarray(back["blk.1.attn_q.weight"].data), np.asarray(file["blk.1.attn_q.weight"].data)
  )
  assert not added and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_inexact_leaves_fail_before_writing_unless_requantized(tmp_path):
  file, cfg, params, _ = _smol_slice()
  q = dict(params)
  down = jq.dequantize(params["layers_1"]["mlp"]["down_proj"]["kernel"])
  q["layers_1"] = {**params["layers_1"], "mlp": {**params["layers_1"]["mlp"]}}
  q["layers_1"]["mlp"]["down_proj"] = {"kernel": jq.quantize(down, "int4:g64:asym")}
  with pytest.raises(gguf_io.NotExportable, match=r"layers_1/mlp/down_proj/kernel: .*Q4_1"):
    llama.export_gguf(tmp_path / "m.gguf", cfg, q, file)
  assert not list(tmp_path.iterdir())
  path, added = llama.export_gguf(tmp_path / "m.gguf", cfg, q, file, requantize=True)
  assert list(added) == ["layers_1/mlp/down_proj/kernel"]
  assert 0 < added["layers_1/mlp/down_proj/kernel"] < 0.2
  assert gguf_io.read_gguf(path)["blk.1.ffn_down.weight"].type == "Q4_1"


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**16), shift=st.floats(-3, 3), out=st.integers(1, 9))
def test_jaxquant_q4_1_round_trips_through_gguf_bit_for_bit(seed, shift, out):
  w = np.random.default_rng(seed).normal(shift, 1.0, (64, out)).astype(np.float32)
  q = numerics.quantize_float_zero(jnp.asarray(w), "uint4:g32:asym:scale=f16")
  kind, raw = gguf_io.block_bytes(q, "w")
  assert kind == "Q4_1"
  assert _leaves_equal(gguf_io.to_qarray(_tensor(kind, raw, out, 64)), q)
  ggml = gguf.quants.dequantize(raw, Q.Q4_1).reshape(out, 64)
  span = np.abs(w).max() + 1e-30
  assert np.abs(ggml - np.asarray(jq.dequantize(q)).T).max() <= 4 * np.finfo(np.float32).eps * span


# --------------------------------------------------------------------------- HF in, convert
TINY = llama.LlamaConfig(
  vocab=300, dim=64, layers=2, heads=4, kv_heads=2, head_dim=16, mlp=128, tie_embeddings=False
)


def _tiny_hf(folder, shards: int = 1):
  """A random tiny Llama written in Hugging Face layout and naming (sharded when shards > 1)."""
  params = llama.Llama(TINY).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  tensors = llama.hf_tensors(TINY, params)
  names = sorted(tensors)
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "config.json").write_text(json.dumps(llama.hf_config(TINY)))
  if shards == 1:
    safetensors.numpy.save_file(tensors, folder / "model.safetensors")
    return params
  weight_map = {}
  for i in range(shards):
    file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
    part = {n: tensors[n] for n in names[i::shards]}
    safetensors.numpy.save_file(part, folder / file)
    weight_map.update(dict.fromkeys(part, file))
  index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
  (folder / "model.safetensors.index.json").write_text(json.dumps(index))
  return params


def test_sharded_hugging_face_checkpoints_load_with_their_index(tmp_path):
  params = _tiny_hf(tmp_path / "m", shards=3)
  cfg, loaded = llama.load_hf(tmp_path / "m")
  assert cfg == TINY and len(list((tmp_path / "m").glob("model-*.safetensors"))) == 3
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  (tmp_path / "m" / "model-00002-of-00003.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match=r"model-00002-of-00003\.safetensors.*every shard"):
    llama.load_hf(tmp_path / "m")


def _cli(*argv) -> tuple[int, str]:
  err = io_module.StringIO()
  with contextlib.redirect_stderr(err):
    rc = main(list(argv))
  return rc, err.getvalue()


@pytest.mark.slow  # 35 s; test_smollm2_tensors_are_written_back_byte_for_byte covers a slice
def test_convert_smollm2_to_a_checkpoint_and_back_to_the_same_gguf(tmp_path):
  assert _cli("convert", "smollm2", str(tmp_path / "ckpt"))[0] == 0
  assert (tmp_path / "ckpt" / "report.json").is_file()
  out = tmp_path / "back.gguf"
  assert _cli("convert", str(tmp_path / "ckpt"), str(out), "--table-type", "Q8_0")[0] == 0
  src, back = gguf_io.read_gguf(llama.smollm2_path()), gguf_io.read_gguf(out)
  assert src.metadata == back.metadata and list(src.tensors) == list(back.tensors)
  for name, t in src.tensors.items():
    assert back[name].type == t.type, name
    np.testing.assert_array_equal(np.asarray(back[name].data), np.asarray(t.data))


def test_convert_errors_are_one_line_and_write_nothing(tmp_path):
  _tiny_hf(tmp_path / "hf")
  rc, err = _cli("convert", str(tmp_path / "hf"), str(tmp_path / "m.gguf"))
  assert rc == 2 and "--metadata-from" in err and len(err.strip().splitlines()) == 1
  rc, err = _cli(
    "convert", str(tmp_path / "hf"), str(tmp_path / "m.gguf"), "--metadata-from", "nope.gguf"
  )
  assert rc == 2 and "nope.gguf" in err
  assert _cli("convert", str(tmp_path / "hf"), str(tmp_path / "ck"))[0] == 0  # HF in
  loaded = jq.load(tmp_path / "ck")
  assert loaded["layers_0"]["mlp"]["up_proj"]["kernel"].shape == (64, 128)
  meta = str(llama.smollm2_path())
  rc, err = _cli("convert", str(tmp_path / "ck"), str(tmp_path / "m.gguf"), "--metadata-from", meta)
  assert rc == 2 and "vocab 300" in err and len(err.strip().splitlines()) == 1
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "hf"]


@pytest.mark.parametrize(("recipe", "kind"), [("q8_0", "Q8_0"), ("q4_0", "Q4_0"), ("q4_1", "Q4_1")])
def test_the_gguf_recipes_quantize_to_what_their_block_type_holds(recipe, kind):
  w = np.random.default_rng(3).normal(0.2, 1.0, (96, 16)).astype(np.float32)
  got = jq.apply_recipe(jq.load_recipe(recipe), {"mlp": {"kernel": jnp.asarray(w)}})
  q = got.qparams["mlp"]["kernel"]
  assert gguf_io.block_bytes(q, "mlp/kernel")[0] == kind
  if kind == "Q4_1":  # the recipe's rtn.float_zero step, not an integer zero point
    assert q.zero_point.dtype == jnp.float32


def test_cli_inputs_found_by_fuzzing_are_one_line_errors(tmp_path):
  cut = tmp_path / "cut.gguf"
  cut.write_bytes(llama.smollm2_path().read_bytes()[:200_000])
  (tmp_path / "r").mkdir()
  (tmp_path / "r" / "report.json").write_text("[]")
  ck = tmp_path / "ck.safetensors"
  jq.save(ck, {"dense": {"kernel": jq.quantize(jnp.ones((8, 8)), "int8")}})
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "report.json").write_text("{}")
  weight = tmp_path / "w.safetensors"
  safetensors.numpy.save_file({"fc.weight": np.zeros((1,) * 6, np.float32)}, weight)
  cases = [
    (["convert", str(cut), str(tmp_path / "o.gguf")], "truncated"),
    (["convert", str(tmp_path / "r"), str(tmp_path / "o.gguf")], "not a report"),
    (["export", "--format", "gguf", "--checkpoint", str(tmp_path / "r"), "--out", "x"], "*.gguf"),
    (["quantize", "--model", str(ck), "--recipe", "w8", "--out", str(tmp_path / "q")], "already"),
    (["convert", "smollm2", str(tmp_path / "other" / "x.safetensors")], "report.json"),
    (["plan", "--model", str(weight), "--layout", "torch", "--recipe", "w8"], "6-D weight"),
  ]
  for argv, message in cases:
    rc, err = _cli(*argv)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
  assert (tmp_path / "other" / "report.json").read_text() == "{}"
  assert not (tmp_path / "q").exists() and not (tmp_path / "o.gguf").exists()
