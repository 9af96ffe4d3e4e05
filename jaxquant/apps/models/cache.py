"""What every causal decoder here shares: RMSNorm, rotary positions, grouped-query attention,
the KV cache (float, or INT8 codes with one scale per head and token) and jitted generation.

A model config only needs ``layers``, ``kv_heads`` and ``head_dim`` for the cache, and a model
``model.apply(variables, tokens, cache=..., pos=...) -> (logits, cache)`` for generation:

    cache = init_cache(cfg, batch, length, "int8")
    generate = make_generate(model, steps=64, cache="int8")   # a model or quantize_model(...)
    tokens = generate(variables, prompt, key)                 # [B, 64], one jitted loop
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, NamedTuple, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxquant.numerics import quantize_along

CacheKind = Literal["float32", "bfloat16", "int8"]
CACHE_KINDS = ("float32", "bfloat16", "int8")
KV_SPEC = "int8:token"  # symmetric absmax, narrow grid ±127; scale groups given explicitly


class CacheConfig(Protocol):
  @property
  def layers(self) -> int: ...
  @property
  def kv_heads(self) -> int: ...
  @property
  def head_dim(self) -> int: ...


class RMSNorm(nn.Module):
  """``x / sqrt(mean(x²) + eps) · scale``, computed in float32."""

  eps: float = 1e-6

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (normed * scale.astype(jnp.float32)).astype(x.dtype)


def rotary(x: jax.Array, positions: jax.Array, theta: float = 10000.0) -> jax.Array:
  """Rotary position embedding of ``x [B, T, H, D]`` at ``positions [T]``, halves rotated
  together (Hugging Face's ``rotate_half`` order): channel ``i`` pairs with ``i + D/2`` at
  frequency ``theta^(−2i/D)``."""
  d = x.shape[-1] // 2
  freq = 1.0 / (theta ** (jnp.arange(d, dtype=jnp.float32) / d))
  angle = positions[:, None].astype(jnp.float32) * freq[None, :]  # [T, d]
  cos, sin = jnp.cos(angle)[None, :, None, :], jnp.sin(angle)[None, :, None, :]
  x1, x2 = x[..., :d].astype(jnp.float32), x[..., d:].astype(jnp.float32)
  return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).astype(x.dtype)


def rotary_interleaved(x: jax.Array, positions: jax.Array, theta: float = 10000.0) -> jax.Array:
  """Rotary embedding with adjacent channels ``(2i, 2i + 1)`` as pairs (llama.cpp's order,
  the one GGUF's permuted Q/K rows are written for)."""
  pairs = x.reshape(x.shape[:-1] + (x.shape[-1] // 2, 2))
  halves = jnp.concatenate([pairs[..., 0], pairs[..., 1]], axis=-1)
  out = rotary(halves, positions, theta)
  d = x.shape[-1] // 2
  return jnp.stack([out[..., :d], out[..., d:]], axis=-1).reshape(x.shape)


# --------------------------------------------------------------------------- KV cache
class KVCache(NamedTuple):
  """One layer's keys and values for positions ``[0, S)`` (a pytree).

  Float: ``k, v [B, Hkv, S, D]`` in the cache dtype, scales None. INT8: ``k, v`` int8 codes
  ``[B, Hkv, S, D]`` with float32 ``k_scale, v_scale [B, Hkv, S, 1]``, symmetric absmax over
  the head dimension (``Δ = max|x| / 127``, one scale per batch row, head and position), so
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


def init_cache(
  cfg: CacheConfig, batch: int, length: int, kind: CacheKind = "float32"
) -> tuple[KVCache, ...]:
  """An empty cache for ``cfg.layers`` layers, `batch` rows and `length` positions."""
  if kind not in CACHE_KINDS:
    raise ValueError(f"cache kind must be one of {', '.join(CACHE_KINDS)}, got {kind!r}.")
  shape = (batch, cfg.kv_heads, length, cfg.head_dim)
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
  """`cache` with ``k, v [B, T, Hkv, D]`` written at positions ``[pos, pos + T)``; INT8 caches
  quantize on write (per batch row, position and head)."""
  k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, Hkv, T, D]
  at = lambda buf, new: lax.dynamic_update_slice_in_dim(buf, new, pos, axis=2)
  if not cache.quantized:
    return KVCache(at(cache.k, k.astype(cache.k.dtype)), at(cache.v, v.astype(cache.v.dtype)))
  kq, ks, _ = quantize_along(k, KV_SPEC, (3,))
  vq, vs, _ = quantize_along(v, KV_SPEC, (3,))
  return KVCache(at(cache.k, kq), at(cache.v, vq), at(cache.k_scale, ks), at(cache.v_scale, vs))


def _grouped(q: jax.Array, kv_heads: int) -> jax.Array:
  """``q [B, T, H, D]`` as ``[B, T, Hkv, H / Hkv, D]``: query head ``h`` reads kv head
  ``h // (H / Hkv)``."""
  b, t, h, d = q.shape
  if h % kv_heads:
    raise ValueError(f"{h} query heads do not split into {kv_heads} key/value heads.")
  return q.reshape(b, t, kv_heads, h // kv_heads, d)


def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Causal grouped-query attention: ``q [B, T, H, D]``, ``k, v [B, T, Hkv, D]`` →
  ``[B, T, H, D]``; softmax in float32."""
  b, t, h, d = q.shape
  qg = _grouped(q, k.shape[2])
  scores = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k) / jnp.sqrt(d).astype(q.dtype)
  causal = jnp.tril(jnp.ones((t, t), bool))
  scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
  weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(q.dtype)
  return jnp.einsum("bhgqk,bkhd->bqhgd", weights, v).reshape(b, t, h, d)


def cached_attention(q: jax.Array, cache: KVCache, pos) -> jax.Array:
  """Causal attention of queries ``q [B, T, H, D]`` at ``[pos, pos + T)`` over the cache.

  INT8 caches are not dequantized: the codes enter the contractions (cast to the query dtype)
  and the scales are folded in, the key scales into the scores and the value scales into the
  attention weights: ``Σ_d q·(k̂ s_k) = s_k Σ_d q·k̂``, ``Σ_s w (v̂ s_v) = Σ_s (w s_v) v̂``.
  Returns ``[B, T, H, D]``.
  """
  b, t, h, d = q.shape
  length = cache.k.shape[2]
  qg = _grouped(q, cache.k.shape[1])
  scores = jnp.einsum("bqhgd,bhkd->bhgqk", qg, cache.k.astype(q.dtype))
  if cache.k_scale is not None:  # INT8 cache
    scores = scores * _per_key(cache.k_scale).astype(scores.dtype)
  scores = scores / jnp.sqrt(d).astype(q.dtype)
  visible = jnp.arange(length)[None, :] <= pos + jnp.arange(t)[:, None]  # [T, S]
  scores = jnp.where(visible, scores, jnp.finfo(scores.dtype).min)
  weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
  if cache.v_scale is not None:  # INT8 cache
    weights = weights * _per_key(cache.v_scale)
  weights = weights.astype(q.dtype)
  out = jnp.einsum("bhgqk,bhkd->bqhgd", weights, cache.v.astype(q.dtype))
  return out.reshape(b, t, h, d)


def _per_key(scale: jax.Array) -> jax.Array:
  """``[B, Hkv, S, 1]`` scales to ``[B, Hkv, 1, 1, S]``, to broadcast over grouped scores
  ``[B, Hkv, G, T, S]``."""
  return jnp.swapaxes(scale, 2, 3)[:, :, None]


# --------------------------------------------------------------------------- generation
def sample(logits: jax.Array, key: jax.Array | None, temperature: float = 0.0) -> jax.Array:
  """Next tokens ``[B]`` int32 from ``logits [B, vocab]``: argmax when ``temperature == 0``,
  else a draw from ``softmax(logits / temperature)``."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if key is None:
    raise ValueError("sampling with temperature > 0 needs a PRNG key.")
  return jax.random.categorical(key, logits.astype(jnp.float32) / temperature).astype(jnp.int32)


def model_config(model):
  """The config (``.cfg``) of a model or of a quantized wrapper around one."""
  inner = getattr(model, "model", model)
  cfg = getattr(inner, "cfg", None)
  if cfg is None or not all(hasattr(cfg, a) for a in ("layers", "kv_heads", "head_dim")):
    raise TypeError(f"expected a causal LM with a .cfg (layers, kv_heads, head_dim), got {model}.")
  return cfg


def make_prefill_decode(
  model, steps: int, *, cache: CacheKind = "float32", temperature: float = 0.0
) -> tuple[Callable, Callable]:
  """Two jitted halves of `make_generate`, to time them apart:

  ``prefill(variables, prompt [B, P], key) -> (kv, first [B])`` fills a cache of ``P + steps``
  positions and picks the first token; ``decode(variables, kv, first, P, key) -> [B, steps]``
  runs the remaining ``steps - 1`` one-token steps in a `lax.scan`.
  """
  cfg = model_config(model)
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}.")

  def prefill(variables, prompt, key):
    b, p = prompt.shape
    kv = init_cache(cfg, b, p + steps, cache)
    logits, kv = model.apply(variables, prompt, cache=kv, pos=0)
    return kv, sample(logits[:, -1], jax.random.fold_in(key, 0), temperature)

  def decode(variables, kv, first, p, key):
    def step(carry, i):
      kv, token = carry
      logits, kv = model.apply(variables, token[:, None], cache=kv, pos=p + i)
      token = sample(logits[:, -1], jax.random.fold_in(key, i + 1), temperature)
      return (kv, token), token

    _, rest = lax.scan(step, (kv, first), jnp.arange(steps - 1))
    return jnp.concatenate([first[:, None], rest.T], axis=1)

  return jax.jit(prefill), jax.jit(decode)


def make_generate(
  model, steps: int, *, cache: CacheKind = "float32", temperature: float = 0.0
) -> Callable:
  """A jitted ``fn(variables, prompt [B, P], key=None) -> tokens [B, steps]`` int32.

  Prefills the prompt in one call, then decodes one token at a time in a `lax.scan`, with a
  KV cache of ``P + steps`` positions of the given kind. `model` is a causal LM or
  ``jaxquant.flax.quantize_model(model, rules, "serve")`` (then `variables` holds the
  quantized params, and every `nn.Dense` runs quantized). Greedy when ``temperature == 0``.
  """
  prefill, decode = make_prefill_decode(model, steps, cache=cache, temperature=temperature)

  def run(variables, prompt, key=None):
    prompt = jnp.asarray(prompt, jnp.int32)
    key = jax.random.key(0) if key is None else key
    kv, first = prefill(variables, prompt, key)
    return decode(variables, kv, first, prompt.shape[1], key)

  return run
