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
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from jaxquant.numerics import dequantize, grouped_view, quantize, scale_from_range
from jaxquant.qarray import QArray
from jaxquant.spec import QuantSpec
from jaxquant.transforms import map_leaves, named_leaves

INPUT_SCALE = "input_scale"
AWQ_ALPHAS = tuple(i / 20 for i in range(20))
AWQ_CLIPS = tuple(1.0 - 0.05 * i for i in range(10))


@dataclasses.dataclass(frozen=True)
class SmoothGroup:
  """Layers (kernel paths) that share one input, and where their ``1/s`` can be folded.

  `fold` is ``("norm", path)`` — a norm module with ``scale`` and ``bias`` — or
  ``("dense_out", path)`` — a linear module whose output feeds the input linearly — or None
  (each layer then keeps an explicit ``input_scale``).
  """

  layers: tuple[str, ...]
  fold: tuple[str, str] | None = None


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
      for leaf in ("scale", "bias"):
        updates[f"{group.fold[1]}/{leaf}"] = np.asarray(leaves[f"{group.fold[1]}/{leaf}"]) / s
    elif group.fold[0] == "dense_out":
      kernel, bias = f"{group.fold[1]}/kernel", f"{group.fold[1]}/bias"
      updates[kernel] = np.asarray(updates.get(kernel, leaves[kernel])) / s[None, :]
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
  return dequantize(quantize(w, spec))


def awq_search(
    x: np.ndarray, x_mean: np.ndarray, weights: Sequence[np.ndarray], spec: QuantSpec
) -> tuple[np.ndarray, float, float]:
  """Best AWQ scale for layers sharing input rows `x [n, in]`: ``(s, α, loss ratio vs α=0)``."""
  x = jnp.asarray(x, jnp.float32)
  refs = [x @ jnp.asarray(w) for w in weights]
  base = np.maximum(x_mean, 1e-4)
  w_mean = np.mean([_normalised_weight_mean(w, spec) for w in weights], axis=0)
  losses = []
  for alpha, duo in [(a, d) for d in (False, True) for a in AWQ_ALPHAS]:
    s = np.power(base, alpha)
    if duo:  # weights' own magnitude in the balance ("duo scaling")
      s = s / (np.power(w_mean, 1 - alpha) + 1e-4)
    s = np.maximum(s, 1e-4)
    s = s / np.sqrt(s.max() * s.min())
    xs = x / jnp.asarray(s)
    loss = sum(float(jnp.sum((r - xs @ _rtn(jnp.asarray(w * s[:, None]), spec)) ** 2))
               for r, w in zip(refs, weights))  # fmt: skip
    losses.append((loss, alpha, s))
  best = min(losses, key=lambda t: t[0])
  return best[2].astype(np.float32), best[1], best[0] / max(losses[0][0], 1e-30)


def _normalised_weight_mean(w: np.ndarray, spec: QuantSpec) -> np.ndarray:
  """Mean over outputs of ``|W|`` relative to its scale group's max, per input channel."""
  view, axes = grouped_view(jnp.abs(jnp.asarray(w, jnp.float32)), spec)
  rel = view / jnp.maximum(jnp.max(view, axis=axes, keepdims=True), 1e-8)
  return np.asarray(jnp.mean(rel.reshape(w.shape), axis=1))


def awq_clip(x: np.ndarray, w: np.ndarray, spec: QuantSpec) -> QArray:
  """RTN of ``w [in, out]`` with the clip (range shrink per group and output channel) that
  minimises each group's output error ``Σ_n (x[n, g] · ΔW[g, o])²`` on the rows `x`."""
  wj = jnp.asarray(w, jnp.float32)
  view, axes = grouped_view(wj, spec)
  lo = jnp.min(view, axis=axes, keepdims=True) if not spec.symmetric else None
  amax = jnp.max(jnp.abs(view), axis=axes, keepdims=True)
  hi = jnp.max(view, axis=axes, keepdims=True) if not spec.symmetric else amax
  lo = lo if lo is not None else -amax
  xj = jnp.asarray(x, jnp.float32)
  groups = view.shape[0] if spec.granularity == "group" else 1
  xg = xj.reshape(xj.shape[0], groups, -1)
  best = None
  for r in AWQ_CLIPS:
    scale, zero = scale_from_range(r * lo, r * hi, spec)
    q = quantize(wj, spec, scale=scale, zero_point=zero)
    dw = (wj - dequantize(q)).reshape(groups, -1, w.shape[1])
    err = jnp.sum(jnp.einsum("ngk,gko->ngo", xg, dw) ** 2, axis=0)  # [groups, out]
    err = err.reshape(scale.shape)
    if best is None:
      best = (err, scale, zero)
    else:
      better = err < best[0]
      best = (jnp.where(better, err, best[0]), jnp.where(better, scale, best[1]),
              None if zero is None else jnp.where(better, zero, best[2]))  # fmt: skip
  return quantize(wj, spec, scale=best[1], zero_point=best[2])


