"""A small byte-level decoder-only transformer, written as Flax users write one.

Pre-norm blocks (RMSNorm → causal self-attention with rotary positions → RMSNorm → GELU
MLP), every weight matmul an `nn.Dense`, bytes in and next-byte logits out:
``Decoder(cfg)(tokens [B, T] uint8/int32) -> logits [B, T, 256]``.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp


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
    return (normed * scale).astype(x.dtype)


def rotary(x: jax.Array, positions: jax.Array) -> jax.Array:
  """Rotary position embedding of ``x [B, T, H, D]`` at ``positions [T]``."""
  d = x.shape[-1] // 2
  freq = 1.0 / (10000.0 ** (jnp.arange(d, dtype=jnp.float32) / d))
  angle = positions[:, None].astype(jnp.float32) * freq[None, :]  # [T, d]
  cos, sin = jnp.cos(angle)[None, :, None, :], jnp.sin(angle)[None, :, None, :]
  x1, x2 = x[..., :d].astype(jnp.float32), x[..., d:].astype(jnp.float32)
  return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).astype(x.dtype)


class Attention(nn.Module):
  cfg: DecoderConfig

  @nn.compact
  def __call__(self, x):
    c = self.cfg
    b, t, _ = x.shape
    split = lambda y: y.reshape(b, t, c.heads, c.head_dim)  # noqa: E731
    q = split(nn.Dense(c.dim, use_bias=False, name="query")(x))
    k = split(nn.Dense(c.dim, use_bias=False, name="key")(x))
    v = split(nn.Dense(c.dim, use_bias=False, name="value")(x))
    pos = jnp.arange(t)
    q, k = rotary(q, pos), rotary(k, pos)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(c.head_dim).astype(x.dtype)
    causal = jnp.tril(jnp.ones((t, t), bool))
    scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
    weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(x.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, c.dim)
    return nn.Dense(c.dim, use_bias=False, name="out")(out)


class Block(nn.Module):
  cfg: DecoderConfig

  @nn.compact
  def __call__(self, x):
    x = x + Attention(self.cfg, name="attn")(RMSNorm(name="norm1")(x))
    h = nn.Dense(self.cfg.mlp, use_bias=False, name="up")(RMSNorm(name="norm2")(x))
    return x + nn.Dense(self.cfg.dim, use_bias=False, name="down")(jax.nn.gelu(h))


class Decoder(nn.Module):
  """Byte-level language model: tokens ``[B, T]`` → logits ``[B, T, vocab]``."""

  cfg: DecoderConfig = DecoderConfig()

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.cfg.vocab, self.cfg.dim, name="embed")(tokens.astype(jnp.int32))
    for i in range(self.cfg.layers):
      x = Block(self.cfg, name=f"layers_{i}")(x)
    x = RMSNorm(name="final_norm")(x)
    return nn.Dense(self.cfg.vocab, use_bias=False, name="head")(x)


def next_byte_loss(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """Mean cross-entropy (nats) of predicting ``tokens[:, 1:]`` from ``logits[:, :-1]``."""
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  target = tokens[:, 1:].astype(jnp.int32)
  return -jnp.mean(jnp.take_along_axis(logp, target[..., None], axis=-1))
