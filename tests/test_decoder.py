"""The byte-level decoder and its corpus; the QAT experiment's quick setting runs end to end."""

import runpy
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.apps import data
from jaxquant.apps.models.decoder import Decoder, DecoderConfig, next_byte_loss

EXPERIMENT = Path(__file__).resolve().parents[1] / "experiments" / "qat_decoder.py"


def test_corpus_split_is_disjoint_real_python():
  train = data.stdlib_source("train", 1 << 20)
  heldout = data.stdlib_source("heldout", 1 << 18)
  assert train.dtype == np.uint8 and len(train) == 1 << 20 and len(heldout) == 1 << 18
  assert b"def " in bytes(train) and b"import " in bytes(heldout)
  assert bytes(heldout[:4096]) not in bytes(data.stdlib_source("train"))


def test_decoder_is_causal_and_shapes_are_right():
  cfg = DecoderConfig(dim=32, layers=1, heads=2, mlp=64)
  model = Decoder(cfg)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16)), jnp.int32)
  params = model.init(jax.random.key(0), tokens)["params"]
  logits = model.apply({"params": params}, tokens)
  assert logits.shape == (2, 16, 256)
  changed = tokens.at[:, 10].set((tokens[:, 10] + 1) % 256)
  again = model.apply({"params": params}, changed)
  np.testing.assert_allclose(np.asarray(again[:, :10]), np.asarray(logits[:, :10]), atol=1e-5)
  assert float(next_byte_loss(logits, tokens)) > 0


@pytest.mark.slow  # 76 s on a 2-core CPU: the experiment's own smoke test
def test_qat_experiment_quick_setting_runs(capsys, monkeypatch):
  monkeypatch.setattr(sys, "argv", ["qat_decoder.py", "--quick"])
  runpy.run_path(str(EXPERIMENT), run_name="__main__")
  out = capsys.readouterr().out
  for run in (
    "fp32",
    "bf16-mixed",
    "fp32 fine-tune control",
    "int8-qat (w8a8)",
    "int4-qat lsq",
    "int4 ptq gptq",
  ):
    assert f"| {run} |" in out
  assert "INT4 RTN loss gap recovered (reference: fp32 fine-tune control)" in out
