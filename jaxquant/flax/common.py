"""What the Linen and NNX adapters share: per-layer configs, the seams, calibration records.

A quantized layer keeps its own code; only its contraction seam (``dot_general``,
``einsum_op`` or ``conv_general_dilated``) and its ``promote_dtype`` are swapped for the ones
here, which route the contraction through `jaxquant.ops`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import zlib
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax import lax

from jaxquant import calibration
from jaxquant.numerics import static_act_scale
from jaxquant.ops import qconv, qdot_general, qeinsum
from jaxquant.qarray import QArray
from jaxquant.rules import Rule, first_match
from jaxquant.spec import QuantSpec

#: The parameter a smoothed layer (AWQ, SmoothQuant) keeps when its ``1/s`` could not be folded
#: into the op before it: the adapters divide the layer's input by it, ``x / s``.
INPUT_SCALE = "input_scale"

Mode = Literal["serve", "fake", "calibrate"]
MODES = ("serve", "fake", "calibrate")


def check_mode(mode: str) -> Mode:
  if mode not in MODES:
    raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}.")
  return mode  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class LayerConfig:
  """How one layer runs: its kernel's path, weight and activation specs, and the mode."""

  path: str
  weight: QuantSpec | None
  act: QuantSpec | None
  mode: Mode

  @property
  def static_act(self) -> bool:
    """Per-tensor activation specs use one calibrated (static) scale."""
    return self.act is not None and self.act.granularity == "tensor"


def layer_config(kernel_path: str, rules: Sequence[Rule], mode: Mode) -> LayerConfig | None:
  """The config of the layer owning `kernel_path`, or None if no rule quantizes anything."""
  idx = first_match(kernel_path, rules)
  if idx is None:
    return None
  rule = rules[idx]
  if rule.weight is None and rule.act is None:
    return None
  return LayerConfig(kernel_path, rule.weight, rule.act, mode)


def layer_key(key: jax.Array, path: str) -> jax.Array:
  return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


# --------------------------------------------------------------------------- operands
@dataclasses.dataclass(frozen=True, eq=False)
class Operand:
  """A kernel (float or QArray) carried through a layer's code untouched.

  Deliberately not a pytree: Flax sees a leaf with the kernel's logical shape and dtype.
  """

  value: Any

  @property
  def shape(self):
    return self.value.shape

  @property
  def dtype(self):
    return self.value.dtype

  @property
  def ndim(self):
    return len(self.value.shape)

  def __getitem__(self, key):
    return self if key is Ellipsis else self.value[key]


def _is_kernel(a) -> bool:
  return isinstance(a, (Operand, QArray))


def _unwrap(k):
  return k.value if isinstance(k, Operand) else k


def promote_keeping_kernel(flax_promote, args: tuple, dtype=None, inexact=True) -> tuple:
  """Flax's dtype promotion for everything but the kernel, which stays quantized."""
  placeholders = tuple(jnp.zeros((), a.dtype) if _is_kernel(a) else a for a in args)
  promoted = flax_promote(placeholders, dtype=dtype, inexact=inexact)
  return tuple(a if _is_kernel(a) else p for a, p in zip(args, promoted))


# --------------------------------------------------------------------------- static scales
@dataclasses.dataclass
class _CallState:
  """Per-call context: static activation scales in, calibration statistics out."""

  scales: dict[str, tuple[jax.Array, jax.Array | None]]
  stats_in: dict[str, dict] | None
  stats_out: dict[str, dict]
  key: jax.Array | None
  observer: Callable[[str, Any, jax.Array], Any] | None = None


_STATE: contextvars.ContextVar[_CallState | None] = contextvars.ContextVar(
  "jaxquant_flax_call", default=None
)


@contextlib.contextmanager
def call_state(scales=None, stats=None, key=None, observer=None):
  """Context of one adapter call. ``observer(path, previous or None, x) -> new or None``
  replaces the default activation statistics in calibrate mode (e.g. to accumulate ``XᵀX``
  for GPTQ); returning None records nothing for that layer."""
  state = _CallState(dict(scales or {}), stats, {}, key, observer)
  token = _STATE.set(state)
  try:
    yield state
  finally:
    _STATE.reset(token)


