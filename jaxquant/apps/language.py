"""Causal LMs quantized by recipes, scored by perplexity, and generating text.

    lm = language_model("w4g64-gptq")                 # SmolLM2, calibrated if the recipe needs it
    perplexity(lm, token_windows(lm.encode(text), 512))  # {"nll", "ppl", "tokens", "seconds"}
    generate_text(lm, "The capital of France is", steps=16)

Perplexity follows the GPTQ paper: the text tokenized as one stream (no BOS), cut into
non-overlapping windows of N tokens (the remainder dropped), each window scored on its tokens
2…N (the NLL of token ``t + 1`` given tokens ``≤ t``), perplexity ``exp(mean NLL)``.
Calibration text is never the evaluation text: by default `data.calibration_text` and
`data.evaluation_text` come from disjoint standard-library modules.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tokenizers import Tokenizer

from jaxquant import io
from jaxquant.apps import data
from jaxquant.apps.evaluate import needs_calibration
from jaxquant.apps.models import llama
from jaxquant.apps.models.cache import CacheKind, init_cache, make_prefill_decode
from jaxquant.flax import quantize_model
from jaxquant.ops import cpu_kernels, serving_layout
from jaxquant.ptq import CalibrationSet
from jaxquant.recipes import Quantized, Recipe, apply_recipe, load_recipe
from jaxquant.rules import Rule
from jaxquant.transforms import dequantize_params, named_leaves, progress_bar

DEFAULT_WINDOW = 512
# PTQ calibration: 32 sequences of 256 tokens (8k tokens) of `data.calibration_text` (a 2-core
# CPU budget; the GPTQ paper uses 128 of 2048).
CALIBRATION_SEQUENCES, CALIBRATION_LENGTH, CALIBRATION_BATCH = 32, 256, 8


def token_stream(tokenizer: Tokenizer, text: str) -> np.ndarray:
  """``int32 [N]``: `text` tokenized as one stream, no BOS or other special tokens added."""
  return np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, np.int32)


def token_windows(ids: np.ndarray, window: int, max_windows: int | None = None) -> np.ndarray:
  """``int32 [K, window]``: consecutive non-overlapping windows, the remainder dropped."""
  if window < 2:
    raise ValueError(f"--window must be at least 2 tokens, got {window}.")
  k = len(ids) // window
  if k == 0:
    raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of {window}.")
  if max_windows:
    k = min(k, max_windows)
  return np.asarray(ids[: k * window], np.int32).reshape(k, window)


@dataclasses.dataclass
class LanguageModel:
  """A (possibly quantized) causal LM: the model to apply (float or `quantize_model` serve
  wrapper), its variables, the tokenizer and what its weights take."""

  name: str
  cfg: llama.LlamaConfig
  model: Any
  variables: Any
  tokenizer: Tokenizer
  weight_bytes: int
  linear_bytes: int
  rules: tuple[Rule, ...] = ()
  quantize_seconds: float = 0.0
  result: Quantized | None = None

  def encode(self, text: str) -> np.ndarray:
    return token_stream(self.tokenizer, text)


def weight_bytes(tree) -> tuple[int, int]:
  """``(all parameters, linear kernels)`` in bytes, as stored."""
  total = kernels = 0
  for path, leaf in named_leaves(tree):
    n = leaf.nbytes if hasattr(leaf, "nbytes") else np.asarray(leaf).nbytes
    total += n
    kernels += n if path.endswith("kernel") else 0
  return total, kernels


def calibration_batches(
  tokenizer: Tokenizer,
  text: str | None = None,
  sequences: int = CALIBRATION_SEQUENCES,
  length: int = CALIBRATION_LENGTH,
  batch: int = CALIBRATION_BATCH,
) -> list[tuple[jax.Array]]:
  """``[(tokens [batch, length],)]`` cut from `text` (default `data.calibration_text`)."""
  ids = token_stream(tokenizer, data.calibration_text() if text is None else text)
  windows = token_windows(ids, length, sequences)
  return [(jnp.asarray(windows[i : i + batch]),) for i in range(0, len(windows), batch)]


def calibration_set(
  cfg: llama.LlamaConfig, tokenizer: Tokenizer, text: str | None = None
) -> CalibrationSet:
  """What the data-driven PTQ steps run on: the model (its final hidden states compared, not
  the vocabulary-sized logits), token batches, and where smoothing scales fold."""
  return CalibrationSet(
    llama.Llama(cfg, logits=False),
    calibration_batches(tokenizer, text),
    smoothing_groups=llama.smoothing_groups(cfg),
  )


def static_stats(cfg, rules: Sequence[Rule], params: dict, batches: Sequence[tuple]) -> dict:
  """Activation ranges of every quantized layer over `batches` (calibrate mode, float)."""
  cal = quantize_model(llama.Llama(cfg, logits=False), rules, "calibrate")
  step = jax.jit(lambda v, s, t: cal.apply(v, t, stats=s)[1])
  stats = None
  for (tokens,) in batches:
    stats = step({"params": params}, stats, tokens)
  return stats or {}


def language_model(
  recipe: str | Recipe = "fp32",
  *,
  gguf: str | None = None,
  hf: str | None = None,
  qparams: dict | None = None,
  calibration_text: str | None = None,
  progress: bool = False,
) -> LanguageModel:
  """A causal LM (default: the packaged SmolLM2 GGUF; or a Hugging Face folder `hf`)
  quantized by `recipe`, calibrated on `calibration_text` when the recipe needs data.
  `qparams` (e.g. `jaxquant.load` of a checkpoint) skips quantizing."""
  recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
  cfg, params, tokenizer = load_source(gguf=gguf, hf=hf)
  rules, seconds, result = recipe.rules, 0.0, None
  batches = None
  if qparams is None:
    data_set = calibration_set(cfg, tokenizer, calibration_text) if recipe.needs_data else None
    start = time.perf_counter()
    result = apply_recipe(recipe, params, data_set, progress=progress)
    seconds = time.perf_counter() - start
    qparams, rules = result.qparams, result.rules
  stats = None
  if needs_calibration(rules):
    batches = calibration_batches(tokenizer, calibration_text, sequences=16)
    stats = static_stats(cfg, rules, dequantize_params(qparams), batches)
  model = llama.Llama(cfg) if not rules else quantize_model(llama.Llama(cfg), rules, "serve", stats)
  total, kernels = weight_bytes(qparams)
  if jax.default_backend() == "cpu" and not cpu_kernels.available():
    qparams = serving_layout(qparams)  # XLA:CPU's integer dot is fastest with [out, in] codes
  return LanguageModel(
    recipe.name, cfg, model, {"params": qparams}, tokenizer, total, kernels, tuple(rules),
    seconds, result,
  )  # fmt: skip


def load_source(
  *, gguf: str | None = None, hf: str | None = None
) -> tuple[llama.LlamaConfig, dict, Tokenizer]:
  """``(cfg, float params, tokenizer)`` of a GGUF file (default: the packaged SmolLM2) or of a
  Hugging Face folder `hf`."""
  if hf:
    cfg, params = llama.load_hf(hf)
    return cfg, params, hf_tokenizer(hf)
  cfg, params = llama.load_gguf(gguf)
  return cfg, params, llama.gguf_tokenizer(gguf)


def hf_tokenizer(folder: str) -> Tokenizer:
  """``tokenizer.json`` of a Hugging Face model folder."""
  path = Path(folder) / "tokenizer.json"
  if not path.is_file():
    raise FileNotFoundError(f"{folder} has no tokenizer.json.")
  return Tokenizer.from_file(str(path))


def load_checkpoint(folder: str | Path, gguf: str | None = None) -> LanguageModel:
  """A checkpoint written by ``jaxquant quantize --model smollm2`` (model.safetensors, report)."""
  folder = Path(folder)
  report_file = folder / "report.json"
  if not report_file.is_file():
    raise FileNotFoundError(f"{folder} has no report.json; make it with `jaxquant quantize`.")
  report = json.loads(report_file.read_text())
  rules = tuple(Rule(**r) for r in report["rules"])
  recipe = Recipe(report["recipe"], rules, f"checkpoint {folder}")
  return language_model(recipe, gguf=gguf, qparams=io.load(folder))


# --------------------------------------------------------------------------- perplexity
def perplexity(
  lm: LanguageModel,
  windows: np.ndarray,
  *,
  batch: int = 2,
  cache: CacheKind | None = None,
  progress: bool | Callable = False,
) -> dict[str, float]:
  """``{"nll", "ppl", "tokens", "windows", "seconds"}`` of `windows` ``[K, N]``, each scored on
  its tokens 2…N. With `cache` (``"int8"``, ...) every window runs through a KV cache of that
  kind (prefill), so the attention reads the cached (quantized) keys and values."""
  k, n = windows.shape
  cfg = lm.cfg

  def window_nll(variables, tokens):
    if cache is None:
      logits = lm.model.apply(variables, tokens)
    else:
      kv = init_cache(cfg, tokens.shape[0], n, cache)
      logits, _ = lm.model.apply(variables, tokens, cache=kv, pos=0)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return -jnp.sum(picked)

  step = jax.jit(window_nll)
  total, start = 0.0, time.perf_counter()
  starts = list(range(0, k, batch))
  for i in progress_bar(starts, f"perplexity {lm.name}", progress):
    total += float(step(lm.variables, jnp.asarray(windows[i : i + batch])))
  scored = k * (n - 1)
  nll = total / scored
  return {
    "nll": nll,
    "ppl": float(np.exp(nll)),
    "tokens": scored,
    "windows": k,
    "seconds": time.perf_counter() - start,
  }


# --------------------------------------------------------------------------- generation
def generate_text(
  lm: LanguageModel,
  prompt: str,
  steps: int = 32,
  *,
  cache: CacheKind = "float32",
  temperature: float = 0.0,
  seed: int = 0,
  repeats: int = 1,
) -> dict[str, Any]:
  """Greedy (or sampled) continuation of `prompt`, batch 1: ``{"text", "tokens", "prefill_tps",
  "decode_tps", ...}``; prefill and decode are timed apart, the median of `repeats` runs after
  a compiling one."""
  ids = token_stream(lm.tokenizer, prompt)
  if len(ids) == 0:
    raise ValueError("--prompt is empty after tokenization.")
  prefill, decode = make_prefill_decode(lm.model, steps, cache=cache, temperature=temperature)
  prompt_ids = jnp.asarray(ids[None, :])
  key = jax.random.key(seed)
  times = []
  tokens = None
  for _ in range(repeats + 1):  # the first compiles
    t0 = time.perf_counter()
    kv, first = jax.block_until_ready(prefill(lm.variables, prompt_ids, key))
    t1 = time.perf_counter()
    tokens = jax.block_until_ready(decode(lm.variables, kv, first, len(ids), key))
    t2 = time.perf_counter()
    times.append((t1 - t0, t2 - t1))
  prefill_s = float(np.median([t[0] for t in times[1:]]))
  decode_s = float(np.median([t[1] for t in times[1:]]))
  out = np.asarray(tokens)[0].tolist()
  return {
    "prompt": prompt,
    "text": lm.tokenizer.decode(out),
    "tokens": out,
    "prompt_tokens": len(ids),
    "prefill_tps": len(ids) / prefill_s,
    "decode_tps": max(steps - 1, 1) / decode_s if steps > 1 else float("nan"),
    "prefill_seconds": prefill_s,
    "decode_seconds": decode_s,
  }
