"""`jaxquant export`: serialized serve functions for cpu/cuda/tpu that reload and run on CPU."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant import export as serving
from jaxquant import flax as jqf
from jaxquant.apps.cli import main
from jaxquant.apps.models.decoder import Decoder, DecoderConfig
from jaxquant.ops import serving_layout

CFG = DecoderConfig(dim=128, layers=1, heads=2, mlp=256)


@pytest.fixture(scope="module")
def decoder():
  model = Decoder(CFG)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (3, 20)), jnp.int32)
  return model, params, tokens


@pytest.mark.parametrize("recipe", ["w8a8", "w4g128"])
def test_export_reload_gives_identical_outputs_on_cpu(decoder, recipe, tmp_path):
  model, params, tokens = decoder
  rules = jq.load_recipe(recipe).rules
  fn = jax.jit(jqf.quantize_model(model, rules, "serve").apply)
  variables = {"params": serving_layout(jq.quantize_params(params, rules))}  # codes [out, in]
  out = serving.export_serve(
    tmp_path / "art",
    fn,
    variables,
    serving.symbolic_inputs("b, t", [jnp.int32]),
    metadata={"r": recipe},
  )
  assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no temporary folder left
  served = serving.load_exported(out)
  assert served.platforms == ("cpu", "cuda", "tpu")
  manifest = json.loads((out / serving.MANIFEST).read_text())
  assert manifest["platforms"] == ["cpu", "cuda", "tpu"] and not manifest["params_embedded"]
  assert manifest["inputs"] == [{"shape": ["b", "t"], "dtype": "int32"}]
  for x in (tokens, tokens[:1, :5]):  # symbolic batch and length: one artifact, any shape
    np.testing.assert_allclose(
      np.asarray(served(x)), np.asarray(fn(variables, x)), rtol=0, atol=1e-6
    )
  program = (out / serving.PROGRAM).stat().st_size
  assert program < (out / serving.PARAMS).stat().st_size  # params are arguments, not constants


def test_exported_program_keeps_the_integer_path(decoder):
  model, params, tokens = decoder
  rules = jq.load_recipe("w8a8").rules
  fn = jax.jit(jqf.quantize_model(model, rules, "serve").apply)
  exported = serving.lower(fn, {"params": jq.quantize_params(params, rules)}, [tokens])
  text = exported.mlir_module()
  assert "xi8>" in text and "xi32>" in text


def test_load_rejects_a_folder_that_is_not_an_export(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a jaxquant export"):
    serving.load_exported(tmp_path)


def test_cli_exports_the_decoder(tmp_path, capsys):
  out = tmp_path / "dec"
  code = main(
    [
      "export",
      "--model",
      "decoder",
      "--recipe",
      "w8a8",
      "--config",
      "dim=32,layers=1,heads=2,mlp=64",
      "--out",
      str(out),
    ]
  )
  assert code == 0
  assert "exported for cpu, cuda, tpu" in capsys.readouterr().out
  served = serving.load_exported(out)
  assert served.manifest["metadata"]["config"]["dim"] == 32
  tokens = jnp.asarray(np.arange(24).reshape(2, 12), jnp.int32)
  assert served(tokens).shape == (2, 12, 256)
  assert main(["export", "--model", "decoder", "--config", "width=3", "--out", str(out)]) == 2


def test_cli_exports_minilm_embeddings(tmp_path):
  from jaxquant.apps import evaluate
  from jaxquant.apps.models import minilm

  out = tmp_path / "minilm"
  assert main(["export", "--model", "minilm", "--recipe", "w8a8", "--out", str(out)]) == 0
  served = serving.load_exported(out)
  assert served.platforms == ("cpu", "cuda", "tpu")
  encoder = evaluate.minilm_encoder("w8a8")
  batch = minilm.tokenize(minilm.load_tokenizer(), ["An exported encoder.", "Same numbers."])
  args = [
    jnp.asarray(batch[k], jnp.int32) for k in ("input_ids", "attention_mask", "token_type_ids")
  ]
  ref = minilm.sentence_embedding_fn(encoder.apply_fn)(encoder.variables, *args)
  np.testing.assert_allclose(np.asarray(served(*args)), np.asarray(ref), rtol=0, atol=1e-6)
