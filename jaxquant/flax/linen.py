"""Run an unchanged Linen model with quantized weights and activations.

    qmodel = jaxquant.flax.quantize_model(model, rules, mode="serve")
    y = qmodel.apply({"params": jaxquant.quantize_params(params, rules)}, x)

`nn.intercept_methods` catches the ``__call__`` of every `nn.Dense`, `nn.DenseGeneral`,
`nn.Conv` and `nn.Einsum` whose kernel a rule quantizes. Dense, DenseGeneral and Conv then run
their own code on a copy of themselves whose ``dot_general`` / ``conv_general_dilated`` and
``promote_dtype`` are the jaxquant seams (see `jaxquant.flax.common`); Einsum, which has no
contraction seam in Linen, is computed here with `jaxquant.ops.qeinsum`.

Modes: ``serve`` (QArray kernels, int8 path where it applies), ``fake`` (float kernels,
fake-quantized with straight-through gradients, for QAT), ``calibrate`` (float forward that
also returns running activation statistics, for static activation scales).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import dtypes as linen_dtypes

from jaxquant.flax import common
from jaxquant.learned import LSQ, PACT, lsq_fake_quant, pact_fake_quant
from jaxquant.ops import qeinsum
from jaxquant.ops.einsum import expand_equation
from jaxquant.qarray import QArray
from jaxquant.rules import Rule

INPUT_SCALE = common.INPUT_SCALE

_SEAMS = {nn.Dense: "dot_general", nn.DenseGeneral: "dot_general", nn.Conv: "conv_general_dilated"}
_SEAM_TYPES = {"dot_general": common.DotSeam, "conv_general_dilated": common.ConvSeam}


def _promote(*args, dtype=None, inexact=True):
  return list(
    common.promote_keeping_kernel(
      lambda a, **kw: linen_dtypes.promote_dtype(*a, **kw), args, dtype=dtype, inexact=inexact
    )
  )


def _run_with_seams(module: nn.Module, seam_attr: str, cfg: common.LayerConfig, args, kwargs):
  """Runs `module`'s own ``__call__`` with the jaxquant seams, on its own variables."""
  variables = dict(module.variables)
  params = dict(variables.get("params", {}))
  args = _divide_by_input_scale(params, args)
  cfg, args = _learned_quantizers(cfg, params, args)
  seam = _SEAM_TYPES[seam_attr](cfg)
  overrides: dict[str, Any] = {seam_attr: seam, f"{seam_attr}_cls": None, "promote_dtype": _promote}
  clone = module.clone(parent=None, **overrides)
  params["kernel"] = _boxed_like(params["kernel"], common.Operand(_unboxed(params["kernel"])))
  variables["params"] = params
  return clone.apply(variables, *args, **kwargs)


def _unboxed(value):
  """A parameter without its partitioning box (``nn.with_partitioning``), if it has one."""
  return value.unbox(apply_constraint=False) if isinstance(value, nn.meta.AxisMetadata) else value


def _boxed_like(box, value):
  """`value` in `box`'s partitioning metadata (itself when `box` is no box)."""
  return box.replace_boxed(value) if isinstance(box, nn.meta.AxisMetadata) else value


def _learned_quantizers(cfg: common.LayerConfig, params: dict, args: tuple):
  """QAT with learned quantizers: ``lsq_scale`` fake-quantizes the kernel with its learned
  step, ``pact_alpha`` clips and quantizes the input; the seam then skips those specs."""
  scale, alpha = params.pop(LSQ, None), params.pop(PACT, None)
  if cfg.mode != "fake":
    if scale is not None or alpha is not None:
      raise ValueError(
        f"{cfg.path}: learned quantizer parameters ({LSQ}/{PACT}) are for fake mode; turn a "
        "QAT result into serving params with jaxquant.training.convert."
      )
    return cfg, args
  if scale is not None and cfg.weight is not None:
    params["kernel"] = lsq_fake_quant(params["kernel"], scale, cfg.weight)
    cfg = dataclasses.replace(cfg, weight=None)
  if alpha is not None and cfg.act is not None:
    args = (pact_fake_quant(args[0], alpha, cfg.act),) + tuple(args[1:])
    cfg = dataclasses.replace(cfg, act=None)
  return cfg, args


def _divide_by_input_scale(params: dict, args: tuple) -> tuple:
  """Smoothed layers (AWQ, SmoothQuant) without a fold keep ``input_scale``: ``x / s``."""
  scale = params.pop(INPUT_SCALE, None)
  if scale is None:
    return args
  return (args[0] / scale.astype(args[0].dtype),) + tuple(args[1:])


def _needs_float_run(module: nn.Module) -> bool:
  params = module.variables.get("params", {})
  return INPUT_SCALE in params or any(isinstance(_unboxed(v), QArray) for v in params.values())


def _run_float(module: nn.Module, args, kwargs, method: str = "__call__"):
  """A layer no rule quantizes but that holds QArrays (an `nn.Embed` table...) or an
  ``input_scale`` runs in float: dequantized values, inputs divided by the scale."""
  variables = dict(module.variables)
  params = {
    k: _boxed_like(v, _unboxed(v).dequantize()) if isinstance(_unboxed(v), QArray) else v
    for k, v in variables["params"].items()
  }
  args = _divide_by_input_scale(params, args)
  variables["params"] = params
  return module.clone(parent=None).apply(variables, *args, method=method, **kwargs)


