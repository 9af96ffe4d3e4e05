"""Bad input to the ``jaxquant`` command line: exit status 2, one ``error:`` line on stderr that
names the path or option and the fix, no traceback, and nothing written. Internal errors keep
their traceback (exit status 1); ``--debug`` shows it for user errors too.

The matrix fails before any model is read (the work itself is replaced by `boom`), so it is
fast; only the checkpoint-mismatch cases read real model shapes (MiniLM, the SmolLM2 header).
"""

import json
import os
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

import jaxquant as jq
from jaxquant import export
from jaxquant.apps import bench, cli, data, evaluate, language, serving
from jaxquant.apps.cli import main
from jaxquant.apps.models import llama, minilm
from jaxquant.apps.models.decoder import Decoder, DecoderConfig

TINY_DECODER = "dim=32,layers=1,heads=2,mlp=64"


def boom(*args, **kwargs):
  raise AssertionError("work started although the input was bad")


@pytest.fixture
def no_work(monkeypatch):
  """Every step that loads a model or computes fails the test if reached."""
  for module, name in [
    (cli, "load_model_params"),
    (cli, "apply_recipe"),
    (evaluate, "minilm_encoder"),
    (language, "language_model"),
    (language, "load_checkpoint"),
    (language, "load_source"),
    (serving, "minilm_serve"),
    (serving, "decoder_serve"),
    (export, "lower"),
    (bench, "run"),
  ]:
    monkeypatch.setattr(module, name, boom)


@pytest.fixture
def files(tmp_path) -> Path:
  """A folder of inputs and obstacles: a plain file, a folder with a file in it, recipes and
  text files."""
  (tmp_path / "file").write_text("not a folder")
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "keep.txt").write_text("mine")
  (tmp_path / "bad.yaml").write_text("rules: [\n  - {pattern: x\n")
  (tmp_path / "folder.yaml").mkdir()
  (tmp_path / "latin1.txt").write_bytes("Café au lait.\n".encode("latin-1"))
  (tmp_path / "s.txt").write_text("A cat sat on the mat.\nJAX compiles functions.\n")
  (tmp_path / "results.json").write_text("{}")
  (tmp_path / "no-report").mkdir()
  (tmp_path / "bad-report").mkdir()
  (tmp_path / "bad-report" / "report.json").write_text("{not json")
  return tmp_path


def snapshot(root: Path) -> dict[str, bytes | None]:
  """Every path under `root` with its bytes (None for a folder)."""
  return {
    str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
    for p in sorted(root.rglob("*"))
  }


def run(argv, capsys) -> tuple[int, str]:
  """``(exit status, stderr)`` of the command line with `argv` (paths made strings)."""
  try:
    code = main([str(a) for a in argv])
  except SystemExit as e:  # argparse
    code = e.code
  return code, capsys.readouterr().err


def assert_user_error(argv, capsys, *words: str) -> str:
  code, err = run(argv, capsys)
  assert "Traceback" not in err, err
  lines = err.splitlines()
  assert len(lines) == 1, err
  assert lines[0].startswith("error: "), err
  for word in words:
    assert word in lines[0], (word, lines[0])
  assert code == 2, err
  return lines[0]


