"""Run an unchanged NNX model with quantized weights and activations.

    qmodel = jaxquant.flax.nnx.quantize_model(model, rules, mode="serve")
    y = qmodel(x)

Graph surgery on a copy of the model: every `nnx.Linear`, `nnx.LinearGeneral`, `nnx.Einsum`
and `nnx.Conv` whose kernel a rule quantizes gets the jaxquant seam as its ``dot_general`` /
``einsum_op`` / ``conv_general_dilated`` and ``promote_dtype`` attributes, and in serve mode
its kernel `Param` holds a `QArray` (the layer's ``self.kernel[...]`` returns it untouched).
Calibrate mode gives each such layer an `ActivationStats` variable that its forward updates
(also under `nnx.jit`); read them with `activation_stats(model)` and pass them to serve or fake
mode as `calibration`. The layers' class becomes a subclass (``QuantizedLinear``...) whose
``__call__`` provides those statistics and static scales to the seams.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import jax
from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes

from jaxquant import calibration as calib
from jaxquant.flax import common
from jaxquant.numerics import quantize
from jaxquant.rules import Rule

_SEAMS: dict[type, tuple[str, type[common._Seam]]] = {
  nnx.Linear: ("dot_general", common.DotSeam),
  nnx.LinearGeneral: ("dot_general", common.DotSeam),
  nnx.Einsum: ("einsum_op", common.EinsumSeam),
  nnx.Conv: ("conv_general_dilated", common.ConvSeam),
}


class ActivationStats(nnx.Variable):
  """Running statistics of the activations entering a quantized layer (calibrate mode)."""


class ActivationScale(nnx.Variable):
  """A calibrated static activation ``(scale, zero_point)`` (serve and fake modes)."""


def _promote(args, /, *, dtype=None, inexact=True):
  return common.promote_keeping_kernel(
    nnx_dtypes.promote_dtype, tuple(args), dtype=dtype, inexact=inexact
  )


def _base(node) -> type | None:
  return next((c for c in type(node).__mro__ if c in _SEAMS), None)


def _layers(model: nnx.Module) -> Iterator[tuple[str, Any, type]]:
  """``(path, layer, its base class in _SEAMS)`` for every layer the adapter can quantize."""
  for path, node in nnx.iter_graph(model):
    base = _base(node)
    if base is not None:
      yield "/".join(map(str, path)), node, base


_QUANTIZED_CLASSES: dict[type, type] = {}


def _quantized_class(base: type) -> type:
  """``base`` whose ``__call__`` runs inside the layer's jaxquant call state."""
  if base not in _QUANTIZED_CLASSES:

    def __call__(self, *args, **kwargs):
      cfg = getattr(self, _SEAMS[base][0]).cfg
      scales, stats = {}, None
      if hasattr(self, "jaxquant_act_scale"):
        scales[cfg.path] = tuple(self.jaxquant_act_scale.get_value())
      if hasattr(self, "jaxquant_act_stats"):
        stats = {cfg.path: self.jaxquant_act_stats.get_value()}
        key = jax.random.fold_in(jax.random.key(0), stats[cfg.path]["count"].astype("uint32"))
      else:
        key = None
      with common.call_state(scales, stats, key) as state:
        out = base.__call__(self, *args, **kwargs)
      if cfg.path in state.stats_out:
        self.jaxquant_act_stats.set_value(state.stats_out[cfg.path])
      return out

    _QUANTIZED_CLASSES[base] = type(f"Quantized{base.__name__}", (base,), {"__call__": __call__})
  return _QUANTIZED_CLASSES[base]


def quantize_model(
  model: nnx.Module,
  rules: Sequence[Rule],
  mode: str = "serve",
  calibration: dict | None = None,
) -> nnx.Module:
  """A quantized copy of `model` (the original is left as it is).

  Args:
    model: an NNX module.
    rules: first match per kernel path decides the layer's weight and activation specs.
    mode: ``serve`` (kernels quantized now), ``fake`` (kernels stay float, fake-quantized in
      the forward for QAT), or ``calibrate`` (float forward recording activation statistics).
    calibration: `activation_stats` of a calibrate-mode copy, for per-tensor (static) specs.
  """
  mode = common.check_mode(mode)
  rules = tuple(rules)
  qmodel = nnx.clone(model)
  for prefix, layer, base in list(_layers(qmodel)):
    cfg = common.layer_config(f"{prefix}/kernel", rules, mode)
    if cfg is None:
      continue
    attr, seam = _SEAMS[base]
    layer.__class__ = _quantized_class(base)
    setattr(layer, attr, seam(cfg))
    layer.promote_dtype = _promote
    if mode == "serve" and cfg.weight is not None:
      layer.kernel = nnx.Param(quantize(layer.kernel.get_value(), cfg.weight, path=cfg.path))
    if mode == "calibrate":
      layer.jaxquant_act_stats = ActivationStats(calib.init_act_stats())
    elif cfg.static_act:
      stats = (calibration or {}).get(cfg.path)
      if stats is None:
        raise common.missing_calibration(cfg)
      layer.jaxquant_act_scale = ActivationScale(
        common.scales_from_stats({cfg.path: stats}, {cfg.path: cfg})[cfg.path]
      )
  return qmodel


def activation_stats(model: nnx.Module) -> dict[str, dict]:
  """``{kernel path: statistics}`` collected by a calibrate-mode model."""
  return {
    f"{prefix}/kernel": layer.jaxquant_act_stats.get_value()
    for prefix, layer, _ in _layers(model)
    if hasattr(layer, "jaxquant_act_stats")
  }
