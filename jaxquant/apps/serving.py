"""Serve functions of the reference models (MiniLM, the byte-level decoder) for
`jaxquant.export`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant import io
from jaxquant.apps import data, evaluate
from jaxquant.apps.models import minilm
from jaxquant.apps.models.decoder import Decoder, DecoderConfig
from jaxquant.export import symbolic_inputs
from jaxquant.flax import quantize_model
from jaxquant.ptq import CalibrationSet
from jaxquant.recipes import apply_recipe, load_recipe


@dataclasses.dataclass
class ServeFunction:
  """What `export_serve` needs for one model: ``fn(variables, *inputs)``, the (quantized)
  variables, abstract `inputs` (symbolic dims), a concrete `example` and metadata."""

  fn: Callable
  variables: Any
  inputs: list[jax.ShapeDtypeStruct]
  example: tuple
  metadata: dict


def minilm_serve(recipe: str) -> ServeFunction:
  """all-MiniLM-L6-v2 quantized by `recipe`: ``(variables, input_ids, attention_mask,
  token_type_ids [b, s] int32) -> sentence embeddings [b, 384]`` (mean-pooled, unit norm)."""
  encoder = evaluate.minilm_encoder(recipe)
  batch = minilm.tokenize(
    minilm.load_tokenizer(),
    ["Quantized models serve anywhere.", "jax.export lowers for cpu, cuda and tpu."],
  )
  example = tuple(
    np.asarray(batch[k], np.int32) for k in ("input_ids", "attention_mask", "token_type_ids")
  )
  if encoder.apply_fn is None:  # the float model, as `minilm.encode` reads None
    fn = minilm._float_embedding_fn()
  else:
    fn = minilm.sentence_embedding_fn(encoder.apply_fn)
  return ServeFunction(
    fn,
    encoder.variables,
    symbolic_inputs("b, s", [np.int32] * 3, [f"s <= {minilm.MAX_SEQ_LENGTH}"]),
    example,
    {
      "model": "minilm",
      "recipe": encoder.name,
      "inputs": ["input_ids [b, s]", "attention_mask [b, s]", "token_type_ids [b, s]"],
      "constraints": [f"s <= {minilm.MAX_SEQ_LENGTH}"],
      "output": "sentence embeddings [b, 384], unit L2 norm",
    },
  )


def parse_decoder_config(text: str):
  """``"dim=512,layers=4,heads=8,mlp=2048"`` -> `DecoderConfig` (unnamed fields: defaults)."""
  fields = {f.name for f in dataclasses.fields(DecoderConfig)}
  values = {}
  for item in filter(None, (s.strip() for s in text.split(","))):
    name, _, value = item.partition("=")
    if name not in fields or not value.strip().isdigit():
      raise ValueError(
        f"decoder config {item!r}: expected NAME=INT with NAME one of {', '.join(sorted(fields))}."
      )
    values[name] = int(value)
  cfg = DecoderConfig(**values)
  zero = [f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) < 1]
  if zero:
    raise ValueError(f"decoder config: {', '.join(zero)} must be at least 1.")
  if cfg.dim % cfg.heads or cfg.head_dim % 2:
    raise ValueError(
      f"decoder config: dim={cfg.dim} must be heads={cfg.heads} times an even head size."
    )
  if cfg.vocab < 256:
    raise ValueError(f"decoder config: vocab={cfg.vocab}; the decoder reads bytes (256 values).")
  return cfg


def decoder_serve(
  recipe: str, config: str = "", checkpoint: str | None = None, seed: int = 0
) -> ServeFunction:
  """The byte-level decoder's forward quantized by `recipe`: ``(variables, tokens [b, t]
  int32) -> logits [b, t, 256]``. Float params from `checkpoint` (`jaxquant.save` of the
  ``params`` tree, or of ``{"params": ...}``), else random init from `seed`. Recipes that need
  data calibrate on standard-library source bytes."""
  cfg = parse_decoder_config(config)
  model = Decoder(cfg)
  if checkpoint:
    params = io.load(checkpoint)
    params = params.get("params", params)
  else:
    params = model.init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"]
  rec = load_recipe(recipe)
  rng = np.random.default_rng(seed)
  corpus = data.stdlib_source("train", 1 << 20)
  batches = [(jnp.asarray(data.byte_windows(corpus, 8, 128, rng)),) for _ in range(4)]
  result = apply_recipe(rec, params, CalibrationSet(model, batches))
  stats = None
  if evaluate.needs_calibration(result.rules):
    cal = quantize_model(model, result.rules, "calibrate")
    for b in batches:
      stats = cal.apply({"params": result.reference}, *b, stats=stats)[1]
  serve = quantize_model(model, result.rules, "serve", calibration=stats)
  example = (np.asarray(data.byte_windows(corpus, 2, 64, rng), np.int32),)
  return ServeFunction(
    jax.jit(serve.apply),
    {"params": result.qparams},
    symbolic_inputs("b, t", [np.int32]),
    example,
    {
      "model": "decoder",
      "recipe": rec.name,
      "config": dataclasses.asdict(cfg),
      "checkpoint": checkpoint,
      "seed": None if checkpoint else seed,
      "inputs": ["tokens [b, t] (bytes as int32)"],
      "output": "next-byte logits [b, t, 256]",
    },
  )
