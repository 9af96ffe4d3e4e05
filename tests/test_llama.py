"""SmolLM2-135M from its GGUF: the reader against `gguf`'s own dequantization, Q4_1 re-encoded
exactly, the RoPE row order, the tokenizer, cached decoding and quantized forwards on a
two-layer slice of the real model (the file is read once per test process)."""

import dataclasses
import functools
import json

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxquant import gguf_io
from jaxquant.apps import cli, data, language
from jaxquant.apps.cli import main
from jaxquant.apps.models import cache, llama
from jaxquant.flax import quantize_model
from jaxquant.numerics import quantize, quantize_float_zero
from jaxquant.ptq import CalibrationSet
from jaxquant.qarray import codes, dequantize
from jaxquant.recipes import apply_recipe, load_recipe
from jaxquant.transforms import dequantize_params

Q = gguf.GGMLQuantizationType


@functools.lru_cache(maxsize=1)
def smol():
  """The packaged GGUF, read once: (file, cfg, float params)."""
  cfg, params = llama.load_gguf()
  return gguf_io.read_gguf(llama.smollm2_path()), cfg, params


@functools.lru_cache(maxsize=1)
def smol_slice(layers: int = 2):
  """The first `layers` blocks of SmolLM2 with its embedding and final norm."""
  _, cfg, params = smol()
  keep = {k: v for k, v in params.items() if not k.startswith("layers_") or int(k[7:]) < layers}
  return dataclasses.replace(cfg, layers=layers), keep


@functools.lru_cache(maxsize=1)
def tokenizer():
  return llama.gguf_tokenizer(smol()[0])


def _raw_tensor(w: np.ndarray, qtype) -> gguf_io.GGUFTensor:
  """`w [rows, n]` quantized by `gguf`'s own quantizer, as a tensor view."""
  raw = gguf.quants.quantize(w, qtype)
  return gguf_io.GGUFTensor("t", qtype.name, w.shape, raw)


# --------------------------------------------------------------------------- reader
@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1])
@settings(max_examples=6)
@given(
  rows=st.integers(1, 4),
  blocks=st.integers(1, 3),
  seed=st.integers(0, 2**16),
  shift=st.floats(-2, 2),
)
def test_block_formats_match_gguf_dequantization(qtype, rows, blocks, seed, shift):
  w = np.random.default_rng(seed).normal(shift, 1.0, (rows, 32 * blocks)).astype(np.float32)
  t = _raw_tensor(w, qtype)
  reference = gguf.quants.dequantize(t.data, qtype)
  np.testing.assert_array_equal(gguf_io.to_float(t), reference)
  for layout in ("torch", "flax"):
    q = gguf_io.to_qarray(t, layout)
    got = np.asarray(dequantize(q))
    got = got.T if layout == "flax" else got
    span = np.max(np.abs(reference)) + 1e-6
    # Q8_0/Q4_0 decode as ggml does; Q4_1's float zero point costs float32 rounding only.
    tol = 0.0 if qtype != Q.Q4_1 else 4 * np.finfo(np.float32).eps * span
    np.testing.assert_allclose(got, reference, rtol=0, atol=tol)


def test_the_packaged_file_reads_as_smollm2():
  file, cfg, params = smol()
  assert (cfg.layers, cfg.dim, cfg.heads, cfg.kv_heads, cfg.mlp, cfg.vocab) == (
    30,
    576,
    9,
    3,
    1536,
    49152,
  )
  assert cfg.rope_theta == 100000.0 and cfg.tie_embeddings
  assert file["blk.0.attn_q.weight"].type == "Q4_1" and file["token_embd.weight"].type == "Q8_0"
  n = sum(np.size(x) for x in jax.tree.leaves(params))
  assert 134_000_000 < n < 135_000_000  # 134.5M parameters
  emb = gguf_io.to_float(file["token_embd.weight"])
  np.testing.assert_array_equal(np.asarray(params["embed_tokens"]["embedding"]), emb)


