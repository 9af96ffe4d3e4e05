"""The ``jaxquant`` command line (`jaxquant.apps.cli.main`): recipes, plan, quantize, embed, eval.

Only round-to-nearest recipes run here (w8, int8, w4g128); data-driven ones are only refused.
"""

import json
import re

import numpy as np
import pytest
from safetensors.numpy import save_file

import jaxquant as jq
from jaxquant import interop, transforms
from jaxquant.apps import cli, evaluate
from jaxquant.apps.cli import main
from jaxquant.apps.models import minilm
from jaxquant.recipes import recipe_names

SENTENCES = ["A cat sat on the mat.", "Quantized weights are small.", "JAX compiles functions."]
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def text(captured: str) -> str:
  """Console output with colour codes dropped and rich's line wrapping undone."""
  return " ".join(ANSI.sub("", captured).split())


def squashed(s: str) -> str:
  """`s` without any whitespace (rich may fold a long path across lines)."""
  return "".join(ANSI.sub("", s).split())


def boom(what: str):
  def fail(*args, **kwargs):
    raise AssertionError(f"{what} ran although the command should have failed before it")

  return fail


def assert_same_qarray(got, want, path: str) -> None:
  assert isinstance(got, jq.QArray), f"{path}: {type(got)} is not a QArray"
  assert isinstance(want, jq.QArray), path
  assert got.spec == want.spec, path
  assert np.dtype(got.dtype) == np.dtype(want.dtype), path
  assert (got.packed, got.pad, got.perm) == (want.packed, want.pad, want.perm), path
  for field in ("values", "scale", "zero_point"):
    a, b = getattr(got, field), getattr(want, field)
    assert (a is None) == (b is None), f"{path}.{field}"
    if a is not None:
      a, b = np.asarray(a), np.asarray(b)
      assert (a.dtype, a.shape) == (b.dtype, b.shape), f"{path}.{field}"
      assert a.tobytes() == b.tobytes(), f"{path}.{field} differs"


def assert_checkpoint_matches(folder, params, rules) -> transforms.Plan:
  """`jaxquant.load(folder)` holds QArrays exactly where the plan says, bit-equal to
  `quantize_params`, and every other leaf as it was."""
  plan = jq.plan(params, rules)
  expected = dict(transforms.named_leaves(jq.quantize_params(params, rules)))
  originals = dict(transforms.named_leaves(params))
  loaded = dict(transforms.named_leaves(jq.load(folder)))
  assert sorted(loaded) == sorted(originals)
  quantized = {r.path for r in plan.quantized}
  assert quantized, "the plan quantizes nothing: the test would prove nothing"
  for path, leaf in loaded.items():
    if path in quantized:
      assert_same_qarray(leaf, expected[path], path)
    else:
      assert not isinstance(leaf, jq.QArray), f"{path} was quantized; the plan keeps it"
      a, b = np.asarray(leaf), np.asarray(originals[path])
      assert (a.dtype, a.shape) == (b.dtype, b.shape), path
      assert a.tobytes() == b.tobytes(), path
  return plan


def assert_report_and_recipe(folder, recipe, plan) -> None:
  report = json.loads((folder / "report.json").read_text())
  assert report["recipe"] == recipe.name
  assert report["steps"] == [{n: dict(o)} for n, o in recipe.steps]
  assert report["file_bytes"] == (folder / "model.safetensors").stat().st_size
  assert report["rules"] == [r.to_dict() for r in recipe.rules]
  assert [(r["path"], r["spec"]) for r in report["plan"]["rows"]] == [
    (r.path, None if r.spec is None else str(r.spec)) for r in plan.rows
  ]
  assert set(report["errors"]) == {r.path for r in plan.quantized}
  again = jq.load_recipe(str(folder / "recipe.yaml"))
  assert again.rules == recipe.rules
  assert again.steps == recipe.steps


@pytest.fixture(scope="module")
def params():
  return minilm.load_params()


@pytest.fixture(scope="module")
def w8_checkpoint(tmp_path_factory):
  out = tmp_path_factory.mktemp("cli") / "minilm-w8"
  assert main(["quantize", "--model", "minilm", "--recipe", "w8", "--out", str(out)]) == 0
  return out


@pytest.fixture(scope="module")
def w8_embeddings():
  return np.asarray(evaluate.minilm_encoder("w8").encode(SENTENCES))


@pytest.fixture
def sentences_file(tmp_path):
  path = tmp_path / "sentences.txt"
  path.write_text("".join(s + "\n" for s in SENTENCES), encoding="utf-8")
  return path


# --------------------------------------------------------------------------- recipes, plan
def test_recipes_lists_every_shipped_recipe_with_its_description(capsys):
  names = recipe_names()
  assert "w4g128-awq-gptq" in names and "w8" in names
  assert main(["recipes"]) == 0
  out = text(capsys.readouterr().out)
  for name in names:
    description = " ".join(jq.load_recipe(name).description.split())
    assert description, name
    assert f"{name}: {description}" in out, name


