"""A small byte-level decoder-only transformer, written as Flax users write one.

Pre-norm blocks (RMSNorm → causal self-attention with rotary positions → RMSNorm → GELU
MLP), every weight matmul an `nn.Dense`, bytes in and next-byte logits out:
``Decoder(cfg)(tokens [B, T] uint8/int32) -> logits [B, T, 256]``.

Cached decoding uses the same module, params and `nn.Dense` layers, with the KV cache an
explicit pytree (float, or INT8 codes with one scale per head and token):

    cache = init_cache(cfg, batch, length, "int8")
    logits, cache = Decoder(cfg).apply(variables, tokens, cache=cache, pos=0)   # prefill
    generate = make_generate(model, steps=64, cache="int8")   # Decoder or quantize_model(...)
    tokens = generate(variables, prompt, key)                 # [B, 64], one jitted loop
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Literal, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxquant.numerics import quantize_along

CacheKind = Literal["float32", "bfloat16", "int8"]


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  vocab: int = 256
  dim: int = 128
  layers: int = 4
  heads: int = 4
  mlp: int = 512
  max_len: int = 512

  @property
  def head_dim(self) -> int:
    return self.dim // self.heads


class RMSNorm(nn.Module):
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (normed * scale.astype(jnp.float32)).astype(x.dtype)


def rotary(x: jax.Array, positions: jax.Array) -> jax.Array:
  """Rotary position embedding of ``x [B, T, H, D]`` at ``positions [T]``."""
  d = x.shape[-1] // 2
  freq = 1.0 / (10000.0 ** (jnp.arange(d, dtype=jnp.float32) / d))
  angle = positions[:, None].astype(jnp.float32) * freq[None, :]  # [T, d]
  cos, sin = jnp.cos(angle)[None, :, None, :], jnp.sin(angle)[None, :, None, :]
  x1, x2 = x[..., :d].astype(jnp.float32), x[..., d:].astype(jnp.float32)
  return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).astype(x.dtype)


# --------------------------------------------------------------------------- KV cache
class KVCache(NamedTuple):
  """One layer's keys and values for positions ``[0, S)`` (a pytree).

  Float: ``k, v [B, H, S, D]`` in the cache dtype, scales None. INT8: ``k, v`` int8 codes
  ``[B, H, S, D]`` with float32 ``k_scale, v_scale [B, H, S, 1]``, symmetric absmax over the
  head dimension (``Δ = max|x| / 127``, one scale per batch row, head and position), so
  ``k ≈ k_codes · k_scale``. Heads lead positions so that the attention contractions read the
  cache in place (no per-step transpose of the whole cache).
  """

  k: jax.Array
  v: jax.Array
  k_scale: jax.Array | None = None
  v_scale: jax.Array | None = None

  @property
  def quantized(self) -> bool:
    return self.k_scale is not None


CACHE_KINDS = ("float32", "bfloat16", "int8")
KV_SPEC = "int8:token"  # symmetric absmax, narrow grid ±127; scale groups given explicitly


def init_cache(
  cfg: DecoderConfig, batch: int, length: int, kind: CacheKind = "float32"
) -> tuple[KVCache, ...]:
  """An empty cache for ``cfg.layers`` layers, `batch` rows and `length` positions."""
  if kind not in CACHE_KINDS:
    raise ValueError(f"cache kind must be one of {', '.join(CACHE_KINDS)}, got {kind!r}.")
  shape = (batch, cfg.heads, length, cfg.head_dim)
  if kind == "int8":
    codes, scale = jnp.zeros(shape, jnp.int8), jnp.ones(shape[:-1] + (1,), jnp.float32)
    layer = KVCache(codes, codes, scale, scale)
  else:
    zeros = jnp.zeros(shape, jnp.dtype(kind))
    layer = KVCache(zeros, zeros)
  return tuple(layer for _ in range(cfg.layers))


def cache_bytes(cache) -> int:
  """Bytes held by a cache pytree (codes and scales)."""
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(cache))


def cache_write(cache: KVCache, k: jax.Array, v: jax.Array, pos) -> KVCache:
  """`cache` with ``k, v [B, T, H, D]`` written at positions ``[pos, pos + T)``; INT8 caches
  quantize on write (per batch row, position and head)."""
  k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, H, T, D]
  at = lambda buf, new: lax.dynamic_update_slice_in_dim(buf, new, pos, axis=2)
  if not cache.quantized:
    return KVCache(at(cache.k, k.astype(cache.k.dtype)), at(cache.v, v.astype(cache.v.dtype)))
  kq, ks, _ = quantize_along(k, KV_SPEC, (3,))
  vq, vs, _ = quantize_along(v, KV_SPEC, (3,))
  return KVCache(at(cache.k, kq), at(cache.v, vq), at(cache.k_scale, ks), at(cache.v_scale, vs))


def cached_attention(q: jax.Array, cache: KVCache, pos) -> jax.Array:
  """Causal attention of queries ``q [B, T, H, D]`` at ``[pos, pos + T)`` over the cache.

  INT8 caches are not dequantized: the codes enter the contractions (cast to the query dtype)
  and the scales are folded in, the key scales into the scores and the value scales into the
  attention weights: ``Σ_d q·(k̂ s_k) = s_k Σ_d q·k̂``, ``Σ_s w (v̂ s_v) = Σ_s (w s_v) v̂``.
  Returns ``[B, T, H, D]``.
  """
  t, d, length = q.shape[1], q.shape[-1], cache.k.shape[2]
  scores = jnp.einsum("bqhd,bhkd->bhqk", q, cache.k.astype(q.dtype))
  if cache.k_scale is not None:  # INT8 cache
    scores = scores * _per_key(cache.k_scale).astype(scores.dtype)
  scores = scores / jnp.sqrt(d).astype(q.dtype)
  visible = jnp.arange(length)[None, :] <= pos + jnp.arange(t)[:, None]  # [T, S]
  scores = jnp.where(visible, scores, jnp.finfo(scores.dtype).min)
  weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
  if cache.v_scale is not None:  # INT8 cache
    weights = weights * _per_key(cache.v_scale)
  weights = weights.astype(q.dtype)
  return jnp.einsum("bhqk,bhkd->bqhd", weights, cache.v.astype(q.dtype))


def _per_key(scale: jax.Array) -> jax.Array:
  """``[B, H, S, 1]`` scales to ``[B, H, 1, S]``, to broadcast over scores ``[B, H, T, S]``."""
  return jnp.swapaxes(scale, 2, 3)


# --------------------------------------------------------------------------- the model
class Attention(nn.Module):
  cfg: DecoderConfig

  @nn.compact
  def __call__(self, x, cache: KVCache | None = None, pos=None):
    """``x [B, T, dim] -> [B, T, dim]``; with a cache, ``(out, cache)`` for the positions
    ``[pos, pos + T)`` (the cache holds every earlier position)."""
    c = self.cfg
    b, t, _ = x.shape
    split = lambda y: y.reshape(b, t, c.heads, c.head_dim)
    q = split(nn.Dense(c.dim, use_bias=False, name="query")(x))
    k = split(nn.Dense(c.dim, use_bias=False, name="key")(x))
    v = split(nn.Dense(c.dim, use_bias=False, name="value")(x))
    positions = jnp.arange(t) if cache is None else pos + jnp.arange(t)
    q, k = rotary(q, positions), rotary(k, positions)
    out_proj = nn.Dense(c.dim, use_bias=False, name="out")
    if cache is not None:
      cache = cache_write(cache, k, v, pos)
      return out_proj(cached_attention(q, cache, pos).reshape(b, t, c.dim)), cache
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(c.head_dim).astype(x.dtype)
    causal = jnp.tril(jnp.ones((t, t), bool))
    scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
    weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(x.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, c.dim)
    return out_proj(out)


class Block(nn.Module):
  cfg: DecoderConfig

  @nn.compact
  def __call__(self, x, cache: KVCache | None = None, pos=None):
    h = Attention(self.cfg, name="attn")(RMSNorm(name="norm1")(x), cache, pos)
    if cache is not None:
      h, cache = h
    x = x + h
    h = nn.Dense(self.cfg.mlp, use_bias=False, name="up")(RMSNorm(name="norm2")(x))
    x = x + nn.Dense(self.cfg.dim, use_bias=False, name="down")(jax.nn.gelu(h))
    return x if cache is None else (x, cache)


class Decoder(nn.Module):
  """Byte-level language model: tokens ``[B, T]`` → logits ``[B, T, vocab]``.

  With ``cache`` (from `init_cache`) and ``pos`` (int, may be traced): the tokens sit at
  positions ``[pos, pos + T)``, attend to the cache's earlier positions, and the call returns
  ``(logits, updated cache)``. Same params either way.
  """

  cfg: DecoderConfig = DecoderConfig()

  @nn.compact
  def __call__(self, tokens, cache: tuple[KVCache, ...] | None = None, pos=None):
    if cache is not None and pos is None:
      raise ValueError("Decoder: a cached call needs pos, the position of tokens[:, 0].")
    x = nn.Embed(self.cfg.vocab, self.cfg.dim, name="embed")(tokens.astype(jnp.int32))
    updated = []
    for i in range(self.cfg.layers):
      block = Block(self.cfg, name=f"layers_{i}")
      if cache is None:
        x = block(x)
      else:
        x, layer = block(x, cache[i], pos)
        updated.append(layer)
    x = RMSNorm(name="final_norm")(x)
    logits = nn.Dense(self.cfg.vocab, use_bias=False, name="head")(x)
    return logits if cache is None else (logits, tuple(updated))


# --------------------------------------------------------------------------- generation
def sample(logits: jax.Array, key: jax.Array | None, temperature: float = 0.0) -> jax.Array:
  """Next tokens ``[B]`` int32 from ``logits [B, vocab]``: argmax when ``temperature == 0``,
  else a draw from ``softmax(logits / temperature)``."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if key is None:
    raise ValueError("sampling with temperature > 0 needs a PRNG key.")
  return jax.random.categorical(key, logits.astype(jnp.float32) / temperature).astype(jnp.int32)


