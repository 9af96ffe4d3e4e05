"""PTQ recipes end to end on the real MiniLM: CLI round trip, mixed precision, fidelity."""

import json

import numpy as np
import pytest

from jaxquant import io, mixed
from jaxquant.apps import cli, data, evaluate
from jaxquant.apps.models import minilm
from jaxquant.ptq import CalibrationSet, make_step
from jaxquant.recipes import load_recipe
from jaxquant.transforms import named_leaves, plan

pytest.importorskip(minilm.PACKAGE, reason=minilm.INSTALL_HINT)


@pytest.fixture(scope="module")
def params():
  return minilm.load_params()


@pytest.mark.slow  # 90 s: GPTQ on MiniLM through the CLI; the library path is tested in test_ptq
def test_gptq_checkpoint_round_trip_through_the_cli(tmp_path, monkeypatch):
  monkeypatch.setattr(evaluate, "PTQ_CALIBRATION_SENTENCES", 128)  # quicker than 1024
  out = tmp_path / "gptq"
  assert cli.main(["quantize", "--recipe", "w4g128-gptq", "--out", str(out)]) == 0
  report = json.loads((out / "report.json").read_text())
  shipped = load_recipe("w4g128-gptq")
  assert report["steps"] == [{n: o} for n, o in shipped.steps]
  assert len(report["info"]["gptq"]) == 36  # every kernel's damping
  reproduce = load_recipe(str(out / "recipe.yaml"))
  assert (reproduce.steps, reproduce.rules) == (shipped.steps, shipped.rules)
  text = tmp_path / "s.txt"
  sentences = data.evaluation_sentences(32)
  data.write_sentences(text, sentences)
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
  reference = evaluate.minilm_encoder("fp32").encode(sentences)
  got = np.load(tmp_path / "e.npy")
  gptq = evaluate.cosine(reference, got).mean()
  rtn = evaluate.cosine(reference, evaluate.minilm_encoder("w4g128-asym").encode(sentences)).mean()
  assert gptq > rtn + 0.01


@pytest.mark.slow  # 40 s; the selector's exact knapsack and budgets: tests/test_mixed.py
def test_mixed_precision_chooses_widths_under_the_budget(params):
  recipe = load_recipe("mixed:avg_bits=5")
  batches = evaluate.minilm_batches(data.calibration_sentences(32), batch_size=16)
  choices = ("int4:g128:asym", "int8", "bf16")  # one GPTQ per layer: quick
  step = mixed.Mixed(avg_bits=5.0, sensitivity="hessian", choices=choices)
  data_set = CalibrationSet(minilm.MiniLM(), batches, row_mask=lambda batch: batch[1])
  rules, info = mixed.choose_rules(
    params, plan(params, recipe.rules), data_set, step, make_step("gptq")
  )
  assert info["average_bits"] <= 5.0 and set(info["specs"].values()) <= set(choices)
  assert len(info["specs"]) == 36 and set(info["specs"].values()) != {"int4:g128:asym"}
  specs = {r.path: str(r.spec) for r in plan(params, rules).quantized}
  assert all(specs[p] == c for p, c in info["specs"].items())
  stored = sum(
    mixed.stored_bits(c, np.shape(w))
    for p, w in named_leaves(params)
    if (c := info["specs"].get(p))
  )
  assert stored / sum(np.size(w) for p, w in named_leaves(params) if p in specs) <= 5.0


def test_hqq_recipe_works_on_any_safetensors_file(tmp_path):
  from safetensors.numpy import save_file

  f = tmp_path / "w.safetensors"
  save_file(
    {"lin.weight": np.random.default_rng(0).normal(size=(32, 128)).astype(np.float32)}, str(f)
  )
  out = tmp_path / "q"
  assert (
    cli.main(
      [
        "quantize",
        "--model",
        str(f),
        "--layout",
        "torch",
        "--recipe",
        "w4g64-hqq",
        "--out",
        str(out),
      ]
    )
    == 0
  )
  q = io.load(out)["lin"]["kernel"]
  assert str(q.spec) == "int4:g64:asym" and q.zero_point.dtype == np.float32


def test_data_driven_recipes_need_a_runnable_model(tmp_path, capsys):
  from safetensors.numpy import save_file

  f = tmp_path / "w.safetensors"
  save_file({"lin.weight": np.ones((128, 128), np.float32)}, str(f))
  assert (
    cli.main(
      ["quantize", "--model", str(f), "--recipe", "w4g128-gptq", "--out", str(tmp_path / "q")]
    )
    == 2
  )
  assert "need calibration data" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize(
  "recipe, floor",
  [
    ("w4g128-gptq", 0.985),
    ("w4g128-awq", 0.98),
    ("w4g128-awq-gptq", 0.99),
    ("mixed:avg_bits=5", 0.995),
  ],
)
def test_ptq_fidelity_targets(params, recipe, floor):
  sentences = data.evaluation_sentences(512)
  reference = evaluate.minilm_encoder("fp32", params).encode(sentences)
  got = evaluate.minilm_encoder(recipe, params).encode(sentences)
  assert evaluate.cosine(reference, got).mean() >= floor