def test_plan_prints_the_table_and_a_summary_that_agrees_with_jaxquant_plan(params, capsys):
  rules = jq.load_recipe("w4g128").rules
  expected = jq.plan(params, rules)
  assert main(["plan", "--model", "minilm", "--recipe", "w4g128"]) == 0
  raw = capsys.readouterr().out
  out = text(raw)
  found = re.findall(r"(\d+) of (\d+) tensors quantized", out)
  assert found == [(str(len(expected.quantized)), str(len(expected.rows)))]
  assert 0 < len(expected.quantized) < len(expected.rows)
  assert "plan (dry run)" in out and "recipe w4g128:" in out
  lines = squashed(raw)
  for row in expected.quantized:
    assert squashed(row.path) in lines, row.path
  assert "int4:g128" in out
  kept = [r.path for r in expected.rows if r.spec is None]
  assert "embeddings/word_embeddings/embedding" in kept
  assert "word_embeddings" not in out  # kept tensors only with --all
  assert main(["plan", "--model", "minilm", "--recipe", "w4g128", "--all"]) == 0
  assert "embeddings/word_embeddings/embedding" in squashed(capsys.readouterr().out)


# --------------------------------------------------------------------------- quantize
def test_quantize_minilm_writes_a_checkpoint_equal_to_quantize_params(w8_checkpoint, params):
  out = w8_checkpoint
  assert sorted(p.name for p in out.iterdir()) == [
    "model.safetensors",
    "recipe.yaml",
    "report.json",
  ]
  recipe = jq.load_recipe("w8")
  plan = assert_checkpoint_matches(out, params, recipe.rules)
  assert_report_and_recipe(out, recipe, plan)


def test_quantize_a_flax_layout_safetensors_file(tmp_path, capsys):
  rng = np.random.default_rng(0)
  tree = {
    "dense": {
      "kernel": rng.standard_normal((64, 32)).astype(np.float32),
      "bias": rng.standard_normal(32).astype(np.float32),
    }
  }
  file = tmp_path / "weights.safetensors"
  save_file({"dense.kernel": tree["dense"]["kernel"], "dense.bias": tree["dense"]["bias"]}, file)
  out = tmp_path / "q"
  assert main(["quantize", "--model", str(file), "--recipe", "int8", "--out", str(out)]) == 0
  assert "1 of 2 tensors quantized" in text(capsys.readouterr().out)
  recipe = jq.load_recipe("int8")
  plan = assert_checkpoint_matches(out, tree, recipe.rules)
  assert [r.path for r in plan.quantized] == ["dense/kernel"]
  assert_report_and_recipe(out, recipe, plan)


def test_quantize_a_torch_layout_safetensors_file_transposes_weights(tmp_path):
  rng = np.random.default_rng(1)
  weight = rng.standard_normal((32, 64)).astype(np.float32)  # PyTorch Linear: [out, in]
  bias = rng.standard_normal(32).astype(np.float32)
  file = tmp_path / "torch.safetensors"
  save_file({"fc.weight": weight, "fc.bias": bias}, file)
  out = tmp_path / "q"
  argv = ["quantize", "--model", str(file), "--layout", "torch", "--recipe", "int8"]
  assert main([*argv, "--out", str(out)]) == 0
  loaded = jq.load(out)
  kernel = loaded["fc"]["kernel"]
  assert isinstance(kernel, jq.QArray) and kernel.shape == (64, 32)
  np.testing.assert_allclose(np.asarray(jq.dequantize(kernel)), weight.T, atol=0.02, rtol=0)
  np.testing.assert_array_equal(np.asarray(loaded["fc"]["bias"]), bias)
  tree = interop.load_safetensors_params(file, "torch")
  assert tree["fc"]["kernel"].shape == (64, 32)
  assert_checkpoint_matches(out, tree, jq.load_recipe("int8").rules)