# --------------------------------------------------------------------------- drivers
def _targets(params, rules) -> dict[str, QuantSpec]:
  from jaxquant.transforms import plan

  p = plan(params, rules)
  p.check()
  return {r.path: r.spec for r in p.quantized if len(r.shape) == 2}


def _group_inputs(stats: dict, group: SmoothGroup):
  st = stats[group.layers[0]]
  rows = np.concatenate([np.asarray(r) for r in st["rows"]])
  n = float(st["n"])
  return rows, np.asarray(st["abs_sum"]) / n, np.asarray(st["abs_max"])


def _prepare(model, params, rules, batches, groups):
  from jaxquant.ptq.capture import activation_observer, capture

  targets = _targets(params, rules)
  stats = capture(model, params, rules, batches, activation_observer(targets))
  groups = default_groups([p for p in targets if p in stats]) if groups is None else groups
  groups = [g for g in groups if all(p in stats and p in targets for p in g.layers)]
  return targets, stats, groups


def smoothquant_params(model, params: dict, rules, batches, *, alpha: float = 0.5,
                       groups: Sequence[SmoothGroup] | None = None) -> tuple[dict, dict]:  # fmt: skip
  """SmoothQuant then round-to-nearest by `rules`. Returns ``(qparams, info)``."""
  from jaxquant.transforms import quantize_params

  _, stats, groups = _prepare(model, params, rules, batches, groups)
  leaves = dict(named_leaves(params))
  scales = {}
  for i, g in enumerate(groups):
    _, _, act_max = _group_inputs(stats, g)
    scales[i] = smoothquant_scales(act_max, [np.asarray(leaves[p]) for p in g.layers], alpha)
  smoothed = apply_smoothing(params, groups, scales)
  info = {"groups": len(groups), "folded": sum(g.fold is not None for g in groups),
          "reference": smoothed}  # fmt: skip
  return quantize_params(smoothed, rules), info


def awq_params(model, params: dict, rules, batches, *, clip: bool = True,
               groups: Sequence[SmoothGroup] | None = None) -> tuple[dict, dict]:  # fmt: skip
  """AWQ scale search (per group of layers sharing an input), folding, clip search, then
  round-to-nearest by `rules` for everything else. Returns ``(qparams, info)``."""
  from jaxquant.transforms import quantize_params

  targets, stats, groups = _prepare(model, params, rules, batches, groups)
  leaves = dict(named_leaves(params))
  scales, info, inputs = {}, {}, {}
  for i, g in enumerate(groups):
    rows, x_mean, _ = _group_inputs(stats, g)
    spec = targets[g.layers[0]]
    s, alpha, ratio = awq_search(rows, x_mean, [np.asarray(leaves[p]) for p in g.layers], spec)
    scales[i] = s
    info[",".join(g.layers)] = {"alpha": alpha, "loss_vs_rtn": ratio}
    inputs.update({p: rows / s for p in g.layers})
  smoothed = apply_smoothing(params, groups, scales)
  info["reference"] = smoothed
  new = dict(named_leaves(smoothed))
  done = {p: awq_clip(inputs[p], np.asarray(new[p]), targets[p]) if clip
          else quantize(new[p], targets[p]) for p in inputs}  # fmt: skip
  smoothed = map_leaves(lambda path, v: done.get(path, v), smoothed)
  return quantize_params(smoothed, rules), info