def test_q4_1_reencodes_exactly_with_a_float_zero_point_and_not_with_an_integer_one():
  file, _, _ = smol()
  t = file["blk.3.ffn_down.weight"]
  kernel = gguf_io.to_float(t).T  # the float reference, [in, out]
  direct = gguf_io.to_qarray(t)
  again = quantize_float_zero(jnp.asarray(kernel), direct.spec)
  np.testing.assert_array_equal(np.asarray(codes(again)), np.asarray(codes(direct)))
  np.testing.assert_array_equal(np.asarray(again.scale), np.asarray(direct.scale))
  np.testing.assert_array_equal(np.asarray(again.zero_point), np.asarray(direct.zero_point))
  integer = quantize(jnp.asarray(kernel), "uint4:g32:asym:scale=f16")
  err = np.abs(np.asarray(dequantize(integer)) - kernel)
  assert np.mean(np.asarray(codes(integer)) != np.asarray(codes(direct))) > 0.001
  assert err.max() > 1e-4  # the rounded zero point shifts the grid


def test_rope_rows_turn_interleaved_pairs_into_halves():
  x = jax.random.normal(jax.random.key(0), (2, 5, 3, 8))
  rows = llama.rope_rows(1, 8)
  pos = jnp.arange(5)
  np.testing.assert_allclose(
    np.asarray(cache.rotary(x[..., rows], pos, 100.0)),
    np.asarray(cache.rotary_interleaved(x, pos, 100.0)[..., rows]),
    rtol=1e-5,
    atol=1e-5,
  )


def test_the_restored_row_order_is_the_one_the_model_was_trained_with():
  _, cfg, params = smol()
  ids = language.token_stream(tokenizer(), data.evaluation_text(4000))[:128][None]
  model = llama.Llama(cfg)

  def loss(p):
    logits = model.apply({"params": p}, jnp.asarray(ids))
    logp = jax.nn.log_softmax(logits[:, :-1], -1)
    return -float(jnp.mean(jnp.take_along_axis(logp, jnp.asarray(ids)[:, 1:, None], -1)))

  undo = np.argsort(llama.rope_rows(cfg.heads, cfg.head_dim))
  scrambled = jax.tree.map(lambda x: x, params)
  for i in range(cfg.layers):
    q = scrambled[f"layers_{i}"]["self_attn"]["q_proj"]
    q["kernel"] = q["kernel"][:, undo]  # back to GGUF's interleaved order
  assert loss(params) < 4.0 < loss(scrambled)


# --------------------------------------------------------------------------- tokenizer
def test_tokenizer_round_trips_real_text_and_splits_digits():
  tok = tokenizer()
  text = data.evaluation_text(20000)
  assert tok.decode(tok.encode(text).ids) == text
  assert tok.encode("in 2024").tokens == ["in", "Ġ", "2", "0", "2", "4"]
  assert tok.token_to_id("<|im_start|>") == tok.encode("<|im_start|>").ids[0]


# --------------------------------------------------------------------------- model
def test_cached_decoding_matches_the_full_forward_on_a_two_layer_slice():
  cfg, params = smol_slice()
  model = llama.Llama(cfg)
  ids = jnp.asarray(language.token_stream(tokenizer(), data.evaluation_text(2000))[:24][None])
  full = model.apply({"params": params}, ids)
  kv = cache.init_cache(cfg, 1, 24)
  first, kv = model.apply({"params": params}, ids[:, :16], cache=kv, pos=0)
  steps = [first]
  for t in range(16, 24):
    out, kv = model.apply({"params": params}, ids[:, t : t + 1], cache=kv, pos=t)
    steps.append(out)
  np.testing.assert_allclose(np.concatenate(steps, 1), full, rtol=1e-4, atol=1e-3)
  kv8 = cache.init_cache(cfg, 1, 24, "int8")
  got8, _ = model.apply({"params": params}, ids, cache=kv8, pos=0)
  assert np.mean(np.argmax(got8, -1) == np.argmax(full, -1)) > 0.9


