"""Per-input-channel smoothing: SmoothQuant and AWQ.

Both rescale a layer's input channels, ``y = x W = (x / s) (diag(s) W)``, so that what gets
quantized is easier to quantize:

* SmoothQuant (Xiao et al., 2023) moves activation outliers into the weights for W8A8,
  ``s_j = max|x_j|^α / max|W_j|^(1−α)``;
* AWQ (Lin et al., 2024) protects the weights that meet large activations for 4-bit weights,
  ``s_j = mean|x_j|^α`` normalised, with α searched on calibration inputs to minimise
  ``Σ_layers ‖x W − (x/s) Q(diag(s) W)‖²``, followed by a clip search per group and channel.

The ``1/s`` is folded into the op that produces ``x`` when there is one — a norm's scale and
bias, or the output columns of a linear layer feeding it linearly — so the float model is
unchanged and serving costs nothing extra; otherwise the layer keeps an explicit
``input_scale`` parameter that the Flax adapters divide its input by.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant import calibration
from jaxquant.flax.common import INPUT_SCALE
from jaxquant.numerics import dequantize, grouped_view, quantize, scale_from_range
from jaxquant.qarray import QArray
from jaxquant.spec import QuantSpec
from jaxquant.transforms import map_leaves, named_leaves

AWQ_ALPHAS = tuple(i / 20 for i in range(20))
AWQ_CLIPS = tuple(1.0 - 0.05 * i for i in range(10))


@dataclasses.dataclass(frozen=True)
class SmoothGroup:
  """Layers (kernel paths) that share one input, and where their ``1/s`` can be folded.

  `fold` is ``("norm", path)`` — a norm module with ``scale`` (and ``bias``, if any) — or
  ``("dense_out", path)`` — a linear module whose output feeds the input linearly — or None
  (each layer then keeps an explicit ``input_scale``).
  """

  layers: tuple[str, ...]
  fold: tuple[str, str] | None = None


def scaled_inputs(stats: dict, s: np.ndarray) -> dict:
  """Statistics of a layer's inputs ``x`` (`jaxquant.ptq.steps.capture_stats`) as they are
  for ``x / s``: rows and means divided by `s`, ``XᵀX`` by ``s sᵀ``."""
  out = dict(stats)
  for key in ("x", "abs_mean", "abs_max", "abs_sum"):
    if key in out:
      out[key] = out[key] / s
  if "h" in out:
    out["h"] = np.asarray(out["h"]) / np.outer(s, s)
  return out


def default_groups(paths: Sequence[str]) -> list[SmoothGroup]:
  """One group per layer, explicit input scales (no knowledge of the model's structure)."""
  return [SmoothGroup((p,)) for p in paths]


def _module(path: str) -> str:
  return path.rsplit("/", 1)[0]


def apply_smoothing(params: dict, groups: Sequence[SmoothGroup], scales: dict[int, np.ndarray]):
  """Params with ``W ← diag(s) W`` per group and ``1/s`` folded (or kept as ``input_scale``)."""
  updates: dict[str, np.ndarray] = {}
  leaves = dict(named_leaves(params))
  extra: dict[str, dict[str, np.ndarray]] = {}
  for i, group in enumerate(groups):
    if i not in scales:
      continue
    s = np.asarray(scales[i], np.float32)
    for path in group.layers:
      updates[path] = np.asarray(leaves[path]) * s[:, None]
    if group.fold is None:
      for path in group.layers:
        extra.setdefault(_module(path), {})[INPUT_SCALE] = s
    elif group.fold[0] == "norm":
      for leaf in ("scale", "bias"):  # RMSNorm has no bias
        if f"{group.fold[1]}/{leaf}" in leaves:
          updates[f"{group.fold[1]}/{leaf}"] = np.asarray(leaves[f"{group.fold[1]}/{leaf}"]) / s
    elif group.fold[0] == "dense_out":
      kernel, bias = f"{group.fold[1]}/kernel", f"{group.fold[1]}/bias"
      updates[kernel] = np.asarray(updates.get(kernel, leaves[kernel])) / s[None, :]
      if bias in leaves:
        updates[bias] = np.asarray(leaves[bias]) / s
    else:
      raise ValueError(f"Unknown fold kind {group.fold[0]!r}; use 'norm' or 'dense_out'.")
  out = map_leaves(lambda path, v: jnp.asarray(updates[path]) if path in updates else v, params)
  return _add_leaves(out, extra)


def _add_leaves(params: dict, extra: dict[str, dict[str, np.ndarray]]) -> dict:
  out = dict(params)
  for module, leaves in extra.items():
    node = out
    parts = module.split("/")
    for part in parts[:-1]:
      node[part] = dict(node[part])
      node = node[part]
    node[parts[-1]] = {**node[parts[-1]], **{k: jnp.asarray(v) for k, v in leaves.items()}}
  return out


# --------------------------------------------------------------------------- SmoothQuant
def smoothquant_scales(act_max: np.ndarray, weights: Sequence[np.ndarray], alpha: float = 0.5):
  """``s_j = max|x_j|^α / max_l max_o |W_l[j, o]|^(1−α)``, clamped away from 0."""
  w_max = np.max([np.max(np.abs(w), axis=1) for w in weights], axis=0)
  s = np.power(np.maximum(act_max, 1e-5), alpha) / np.power(np.maximum(w_max, 1e-5), 1 - alpha)
  return np.clip(s, 1e-5, 1e5).astype(np.float32)


# --------------------------------------------------------------------------- AWQ
def _rtn(w: jnp.ndarray, spec: QuantSpec) -> jnp.ndarray:
  return dequantize(quantize(w, spec, pack=False))  # no nibble packing just to unpack


@functools.partial(jax.jit, static_argnums=4)
def _scaled_error(x, refs, weights, s, spec: QuantSpec) -> jax.Array:
  """``Σ_layers ‖x W − (x / s) Q(diag(s) W)‖²`` for rows ``x [n, in]`` and scales ``s [in]``."""
  xs = x / s
  errors = [jnp.sum((r - xs @ _rtn(w * s[:, None], spec)) ** 2) for r, w in zip(refs, weights)]
  return functools.reduce(jnp.add, errors)


def awq_candidates(x_mean: np.ndarray, w_mean: np.ndarray | None, grid: int = 20):
  """AWQ's scale grid: ``s = x̄^α`` (and, with `w_mean`, the "duo" ``x̄^α / w̄^(1−α)``) for
  ``α = 0, 1/grid, ..., (grid−1)/grid``, each normalised to ``max(s)·min(s) = 1``.
  Yields ``(α, duo, s [in])``; the first is ``s = 1`` (plain round to nearest)."""
  base = np.maximum(x_mean, 1e-4)
  for duo in (False, True) if w_mean is not None else (False,):
    for alpha in (i / grid for i in range(grid)):
      s = np.power(base, alpha)
      if duo and w_mean is not None:  # the weights' own magnitude in the balance
        s = s / (np.power(w_mean, 1 - alpha) + 1e-4)
      s = np.maximum(s, 1e-4)
      yield alpha, duo, (s / np.sqrt(s.max() * s.min())).astype(np.float32)


def awq_search(
  x: np.ndarray,
  x_mean: np.ndarray,
  weights: Sequence[np.ndarray],
  spec: QuantSpec,
  duo: bool = True,
  grid: int = 20,
) -> tuple[np.ndarray, float, float]:
  """Best AWQ scale for the layers sharing input rows ``x [n, in]`` (mean ``|x|`` per channel
  `x_mean`): the grid point minimising their summed output error (see `awq_candidates`).
  Returns ``(s, α, loss ratio vs s = 1)``."""
  xj = jnp.asarray(x, jnp.float32)
  ws = tuple(jnp.asarray(w, jnp.float32) for w in weights)
  refs = tuple(xj @ w for w in ws)
  w_mean = np.mean([_normalised_weight_mean(w, spec) for w in weights], axis=0) if duo else None
  results = [
    (float(_scaled_error(xj, refs, ws, jnp.asarray(s), spec)), alpha, s)
    for alpha, _, s in awq_candidates(x_mean, w_mean, grid)
  ]
  first = results[0][0]
  loss, alpha, s = min(results, key=lambda r: r[0])  # the first of equal losses, as before
  return s, alpha, loss / max(first, 1e-30)


def _normalised_weight_mean(w: np.ndarray, spec: QuantSpec) -> np.ndarray:
  """Mean over outputs of ``|W|`` relative to its scale group's max, per input channel."""
  view, axes = grouped_view(jnp.abs(jnp.asarray(w, jnp.float32)), spec)
  rel = view / jnp.maximum(jnp.max(view, axis=axes, keepdims=True), 1e-8)
  return np.asarray(jnp.mean(rel.reshape(w.shape), axis=1))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _best_clip(x: jax.Array, w: jax.Array, spec: QuantSpec, ratios: tuple[float, ...]):
  """Per group and output channel, the ``(scale, zero)`` among the range shrinks `ratios`
  minimising ``Σ_n (x[n, g] · ΔW[g, o])²``."""
  view, axes = grouped_view(w, spec)
  lo, hi = (calibration.absmax_range if spec.symmetric else calibration.minmax_range)(view, axes)
  groups = view.shape[0] if spec.granularity == "group" else 1
  xg = x.reshape(x.shape[0], groups, -1)

  def trial(r: float):
    scale, zero = scale_from_range(r * lo, r * hi, spec)
    q = quantize(w, spec, scale=scale, zero_point=zero, pack=False)
    dw = (w - dequantize(q)).reshape(groups, -1, w.shape[1])
    err = jnp.sum(jnp.einsum("ngk,gko->ngo", xg, dw) ** 2, axis=0).reshape(scale.shape)
    return err, scale, zero

  best_err, best_scale, best_zero = trial(ratios[0])
  for r in ratios[1:]:
    err, scale, zero = trial(r)
    better = err < best_err
    best_err = jnp.where(better, err, best_err)
    best_scale = jnp.where(better, scale, best_scale)
    best_zero = None if zero is None or best_zero is None else jnp.where(better, zero, best_zero)
  return best_scale, best_zero


def awq_clip(x: np.ndarray, w: np.ndarray, spec: QuantSpec) -> QArray:
  """RTN of ``w [in, out]`` with the clip (range shrink per group and output channel) that
  minimises each group's output error ``Σ_n (x[n, g] · ΔW[g, o])²`` on the rows `x`."""
  wj = jnp.asarray(w, jnp.float32)
  scale, zero = _best_clip(jnp.asarray(x, jnp.float32), wj, spec, AWQ_CLIPS)
  return quantize(wj, spec, scale=scale, zero_point=zero)


def even_rows(x: np.ndarray, n: int | None) -> np.ndarray:
  """At most `n` rows of ``x [N, d]``, evenly spaced (all of them when `n` is None)."""
  if n is None or x.shape[0] <= n:
    return x
  return x[np.linspace(0, x.shape[0] - 1, n).round().astype(int)]