def _einsum(module: nn.Einsum, cfg: common.LayerConfig, args, kwargs):
  """`nn.Einsum.__call__` through `qeinsum` (Linen's Einsum has no contraction seam)."""
  inputs = args[0]
  equation = kwargs.get("einsum_str", args[1] if len(args) > 1 else None) or module.einsum_str
  if equation is None:
    raise ValueError(
      f'{"/".join(module.path)}: parameter "einsum_str" must be passed to the constructor or '
      "at call time."
    )
  equation = equation.replace(" ", "")
  params = dict(module.variables["params"])
  (inputs,) = _divide_by_input_scale(params, (inputs,))
  kernel, bias = params["kernel"], params.get("bias")
  dtype = module.dtype or jnp.result_type(inputs.dtype, kernel.dtype)
  inputs = inputs.astype(dtype)
  if cfg.mode == "calibrate":
    common.record(cfg, inputs)
    w = kernel.dequantize(dtype) if isinstance(kernel, QArray) else kernel
    y = jnp.einsum(equation, inputs, w.astype(dtype), precision=module.precision)
  else:
    scale, zp = common.static_scale(cfg)
    y = qeinsum(
      equation,
      inputs,
      kernel,
      precision=module.precision,
      lhs_spec=cfg.act,
      rhs_spec=None if isinstance(kernel, QArray) else cfg.weight,
      lhs_scale=scale,
      lhs_zero_point=zp,
      mode="fake" if cfg.mode == "fake" else "serve",
      out_dtype=dtype,
    )
  if bias is not None:
    y = y + jnp.reshape(bias.astype(dtype), _bias_shape(equation, inputs.ndim, kernel.shape))
  return y


def _bias_shape(equation: str, lhs_ndim: int, kernel_shape) -> tuple[int, ...]:
  """Where the bias broadcasts: output axes that come from the kernel."""
  _, rhs, out = expand_equation(equation, lhs_ndim, len(kernel_shape))
  return tuple(kernel_shape[rhs.index(c)] if c in rhs else 1 for c in out)


@dataclasses.dataclass
class QuantizedModel:
  """A Linen model run through jaxquant's seams; `apply` is the model's `apply`.

  Attributes:
    model: the unchanged Linen module.
    rules: the rules that decide each layer's weight and activation specs.
    mode: ``serve``, ``fake`` or ``calibrate``.
    calibration: activation statistics from calibrate mode (for static, per-tensor specs).
  """

  model: nn.Module
  rules: Sequence[Rule]
  mode: common.Mode = "serve"
  calibration: dict | None = None

  def __post_init__(self) -> None:
    common.check_mode(self.mode)
    self.rules = tuple(self.rules)
    self._configs: dict[str, common.LayerConfig | None] = {}
    # computed once, eagerly: inside `apply` they are constants, not per-call work
    self._scales = self._static_scales() if self.mode != "calibrate" else {}

  def init(self, *args, **kwargs):
    return self.model.init(*args, **kwargs)

  def _config_for(self, module: nn.Module) -> common.LayerConfig | None:
    path = "/".join(module.path + ("kernel",))
    if path not in self._configs:
      self._configs[path] = common.layer_config(path, self.rules, self.mode)
    return self._configs[path]

  def _interceptor(self, next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__":
      if context.method_name == "attend" and _needs_float_run(module):  # a tied output head
        return _run_float(module, args, kwargs, "attend")
      return next_fun(*args, **kwargs)
    if type(module) in _SEAMS:
      attr = _SEAMS[type(module)]
      if isinstance(getattr(module, attr, None), (common.DotSeam, common.ConvSeam)):
        return next_fun(*args, **kwargs)  # already the seamed copy
      cfg = self._config_for(module)
      if cfg is not None:
        return _run_with_seams(module, attr, cfg, args, kwargs)
    elif type(module) is nn.Einsum:
      cfg = self._config_for(module)
      if cfg is not None:
        return _einsum(module, cfg, args, kwargs)
    if _needs_float_run(module):
      return _run_float(module, args, kwargs)
    return next_fun(*args, **kwargs)

  def _static_scales(self):
    if self.calibration is None:
      return {}
    configs = {
      path: common.LayerConfig(path, *_specs(path, self.rules), self.mode)
      for path in self.calibration
    }
    return common.scales_from_stats(self.calibration, configs)

  def apply(
    self,
    variables,
    *args,
    key: jax.Array | None = None,
    stats: dict | None = None,
    observer=None,
    **kwargs,
  ) -> Any:
    """``model.apply`` with quantized layers.

    In calibrate mode returns ``(outputs, stats)``: `stats` maps each quantized layer's kernel
    path to running activation statistics, updated from the `stats` passed in (None: fresh);
    `key` drives their random sampling; ``observer(path, previous, x) -> new`` replaces them
    with any other per-layer accumulation of the layer inputs.
    """
    with (
      common.call_state(self._scales, stats, key, observer) as state,
      nn.intercept_methods(self._interceptor),
    ):
      out = self.model.apply(variables, *args, **kwargs)
    if self.mode == "calibrate":
      merged = dict(stats or {})
      merged.update(state.stats_out)
      return out, merged
    return out


def _specs(path: str, rules: Sequence[Rule]):
  cfg = common.layer_config(path, rules, "serve")
  return (None, None) if cfg is None else (cfg.weight, cfg.act)


def quantize_model(
  model: nn.Module, rules: Sequence[Rule], mode: str = "serve", calibration: dict | None = None
) -> QuantizedModel:
  """Wraps an unchanged Linen `model` so its layers run quantized by `rules` (see module doc)."""
  return QuantizedModel(model, rules, common.check_mode(mode), calibration)
