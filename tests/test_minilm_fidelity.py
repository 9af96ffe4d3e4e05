"""Quantized MiniLM against float32 on held-out sentences; the embed and eval commands."""

import json

import numpy as np
import pytest

from jaxquant.apps import cli, data, evaluate
from jaxquant.apps.models import minilm

pytest.importorskip(minilm.PACKAGE, reason=minilm.INSTALL_HINT)

N = 128


@pytest.fixture(scope="module")
def params():
  return minilm.load_params()


@pytest.fixture(scope="module")
def sentences():
  return data.evaluation_sentences(N)


@pytest.fixture(scope="module")
def reference(params, sentences):
  return evaluate.minilm_encoder("fp32", params).encode(sentences)


def _fidelity(name, params, sentences, reference):
  return evaluate.fidelity(reference, evaluate.minilm_encoder(name, params).encode(sentences))


@pytest.mark.parametrize("recipe, floor", [("w8", 0.999), ("w8a8", 0.995), ("bf16", 0.9999)])
def test_recipes_keep_the_embeddings(params, sentences, reference, recipe, floor):
  assert _fidelity(recipe, params, sentences, reference)["mean_cosine"] >= floor


def test_int4_round_to_nearest_loses_measurably(params, sentences, reference):
  w4 = _fidelity("w4g128-asym", params, sentences, reference)["mean_cosine"]
  w8 = _fidelity("w8", params, sentences, reference)["mean_cosine"]
  assert 0.9 < w4 < w8 - 0.01  # what GPTQ/AWQ-style compensation has to recover


def test_static_recipe_calibrates_on_other_text(params):
  rules = evaluate.load_recipe("w8a8-static").rules
  stats = evaluate.calibrate_minilm(rules, params, data.calibration_sentences(32))
  assert (
    len(stats) == 36 and all
  )  # every encoder Dense (the pooler is not run)(float(s["count"]) > 0 for s in stats.values())
  assert not set(data.calibration_sentences(256)) & set(data.evaluation_sentences(512))


def test_cli_embed_and_eval(tmp_path, sentences, reference):
  text = tmp_path / "s.txt"
  data.write_sentences(text, sentences[:16])
  out = tmp_path / "emb.npy"
  assert (
    cli.main(
      ["embed", "--model", "minilm", "--recipe", "w8", "--sentences", str(text), "--out", str(out)]
    )
    == 0
  )
  emb = np.load(out)
  assert emb.shape == (16, 384)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
  assert evaluate.cosine(reference[:16], emb).min() > 0.998
  result = tmp_path / "r.json"
  assert (
    cli.main(["eval", "--recipes", "fp32,w8", "--sentences", str(text), "--json", str(result)]) == 0
  )
  rows = json.loads(result.read_text())["rows"]
  assert rows[0]["mean_cosine"] == pytest.approx(1.0, abs=1e-6)
  assert rows[1]["weight_bytes"] < 0.7 * rows[0]["weight_bytes"]


def test_cli_embed_reads_a_quantized_checkpoint(tmp_path):
  out = tmp_path / "q"
  assert cli.main(["quantize", "--recipe", "w8a8", "--out", str(out)]) == 0
  text = tmp_path / "s.txt"
  data.write_sentences(text, data.evaluation_sentences(4))
  assert (
    cli.main(
      [
        "embed",
        "--checkpoint",
        str(out),
        "--sentences",
        str(text),
        "--out",
        str(tmp_path / "e.npy"),
      ]
    )
    == 0
  )
  direct = evaluate.minilm_encoder("w8a8").encode(data.evaluation_sentences(4))
  np.testing.assert_allclose(np.load(tmp_path / "e.npy"), direct, atol=1e-6)


def test_cli_bad_recipe_fails_before_work(tmp_path, capsys):
  assert cli.main(["eval", "--recipes", "w8,nope"]) == 2
  assert "Unknown recipe 'nope'" in capsys.readouterr().err