# --------------------------------------------------------------------------- errors
def test_unknown_recipe_fails_before_reading_the_model(tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(cli, "load_model_params", boom("reading the model"))
  out = tmp_path / "q"
  argv = ["quantize", "--model", "minilm", "--recipe", "no-such-recipe", "--out", str(out)]
  assert main(argv) == 2
  message = text(capsys.readouterr().err)
  assert "error:" in message and "no-such-recipe" in message
  for name in recipe_names():
    assert name in message, name
  assert not out.exists()
  assert main(["plan", "--model", "minilm", "--recipe", "no-such-recipe"]) == 2


def test_data_driven_recipe_on_a_safetensors_file_is_refused(tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(cli, "apply_recipe", boom("apply_recipe"))
  monkeypatch.setattr(evaluate, "minilm_calibration", boom("calibration"))
  file = tmp_path / "w.safetensors"
  save_file({"dense.kernel": np.ones((64, 32), np.float32)}, file)
  out = tmp_path / "q"
  argv = ["quantize", "--model", str(file), "--recipe", "w4g128-gptq", "--out", str(out)]
  assert main(argv) == 2
  message = text(capsys.readouterr().err)
  assert "error:" in message and "w4g128-gptq" in message
  assert "calibration data" in message and "--model minilm" in message
  assert not out.exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


def test_model_that_is_neither_minilm_nor_a_file(tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(cli, "apply_recipe", boom("apply_recipe"))
  missing = tmp_path / "missing.safetensors"
  out = tmp_path / "q"
  argv = ["quantize", "--model", str(missing), "--recipe", "w8", "--out", str(out)]
  # cli raises SystemExit("error: ...") here (process exit status 1), not main() -> 2.
  try:
    code = main(argv)
  except SystemExit as e:
    message = str(e.code)
  else:
    assert code == 2
    message = capsys.readouterr().err
  message = text(message)
  assert message.startswith("error:")
  assert "is not 'minilm'" in message and "an existing .safetensors file" in message
  assert squashed(str(missing)) in squashed(message)
  assert not out.exists()


def test_embed_with_a_missing_or_empty_sentences_file(tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(evaluate, "minilm_encoder", boom("the encoder"))
  missing = tmp_path / "no-such-sentences.txt"
  out = tmp_path / "emb.npy"
  argv = ["embed", "--model", "minilm", "--recipe", "w8", "--out", str(out)]
  assert main([*argv, "--sentences", str(missing)]) == 2
  message = capsys.readouterr().err
  assert "error:" in message and squashed(str(missing)) in squashed(message)
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  assert main([*argv, "--sentences", str(empty)]) == 2
  assert "no non-empty lines" in text(capsys.readouterr().err)
  assert not out.exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt"]


def test_embed_refuses_a_sentences_file_of_blank_lines(tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(evaluate, "minilm_encoder", boom("the encoder"))
  blank = tmp_path / "blank.txt"
  blank.write_text("\n   \n\n")
  out = tmp_path / "emb.npy"
  argv = ["embed", "--model", "minilm", "--recipe", "fp32", "--sentences", str(blank)]
  assert main([*argv, "--out", str(out)]) == 2
  assert "no non-empty lines" in text(capsys.readouterr().err)
  assert not out.exists()


def test_eval_refuses_other_models_and_bad_recipes_before_any_work(
  tmp_path, sentences_file, capsys, monkeypatch
):
  monkeypatch.setattr(evaluate, "minilm_encoder", boom("the encoder"))
  results = tmp_path / "results.json"
  argv = ["eval", "--recipes", "w8", "--sentences", str(sentences_file), "--json", str(results)]
  assert main([*argv, "--model", str(tmp_path / "other.safetensors")]) == 2
  message = text(capsys.readouterr().err)
  assert "error:" in message and "--model minilm" in message
  argv = ["eval", "--model", "minilm", "--recipes", "w8,no-such-recipe", "--json", str(results)]
  assert main([*argv, "--sentences", str(sentences_file)]) == 2
  assert "no-such-recipe" in text(capsys.readouterr().err)
  assert not results.exists()


def test_eval_checks_recipe_names_before_building_default_sentences(capsys, monkeypatch):
  monkeypatch.setattr(cli.data, "evaluation_sentences", boom("data.evaluation_sentences"))
  monkeypatch.setattr(evaluate, "minilm_encoder", boom("the encoder"))
  assert main(["eval", "--model", "minilm", "--recipes", "w8,no-such-recipe"]) == 2
  assert "no-such-recipe" in text(capsys.readouterr().err)


def test_quantize_to_an_out_that_is_a_file(tmp_path, capsys):
  file = tmp_path / "w.safetensors"
  save_file({"dense.kernel": np.ones((64, 32), np.float32)}, file)
  taken = tmp_path / "taken"
  taken.write_text("not a folder")
  assert main(["quantize", "--model", str(file), "--recipe", "int8", "--out", str(taken)]) == 2
  assert "error:" in text(capsys.readouterr().err)
  assert taken.read_text() == "not a folder"


# --------------------------------------------------------------------------- embed
def test_embed_writes_unit_rows_equal_to_the_encoder(sentences_file, w8_embeddings, tmp_path):
  out = tmp_path / "emb.npy"
  argv = ["embed", "--model", "minilm", "--recipe", "w8", "--sentences", str(sentences_file)]
  assert main([*argv, "--out", str(out)]) == 0
  emb = np.load(out)
  assert emb.shape == (3, 384) and emb.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
  np.testing.assert_allclose(emb, w8_embeddings, rtol=0, atol=1e-6)


def test_embed_from_a_quantize_checkpoint(sentences_file, w8_checkpoint, w8_embeddings, tmp_path):
  out = tmp_path / "emb.npy"
  argv = ["embed", "--model", "minilm", "--checkpoint", str(w8_checkpoint)]
  assert main([*argv, "--sentences", str(sentences_file), "--out", str(out)]) == 0
  np.testing.assert_allclose(np.load(out), w8_embeddings, rtol=0, atol=1e-6)