Q = ["quantize", "--model", "minilm", "--recipe", "w8"]
EMBED = ["embed", "--model", "minilm", "--recipe", "w8"]
DEC = ["export", "--model", "decoder", "--config", TINY_DECODER]
CASES = [
  # outputs: checked before anything is read
  ("quantize out is a file", lambda t: [*Q, "--out", t / "file"], ["--out", "is a file"]),
  ("quantize out under a file", lambda t: [*Q, "--out", t / "file" / "q"], ["is a file, not"]),
  ("quantize out not empty", lambda t: [*Q, "--out", t / "full"], ["full", "--overwrite"]),
  ("embed out is a folder", lambda t: [*EMBED, "--sentences", t / "s.txt", "--out", t / "full"],
   ["--out", "is a folder"]),
  ("embed out exists", lambda t: [*EMBED, "--sentences", t / "s.txt", "--out", t / "file"],
   ["--overwrite"]),
  ("eval json under a file", lambda t: ["eval", "--json", t / "file" / "r.json"],
   ["--json", "is a file, not"]),
  ("eval json exists", lambda t: ["eval", "--json", t / "results.json"], ["--overwrite"]),
  ("export out is a file", lambda t: [*DEC, "--out", t / "file"], ["--out", "is a file"]),
  ("bench out is a file", lambda t: ["bench", "--quick", "--out", t / "file"], ["not a folder"]),
  # options
  ("export bogus platform", lambda t: [*DEC, "--platforms", "bogus", "--out", t / "x"],
   ["--platforms bogus", "cpu"]),
  ("export empty platforms", lambda t: [*DEC, "--platforms", ",", "--out", t / "x"],
   ["--platforms"]),
  ("export bad config", lambda t: ["export", "--model", "decoder", "--config", "dim=30,heads=4",
   "--out", t / "x"], ["dim=30", "heads=4"]),
  ("export minilm checkpoint", lambda t: ["export", "--checkpoint", t / "s.txt", "--out", t / "x"],
   ["--model decoder"]),
  ("eval -n 0", lambda t: ["eval", "-n", "0", "--json", t / "r.json"], ["-n", "at least 1"]),
  ("eval window 1", lambda t: ["eval", "--model", "smollm2", "--window", "1"], ["--window"]),
  ("eval max windows 0", lambda t: ["eval", "--model", "smollm2", "--max-windows", "0"],
   ["--max-windows"]),
  ("eval window not an int", lambda t: ["eval", "--window", "abc"], ["--window", "abc"]),
  ("generate empty prompt", lambda t: ["generate", "--prompt", " "], ["--prompt"]),
  ("generate steps 0", lambda t: ["generate", "--prompt", "Hi", "--steps", "0"], ["--steps"]),
  ("generate temperature", lambda t: ["generate", "--prompt", "Hi", "--temperature", "-1"],
   ["--temperature"]),
  ("bench repeats 0", lambda t: ["bench", "--repeats", "0", "--out", t / "b"], ["--repeats"]),
  ("unknown option", lambda t: ["plan", "--recipes", "w8"], ["--recipes"]),
  # inputs
  ("malformed yaml", lambda t: ["plan", "--recipe", t / "bad.yaml"],
   ["bad.yaml", "not valid YAML", "line 2"]),
  ("missing yaml", lambda t: [*Q[:3], "--recipe", t / "none.yaml", "--out", t / "q"],
   ["none.yaml", "does not exist"]),
  ("yaml is a folder", lambda t: ["plan", "--recipe", t / "folder.yaml"], ["is a folder"]),
  ("sentences not utf-8", lambda t: [*EMBED, "--sentences", t / "latin1.txt", "--out", t / "e.npy"],
   ["--sentences", "latin1.txt", "UTF-8"]),
  ("sentences is a folder", lambda t: [*EMBED, "--sentences", t / "full", "--out", t / "e.npy"],
   ["--sentences", "is a folder"]),
  ("calibration not utf-8", lambda t: ["quantize", "--recipe", "w4g128-gptq", "--calibration",
   t / "latin1.txt", "--out", t / "q"], ["--calibration", "latin1.txt", "UTF-8"]),
  ("llm text not utf-8", lambda t: ["eval", "--model", "smollm2", "--text", t / "latin1.txt"],
   ["--text", "latin1.txt", "UTF-8"]),
  ("missing checkpoint", lambda t: ["generate", "--prompt", "Hi", "--checkpoint", t / "none"],
   ["--checkpoint", "no such folder"]),
  ("checkpoint without report", lambda t: ["generate", "--prompt", "Hi", "--checkpoint",
   t / "no-report"], ["no-report", "report.json"]),
  ("corrupt report", lambda t: [*EMBED[:3], "--checkpoint", t / "bad-report", "--sentences",
   t / "s.txt", "--out", t / "e.npy"], ["bad-report", "report.json"]),
]  # fmt: skip


