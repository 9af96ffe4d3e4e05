"""The Flax MiniLM port against sentence-transformers' own embeddings, and the text data sets.

``tests/data/minilm_reference.npz`` comes from `experiments/make_minilm_reference.py`.
"""

from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.apps import data
from jaxquant.apps.models import minilm

pytest.importorskip(minilm.PACKAGE, reason=minilm.INSTALL_HINT)

REFERENCE = Path(__file__).parent / "data" / "minilm_reference.npz"


@pytest.fixture(scope="module")
def params():
  return minilm.load_params()


@pytest.fixture(scope="module")
def reference():
  with np.load(REFERENCE) as f:
    return {k: f[k] for k in f.files}


def _init_shapes(model=None):
  ids = jnp.zeros((2, 16), jnp.int32)
  model = model or minilm.MiniLM()
  return jax.eval_shape(lambda: model.init(jax.random.key(0), ids, ids + 1, ids))


def test_config_is_the_packaged_one():
  assert minilm.load_config() == minilm.MiniLMConfig()


def test_init_tree_is_the_checkpoint_tree(params):
  shapes = _init_shapes()["params"]
  assert jax.tree.structure(shapes) == jax.tree.structure(params)
  same = jax.tree.map(lambda a, b: a.shape == b.shape and a.dtype == b.dtype, shapes, params)
  assert all(jax.tree.leaves(same))


def test_every_weight_matmul_is_a_dense_call(params):
  called = []

  def spy(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
      called.append(context.module.path)
    return next_fun(*args, **kwargs)

  ids = jnp.zeros((1, 16), jnp.int32)
  with nn.intercept_methods(spy):
    jax.eval_shape(lambda p: minilm.MiniLM().apply({"params": p}, ids, ids + 1, ids), params)
  assert len(called) == 6 * 6 and not any("pooler" in p for p in called)


def test_matches_sentence_transformers(params, reference):
  sentences = [str(s) for s in reference["sentences"]]
  assert sentences == data.evaluation_sentences(len(sentences))  # the data set is stable
  ours = minilm.embed(sentences, params)
  assert ours.shape == (64, 384) and ours.dtype == np.float32
  cos = np.sum(ours * reference["embeddings"], axis=1)
  print(f"cosine to sentence-transformers: min {cos.min():.8f}, mean {cos.mean():.8f}")
  assert cos.min() >= 0.9999, cos.min()
  np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_truncates_at_256_tokens_like_sentence_transformers(params, reference):
  text = str(reference["long_text"])
  batch = minilm.tokenize(minilm.load_tokenizer(), [text])
  assert batch["input_ids"].shape == (1, 256) and batch["input_ids"][0, -1] == 102  # [SEP]
  assert float(minilm.embed([text], params)[0] @ reference["long_embedding"]) >= 0.9999


def test_padding_and_batching_do_not_change_an_embedding(params):
  by_length = sorted(data.evaluation_sentences(64), key=len)
  short, longer = by_length[0], by_length[-7:]
  tok = minilm.load_tokenizer()
  width = lambda s: minilm.tokenize(tok, s)["input_ids"].shape[1]
  assert width([short]) < width([*longer, short])  # one batch of 8, padded to the longest
  alone = minilm.embed([short], params)[0]
  batched = minilm.embed([*longer, short], params)[-1]
  assert float(alone @ batched) > 0.99999


def test_tokenize_pads_to_buckets():
  batch = minilm.tokenize(minilm.load_tokenizer(), ["A short one.", "A slightly longer sentence."])
  assert set(batch) == {"input_ids", "attention_mask", "token_type_ids"}
  assert all(v.dtype == np.int32 and v.shape == (2, 16) for v in batch.values())
  assert batch["attention_mask"].sum(1).tolist() == [6, 7] and not batch["token_type_ids"].any()
  assert batch["input_ids"][0, :6].tolist()[::5] == [101, 102]
  assert [minilm.bucket_length(n) for n in (1, 16, 17, 250, 256)] == [16, 16, 32, 256, 256]


def test_encode_takes_any_apply_fn(params):
  sentences = data.evaluation_sentences(3)
  doubled = lambda v, *a: 2.0 * minilm.MiniLM().apply(v, *a)  # same direction
  ours = minilm.encode(doubled, {"params": params}, sentences)
  np.testing.assert_allclose(ours, minilm.embed(sentences, params), atol=1e-6)


def test_data_sets_are_disjoint_deterministic_and_sized():
  cal, ev = data.calibration_sentences(1024), data.evaluation_sentences(512)
  assert len(cal) == len(set(cal)) == 1024 and len(ev) == len(set(ev)) == 512
  assert not set(cal) & set(ev)
  assert not set(data.CALIBRATION_MODULES) & set(data.EVALUATION_MODULES)
  assert data.calibration_sentences(10) == cal[:10] and data.evaluation_sentences(7) == ev[:7]
  data._pools.cache_clear()
  assert data.calibration_sentences(1024) == cal and data.evaluation_sentences(512) == ev
  assert all(data.MIN_WORDS <= len(s.split()) <= data.MAX_WORDS for s in cal + ev)
  with pytest.raises(ValueError, match="sentences"):
    data.evaluation_sentences(10**6)


def test_write_and_read_sentences(tmp_path):
  sentences = data.calibration_sentences(5)
  assert data.read_sentences(data.write_sentences(tmp_path / "s.txt", sentences)) == sentences
