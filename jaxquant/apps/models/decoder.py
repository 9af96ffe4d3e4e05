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

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxquant.apps.models.cache import (
  CACHE_KINDS,
  KV_SPEC,
  CacheKind,
  KVCache,
  RMSNorm,
  attention,
  cache_bytes,
  cache_write,
  cached_attention,
  init_cache,
  make_generate,
  make_prefill_decode,
  model_config,
  rotary,
  sample,
)

__all__ = [
  "CACHE_KINDS",
  "KV_SPEC",
  "CacheKind",
  "Decoder",
  "DecoderConfig",
  "KVCache",
  "RMSNorm",
  "cache_bytes",
  "cache_write",
  "cached_attention",
  "init_cache",
  "make_generate",
  "make_prefill_decode",
  "model_config",
  "next_byte_loss",
  "rotary",
  "sample",
]


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

  @property
  def kv_heads(self) -> int:
    return self.heads


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
    return out_proj(attention(q, k, v).reshape(b, t, c.dim))


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


def next_byte_loss(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """Mean cross-entropy (nats) of predicting ``tokens[:, 1:]`` from ``logits[:, :-1]``."""
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  target = tokens[:, 1:].astype(jnp.int32)
  return -jnp.mean(jnp.take_along_axis(logp, target[..., None], axis=-1))