@pytest.mark.parametrize("argv, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(files, capsys, no_work, argv, words):
  before = snapshot(files)
  assert_user_error(argv(files), capsys, *words)
  assert snapshot(files) == before


@pytest.mark.skipif(sys.platform != "linux" or not Path("/sys/kernel").is_dir(), reason="sysfs")
def test_an_out_where_nothing_can_be_created(capsys, no_work):
  """sysfs refuses new files to everyone, root included: the probe finds it before any work."""
  assert_user_error([*Q, "--out", "/sys/jaxquant-out"], capsys, "/sys", "cannot write")
  assert not Path("/sys/jaxquant-out").exists()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes anywhere")
def test_a_read_only_out_folder(files, capsys, no_work):
  locked = files / "locked"
  locked.mkdir()
  locked.chmod(0o555)
  try:
    assert_user_error([*Q, "--out", locked / "q"], capsys, "cannot write", "permissions")
    assert list(locked.iterdir()) == []
  finally:
    locked.chmod(0o755)


@pytest.mark.parametrize(
  "error",
  [
    PermissionError(13, "Permission denied", "/data/s.txt"),
    IsADirectoryError(21, "Is a directory", "/data/s.txt"),
  ],
)
def test_os_errors_are_one_line_naming_the_path(files, capsys, no_work, monkeypatch, error):
  def fail(*args, **kwargs):
    raise error

  monkeypatch.setattr(data, "read_utf8", fail)
  argv = [*EMBED, "--sentences", files / "s.txt", "--out", files / "e.npy"]
  line = assert_user_error(argv, capsys, "/data/s.txt", error.strerror)
  assert line.count(";") == 1  # and the fix
  assert not (files / "e.npy").exists()


# --------------------------------------------------------------------------- checkpoints
def zero_params(module, *inputs) -> dict:
  """`module`'s parameter tree in zeros, made without running it (a fit check reads shapes)."""
  tree = jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs))["params"]
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), tree)


def checkpoint(folder: Path, params: dict, model: str) -> Path:
  """`params` saved as `jaxquant quantize` would (model.safetensors, report.json)."""
  rules = jq.load_recipe("fp32").rules
  folder.mkdir()
  jq.save(folder / "model.safetensors", params)
  report = {"model": model, "recipe": "fp32", "rules": [r.to_dict() for r in rules]}
  (folder / "report.json").write_text(json.dumps(report))
  return folder


@pytest.fixture(scope="module")
def minilm_checkpoint(tmp_path_factory) -> Path:
  params = zero_params(minilm.MiniLM(), jnp.zeros((1, 8), jnp.int32))
  return checkpoint(tmp_path_factory.mktemp("ckpt") / "minilm", params, "minilm")


def tiny_llm_checkpoint(folder: Path) -> Path:
  """A 2-layer Llama-family checkpoint."""
  cfg = llama.LlamaConfig(vocab=64, dim=32, layers=2, heads=2, kv_heads=1, head_dim=16, mlp=64)
  return checkpoint(
    folder, zero_params(llama.Llama(cfg), jnp.zeros((1, 4), jnp.int32)), "tiny.gguf"
  )


def test_generate_refuses_a_minilm_checkpoint(minilm_checkpoint, tmp_path, capsys, no_work):
  argv = ["generate", "--model", "smollm2", "--checkpoint", minilm_checkpoint, "--prompt", "Hi"]
  line = assert_user_error(argv, capsys, "does not fit --model smollm2")
  assert "embed_tokens/embedding" in line  # the first path that differs
  assert "MiniLM/BERT encoder (6 layers, dim 384)" in line and "--model minilm" in line


def test_embed_refuses_an_llm_checkpoint(tmp_path, capsys, no_work):
  folder = tiny_llm_checkpoint(tmp_path / "llm")
  (tmp_path / "s.txt").write_text("One sentence.\n")
  argv = [*EMBED[:3], "--checkpoint", folder, "--sentences", tmp_path / "s.txt"]
  before = snapshot(tmp_path)
  line = assert_user_error([*argv, "--out", tmp_path / "e.npy"], capsys, "does not fit")
  assert "Llama-family LLM (2 layers, dim 32)" in line and "embed_tokens/embedding" in line
  assert snapshot(tmp_path) == before