def test_the_gguf_codes_serve_directly_as_qarrays():
  cfg, params = smol_slice()
  _, qparams = llama.load_gguf(quantized=True)
  qparams = {k: v for k, v in qparams.items() if k in params}
  q = qparams["layers_0"]["self_attn"]["q_proj"]["kernel"]
  assert str(q.spec) == "uint4:g32:scale=f16" and q.packed
  ids = jnp.asarray(language.token_stream(tokenizer(), data.evaluation_text(2000))[:32][None])
  rules = load_recipe("w4g64-asym").rules  # any rule list naming the kernels
  served = quantize_model(llama.Llama(cfg), rules, "serve").apply({"params": qparams}, ids)
  float_out = llama.Llama(cfg).apply({"params": params}, ids)
  np.testing.assert_allclose(served, float_out, rtol=1e-3, atol=2e-2)


@pytest.mark.parametrize(
  "name",
  ["w8", pytest.param("w4g64-gptq", marks=pytest.mark.slow)],  # GPTQ: test_chain, 30 s
)
def test_a_quantized_two_layer_slice_stays_close_to_float(name):
  cfg, params = smol_slice()
  tok = tokenizer()
  ids = jnp.asarray(language.token_stream(tok, data.evaluation_text(3000))[:64][None])
  batches = language.calibration_batches(tok, sequences=8, length=64, batch=4)
  groups = llama.smoothing_groups(cfg)
  data_set = CalibrationSet(llama.Llama(cfg, logits=False), batches, smoothing_groups=groups)
  result = apply_recipe(load_recipe(name), params, data_set)
  served = quantize_model(llama.Llama(cfg), result.rules, "serve")
  got = served.apply({"params": result.qparams}, ids)
  ref = llama.Llama(cfg).apply({"params": params}, ids)
  top1 = np.mean(np.argmax(got, -1) == np.argmax(ref, -1))
  assert top1 > (0.95 if name == "w8" else 0.7), top1
  assert jax.tree.structure(dequantize_params(result.qparams)) == jax.tree.structure(params)


def test_hugging_face_layout_round_trips(tmp_path):
  cfg, params = smol_slice()
  cfg = dataclasses.replace(cfg, tie_embeddings=False)
  rng = np.random.default_rng(0)
  head = jnp.asarray(rng.normal(size=(cfg.dim, cfg.vocab)), jnp.float32)
  params = dict(params, lm_head={"kernel": head})
  safetensors.numpy.save_file(llama.hf_tensors(cfg, params), tmp_path / "model.safetensors")
  (tmp_path / "config.json").write_text(json.dumps(llama.hf_config(cfg)))
  cfg2, params2 = llama.load_hf(tmp_path)
  assert cfg2 == cfg
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  names = llama.hf_tensors(cfg, params)
  assert "model.layers.0.self_attn.q_proj.weight" in names and "lm_head.weight" in names


def test_hugging_face_folder_with_wrong_shapes_names_the_parameter(tmp_path):
  cfg, params = smol_slice()
  tensors = llama.hf_tensors(cfg, params)
  tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:10]
  safetensors.numpy.save_file(tensors, tmp_path / "model.safetensors")
  (tmp_path / "config.json").write_text(json.dumps(llama.hf_config(cfg)))
  with pytest.raises(ValueError, match="layers_1/mlp/up_proj/kernel"):
    llama.load_hf(tmp_path)


# --------------------------------------------------------------------------- perplexity
def test_windows_follow_the_gptq_protocol():
  ids = np.arange(1030, dtype=np.int32)
  w = language.token_windows(ids, 512)
  assert w.shape == (2, 512) and w[1, 0] == 512  # non-overlapping, the remainder dropped
  with pytest.raises(ValueError, match="fewer than one window"):
    language.token_windows(ids[:100], 512)