def record(cfg: LayerConfig, x: jax.Array) -> None:
  """Calibrate mode: fold `x` into this layer's running activation statistics."""
  state = _STATE.get()
  if state is None:
    raise RuntimeError("calibrate mode records statistics only inside the adapter's apply.")
  previous = state.stats_out.get(cfg.path)
  if previous is None and state.stats_in is not None:
    previous = state.stats_in.get(cfg.path)
  if state.observer is not None:
    new = state.observer(cfg.path, previous, x)
    if new is not None:
      state.stats_out[cfg.path] = new
    return
  if previous is None:
    previous = calibration.init_act_stats()
  key = state.key if state.key is not None else jax.random.key(0)
  n = len(state.stats_out)
  state.stats_out[cfg.path] = calibration.update_act_stats(
    previous, x, jax.random.fold_in(layer_key(key, cfg.path), n)
  )


def static_scale(cfg: LayerConfig):
  """The calibrated activation ``(scale, zero_point)`` of this layer (serve/fake modes)."""
  if not cfg.static_act:
    return None, None
  state = _STATE.get()
  found = None if state is None else state.scales.get(cfg.path)
  if found is None:
    raise missing_calibration(cfg)
  return found


def missing_calibration(cfg: LayerConfig) -> ValueError:
  """The error for a layer with a static activation spec but no calibration statistics."""
  return ValueError(
    f"{cfg.path}: activation spec {cfg.act} is per-tensor, i.e. static, but no calibration "
    "statistics were given for this layer. Run the model in mode='calibrate' on sample "
    "batches and pass the statistics (calibration=stats), or use a per-token spec "
    "(e.g. 'int8:token') for dynamic scales."
  )


def scales_from_stats(stats: dict[str, dict], configs: dict[str, LayerConfig]) -> dict:
  """Static activation scales for every layer with a per-tensor activation spec."""
  out = {}
  for path, cfg in configs.items():
    if cfg.act is not None and cfg.static_act and path in stats:
      scale, zp = static_act_scale(stats[path], cfg.act)
      out[path] = (scale, zp)
  return out


# --------------------------------------------------------------------------- seams
def _op_mode(cfg: LayerConfig) -> str:
  return "fake" if cfg.mode == "fake" else "serve"


@dataclasses.dataclass(frozen=True)
class _Seam:
  """Shared by the seams: calibrate records the input and runs in float; serve and fake run
  the quantized op with the layer's specs (and its static activation scale, if any)."""

  cfg: LayerConfig

  def _run(self, lhs, rhs, float_op, quant_op):
    rhs = _unwrap(rhs)
    if self.cfg.mode == "calibrate":
      record(self.cfg, lhs)
      return float_op(lhs, rhs.dequantize(lhs.dtype) if isinstance(rhs, QArray) else rhs)
    scale, zp = static_scale(self.cfg)
    return quant_op(
      lhs,
      rhs,
      lhs_spec=self.cfg.act,
      rhs_spec=None if isinstance(rhs, QArray) else self.cfg.weight,
      lhs_scale=scale,
      lhs_zero_point=zp,
      mode=_op_mode(self.cfg),
    )


class DotSeam(_Seam):
  """Stands in for ``lax.dot_general`` inside a layer."""

  def __call__(
    self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs
  ):
    kw = {"precision": precision, "preferred_element_type": preferred_element_type}
    return self._run(
      lhs,
      rhs,
      lambda x, w: lax.dot_general(x, w, dimension_numbers, **kw),
      lambda x, w, **q: qdot_general(x, w, dimension_numbers, **kw, **q),
    )


class EinsumSeam(_Seam):
  """Stands in for ``jnp.einsum`` inside a layer (two operands, lhs the input)."""

  def __call__(self, subscripts, lhs, rhs, precision=None, preferred_element_type=None, **kwargs):
    kw = {"precision": precision, "preferred_element_type": preferred_element_type}
    return self._run(
      lhs,
      rhs,
      lambda x, w: jnp.einsum(subscripts, x, w, **kw),
      lambda x, w, **q: qeinsum(subscripts, x, w, **kw, **q),
    )


class ConvSeam(_Seam):
  """Stands in for ``lax.conv_general_dilated`` inside a layer."""

  def __call__(self, lhs, rhs, *args, **kwargs):
    return self._run(
      lhs,
      rhs,
      lambda x, w: lax.conv_general_dilated(x, w, *args, **kwargs),
      lambda x, w, **q: qconv(x, w, *args, **kwargs, **q),
    )