def test_embed_refuses_a_checkpoint_reported_from_another_model(
  minilm_checkpoint, tmp_path, capsys, no_work
):
  other = tmp_path / "other"
  shutil.copytree(minilm_checkpoint, other)
  report = json.loads((other / "report.json").read_text())
  (other / "report.json").write_text(json.dumps({**report, "model": "other.safetensors"}))
  (tmp_path / "s.txt").write_text("One sentence.\n")
  argv = [*EMBED[:3], "--checkpoint", other, "--sentences", tmp_path / "s.txt"]
  assert_user_error([*argv, "--out", tmp_path / "e.npy"], capsys, "other.safetensors", "minilm")
  assert not (tmp_path / "e.npy").exists()


def test_export_refuses_decoder_params_of_another_size(tmp_path, capsys, no_work):
  small = Decoder(DecoderConfig(dim=32, layers=1, heads=2, mlp=64))
  params = zero_params(small, jnp.zeros((1, 8), jnp.int32))
  jq.save(tmp_path / "float.safetensors", {"params": params})
  argv = ["export", "--model", "decoder", "--config", "dim=64,layers=1,heads=2,mlp=64"]
  line = assert_user_error(
    [*argv, "--checkpoint", tmp_path / "float.safetensors", "--out", tmp_path / "x"], capsys
  )
  assert "embed/embedding is [256, 32], the model's is [256, 64]" in line
  assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- export
def test_a_failed_artifact_check_leaves_no_artifact(tmp_path):
  w = jnp.ones((4, 3), jnp.float32)
  exported = export.lower(lambda v, x: x @ v["w"], {"w": w}, [jnp.ones((2, 4), jnp.float32)])

  def check(folder: Path) -> None:
    assert export.load_exported(folder).platforms == export.PLATFORMS  # complete there
    raise ValueError("the reloaded artifact disagrees")

  with pytest.raises(ValueError, match="disagrees"):
    export.save_exported(tmp_path / "art", exported, {"w": w}, check=check)
  assert list(tmp_path.iterdir()) == []


def test_lower_refuses_unknown_platforms():
  with pytest.raises(ValueError, match="bogus"):
    export.lower(lambda v, x: x, {}, [jnp.ones(2)], ["cpu", "bogus"])


# --------------------------------------------------------------------------- --overwrite
def test_overwrite_replaces_the_outputs_and_keeps_other_files(tmp_path, capsys):
  model = tmp_path / "w.safetensors"
  save_file({"dense.kernel": np.ones((64, 32), np.float32)}, model)
  out = tmp_path / "q"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  argv = ["quantize", "--model", model, "--recipe", "int8", "--out", out]
  assert_user_error(argv, capsys, "--overwrite")
  assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
  assert run([*argv, "--overwrite"], capsys)[0] == 0
  names = ["keep.txt", "model.safetensors", "recipe.yaml", "report.json"]
  assert sorted(p.name for p in out.iterdir()) == names
  assert (out / "keep.txt").read_text() == "mine"


# --------------------------------------------------------------------------- tracebacks
@pytest.mark.parametrize("bug", [TypeError, AttributeError, KeyError])
def test_an_internal_error_keeps_its_traceback_and_exits_1(capsys, monkeypatch, bug):
  def broken(*args, **kwargs):
    raise bug("a bug inside the library")

  monkeypatch.setattr(cli, "load_recipe", broken)
  code, err = run(["plan", "--model", "minilm", "--recipe", "w8"], capsys)
  assert code == 1
  assert "Traceback (most recent call last)" in err and "a bug inside the library" in err
  assert "internal error" in err.splitlines()[-1]


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback_of_a_user_error(files, capsys, where):
  argv = ["plan", "--recipe", files / "bad.yaml"]
  argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
  code, err = run(argv, capsys)
  assert code == 2
  assert "Traceback (most recent call last)" in err
  last = err.splitlines()[-1]
  assert last.startswith("error: ") and "not valid YAML" in last