def test_perplexity_is_exp_of_the_mean_next_token_nll():
  cfg, params = smol_slice()
  lm = language.LanguageModel("fp32", cfg, llama.Llama(cfg), {"params": params}, tokenizer(), 0, 0)
  windows = language.token_windows(lm.encode(data.evaluation_text(8000)), 32, 4)
  got = language.perplexity(lm, windows, batch=3)
  logits = llama.Llama(cfg).apply({"params": params}, jnp.asarray(windows))
  logp = jax.nn.log_softmax(np.asarray(logits, np.float64)[:, :-1], -1)
  nll = -np.mean(np.take_along_axis(logp, windows[:, 1:, None], -1))
  assert got["tokens"] == 4 * 31
  np.testing.assert_allclose(got["nll"], nll, rtol=1e-4)
  np.testing.assert_allclose(got["ppl"], np.exp(nll), rtol=1e-4)
  int8 = language.perplexity(lm, windows, cache="int8")
  assert abs(int8["ppl"] / got["ppl"] - 1) < 0.05


# --------------------------------------------------------------------------- command line
@pytest.mark.slow  # 35 s: README command 1 runs exactly this
def test_cli_quantizes_smollm2_and_generates_paris_from_the_checkpoint(tmp_path, capsys):
  out = tmp_path / "smol-w8"
  assert main(["quantize", "--model", "smollm2", "--recipe", "w8", "--out", str(out)]) == 0
  report = json.loads((out / "report.json").read_text())
  assert report["model"] == "smollm2" and len(report["plan"]["rows"]) > 210
  capsys.readouterr()
  argv = ["generate", "--model", "smollm2", "--checkpoint", str(out), "--steps", "3"]
  assert main([*argv, "--prompt", "The capital of France is"]) == 0
  printed = " ".join(capsys.readouterr().out.split())
  assert "The capital of France is Paris" in printed
  assert "decode" in printed and "tokens/s" in printed


def test_cli_perplexity_on_the_users_text_writes_json(tmp_path):
  held_out = tmp_path / "held_out.txt"
  held_out.write_text(data.evaluation_text(3000), encoding="utf-8")
  result = tmp_path / "ppl.json"
  argv = ["eval", "--model", "smollm2", "--recipes", "fp32", "--text", str(held_out)]
  assert main([*argv, "--window", "64", "--max-windows", "2", "--json", str(result)]) == 0
  rows = json.loads(result.read_text())["rows"]
  assert [r["recipe"] for r in rows] == ["fp32"] and rows[0]["tokens"] == 2 * 63
  assert 1.0 < rows[0]["ppl"] < 200.0 and rows[0]["delta_vs_fp32"] == 0.0


@pytest.mark.parametrize(
  "argv, message",
  [
    (["quantize", "--model", "smollm2", "--recipe", "w4g64-gptq", "--calibration", "MISSING"],
     "--calibration"),
    (["eval", "--model", "smollm2", "--text", "MISSING"], "--text"),
    (["eval", "--model", "smollm2", "--recipes", "no-such-recipe"], "no-such-recipe"),
    (["quantize", "--model", "smollm2", "--recipe", "w4g128"], "group size 128"),
  ],
)  # fmt: skip
def test_cli_bad_llm_input_fails_before_any_work(tmp_path, capsys, monkeypatch, argv, message):
  monkeypatch.setattr(language, "language_model", _boom)
  monkeypatch.setattr(cli, "apply_recipe", _boom)
  argv = [a.replace("MISSING", str(tmp_path / "missing.txt")) for a in argv]
  if argv[0] == "quantize":
    argv += ["--out", str(tmp_path / "q")]
  assert main(argv) == 2
  printed = " ".join(capsys.readouterr().err.split())
  assert "error:" in printed and message in printed
  assert not (tmp_path / "q").exists()


def _boom(*args, **kwargs):
  raise AssertionError("work started although the input was bad")