def model_config(model) -> DecoderConfig:
  """The `DecoderConfig` of a `Decoder` or of a quantized wrapper around one."""
  inner = getattr(model, "model", model)
  if not isinstance(inner, Decoder):
    raise TypeError(f"expected a Decoder or quantize_model(Decoder(...)), got {type(model)}.")
  return inner.cfg


def make_generate(
  model, steps: int, *, cache: CacheKind = "float32", temperature: float = 0.0
) -> Callable:
  """A jitted ``fn(variables, prompt [B, P], key=None) -> tokens [B, steps]`` int32.

  Prefills the prompt in one call, then decodes one token at a time in a `lax.scan`, with a
  KV cache of ``P + steps`` positions of the given kind. `model` is a `Decoder` or
  ``jaxquant.flax.quantize_model(Decoder(cfg), rules, "serve")`` (then `variables` holds the
  quantized params, and every `nn.Dense` runs quantized). Greedy when ``temperature == 0``.
  """
  cfg = model_config(model)
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}.")

  def run(variables, prompt, key):
    b, p = prompt.shape
    kv = init_cache(cfg, b, p + steps, cache)
    key = jax.random.key(0) if key is None else key
    logits, kv = model.apply(variables, prompt, cache=kv, pos=0)
    first = sample(logits[:, -1], jax.random.fold_in(key, 0), temperature)

    def step(carry, i):
      kv, token = carry
      logits, kv = model.apply(variables, token[:, None], cache=kv, pos=p + i)
      token = sample(logits[:, -1], jax.random.fold_in(key, i + 1), temperature)
      return (kv, token), token

    _, rest = lax.scan(step, (kv, first), jnp.arange(steps - 1))
    return jnp.concatenate([first[:, None], rest.T], axis=1)

  jitted = jax.jit(run)
  return lambda variables, prompt, key=None: jitted(variables, jnp.asarray(prompt, jnp.int32), key)


def next_byte_loss(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """Mean cross-entropy (nats) of predicting ``tokens[:, 1:]`` from ``logits[:, :-1]``."""
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  target = tokens[:, 1:].astype(jnp.int32)
  return -jnp.mean(jnp.take_along_axis(logp, target[..., None], axis=-1))
