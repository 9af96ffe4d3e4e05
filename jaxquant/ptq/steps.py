"""PTQ methods as steps that recipes name, in one registry.

Three kinds of step:

* **quantizer** ``(w, stats, spec) -> (QArray, info)``: how one kernel becomes codes. ``rtn``
  (round to nearest), ``gptq`` (Hessian error feedback), ``awq_clip`` (per-group clip search
  on the layer's inputs), ``hqq`` (half-quadratic zero points, no data).
* **smoother** ``(stats, weights, spec) -> (s, info)``: per-input-channel scales for a group
  of layers sharing one input, applied float → float as ``x W = (x / s)(diag(s) W)``
  (`jaxquant.ptq.smooth`). ``smoothquant``, ``awq``.
* **selector** ``(params, plan, data, quantizer) -> (rules, info)``: chooses the rules
  themselves (``mixed``, in `jaxquant.mixed`).

Each step names the statistic of a layer's inputs it needs (`StatRequest`): ``hessian``
(``XᵀX``), ``inputs`` (rows of ``X``, evenly subsampled, and ``mean |X|``) or ``act_absmax``
(``max |X|`` per channel); `jaxquant.ptq.driver` captures them block by block. A recipe is
zero or more selectors, zero or more smoothers and at most one quantizer (default ``rtn``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Literal, Protocol

import numpy as np

from jaxquant.numerics import quantize, quantize_float_zero
from jaxquant.ptq import distributed, smooth
from jaxquant.ptq.capture import (
  RowMask,
  activation_observer,
  capture,
  collect_inputs,
  hessian_observer,
)
from jaxquant.ptq.gptq import GPTQConfig, gptq_eligible, gptq_quantize
from jaxquant.ptq.hqq import hqq_quantize
from jaxquant.qarray import QArray
from jaxquant.rules import Rule
from jaxquant.spec import QuantSpec

Kind = Literal["select", "smooth", "quantize"]
StatKind = Literal["hessian", "inputs", "act_absmax"]
Stats = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class StatRequest:
  """A statistic of a layer's inputs ``X [rows, d_in]`` that a step needs.

  ``hessian``: ``{"h": XᵀX, "n"}``; ``inputs``: ``{"x": at most `max_rows` rows, evenly
  spaced, "abs_mean": mean |X| over all rows, "n"}``; ``act_absmax``: ``{"abs_max", "abs_sum",
  "n"}`` per input channel. Only real rows count (the calibration's row mask).
  """

  kind: StatKind
  max_rows: int | None = None


class Step(Protocol):
  """What every registered step has: its kind and the statistic it needs (None: no data)."""

  kind: ClassVar[Kind]
  needs: StatRequest | None


class Quantizer(Step, Protocol):
  def eligible(self, spec: QuantSpec, shape: tuple[int, ...]) -> bool: ...

  def __call__(self, w: Any, stats: Stats | None, spec: QuantSpec) -> tuple[QArray, dict]: ...


class Smoother(Step, Protocol):
  def __call__(
    self, stats: Stats, weights: Sequence[np.ndarray], spec: QuantSpec
  ) -> tuple[np.ndarray, dict]: ...


REGISTRY: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
  """Class decorator: makes a step class available to recipes as `name`."""

  def add(cls: type) -> type:
    if name in REGISTRY and REGISTRY[name] is not cls:
      raise ValueError(f"A PTQ step named {name!r} is already registered ({REGISTRY[name]}).")
    REGISTRY[name] = cls
    cls.name = name  # type: ignore[attr-defined]
    return cls

  return add


def make_step(name: str, options: Mapping[str, Any] | None = None) -> Any:
  """The registered step `name` with `options` (its dataclass fields), checked."""
  if name not in REGISTRY:
    raise ValueError(f"Unknown PTQ step {name!r}; use one of {', '.join(sorted(REGISTRY))}.")
  cls = REGISTRY[name]
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = set(options or {}) - known
  if unknown:
    raise ValueError(
      f"Step {name!r}: unknown options {sorted(unknown)}; it takes {sorted(known) or 'none'}."
    )
  try:
    return cls(**(options or {}))
  except (TypeError, ValueError) as e:
    raise ValueError(f"Step {name!r}: {e}") from None


# --------------------------------------------------------------------------- quantizers
@register("rtn")
@dataclasses.dataclass(frozen=True)
class RTN:
  """Round to nearest by the spec alone; ``float_zero``: min-max with an unrounded float zero
  point (`numerics.quantize_float_zero`, llama.cpp's Q4_1 grid) for asymmetric integer specs."""

  kind: ClassVar[Kind] = "quantize"
  needs: ClassVar[StatRequest | None] = None
  float_zero: bool = False

  def eligible(self, spec: QuantSpec, shape: tuple[int, ...]) -> bool:
    return not self.float_zero or (spec.info.kind == "int" and not spec.symmetric)

  def __call__(self, w, stats, spec):
    if self.float_zero:
      return quantize_float_zero(w, spec), {}
    return quantize(w, spec), {}


@register("gptq")
@dataclasses.dataclass(frozen=True)
class GPTQ(GPTQConfig):
  """GPTQ (`jaxquant.ptq.gptq`) on the layer's ``XᵀX``; options are `GPTQConfig`'s."""

  kind: ClassVar[Kind] = "quantize"
  needs: ClassVar[StatRequest | None] = StatRequest("hessian")

  def eligible(self, spec: QuantSpec, shape: tuple[int, ...]) -> bool:
    return gptq_eligible(spec, shape)

  def __call__(self, w, stats, spec):
    return gptq_quantize(np.asarray(w), np.asarray(stats["h"]), spec, self)


@register("awq_clip")
@dataclasses.dataclass(frozen=True)
class AWQClip:
  """Round to nearest with the range shrink per group and output channel that minimises the
  group's output error on the layer's input rows (`smooth.awq_clip`)."""

  kind: ClassVar[Kind] = "quantize"
  rows: int | None = 4096

  @property
  def needs(self) -> StatRequest:
    return StatRequest("inputs", self.rows)

  def eligible(self, spec: QuantSpec, shape: tuple[int, ...]) -> bool:
    return len(shape) == 2 and not spec.is_cast

  def __call__(self, w, stats, spec):
    return smooth.awq_clip(smooth.even_rows(stats["x"], self.rows), np.asarray(w), spec), {}


@register("hqq")
@dataclasses.dataclass(frozen=True)
class HQQ:
  """HQQ zero points (`jaxquant.ptq.hqq`), calibration-free; asymmetric integer specs."""

  kind: ClassVar[Kind] = "quantize"
  needs: ClassVar[StatRequest | None] = None
  iters: int = 20
  p: float = 0.7
  beta: float = 10.0
  kappa: float = 1.01

  def eligible(self, spec: QuantSpec, shape: tuple[int, ...]) -> bool:
    return spec.info.kind == "int" and not spec.symmetric

  def __call__(self, w, stats, spec):
    options = dataclasses.asdict(self)
    return hqq_quantize(w, spec, **options), {}


# --------------------------------------------------------------------------- smoothers
@register("smoothquant")
@dataclasses.dataclass(frozen=True)
class SmoothQuant:
  """SmoothQuant scales ``max|x_j|^α / max|W_j|^(1−α)`` (`smooth.smoothquant_scales`)."""

  kind: ClassVar[Kind] = "smooth"
  needs: ClassVar[StatRequest | None] = StatRequest("act_absmax")
  alpha: float = 0.5

  def __call__(self, stats, weights, spec):
    return smooth.smoothquant_scales(np.asarray(stats["abs_max"]), weights, self.alpha), {}


@register("awq")
@dataclasses.dataclass(frozen=True)
class AWQ:
  """AWQ's scale search on the group's input rows (`smooth.awq_search`): the grid point of
  ``x̄^α`` (and, with `duo`, ``x̄^α / w̄^(1−α)``) with the least output error."""

  kind: ClassVar[Kind] = "smooth"
  duo: bool = True
  grid: int = 20
  search_rows: int | None = 4096

  @property
  def needs(self) -> StatRequest:
    return StatRequest("inputs", self.search_rows)

  def __call__(self, stats, weights, spec):
    x = smooth.even_rows(stats["x"], self.search_rows)
    s, alpha, ratio = smooth.awq_search(x, stats["abs_mean"], weights, spec, self.duo, self.grid)
    return s, {"alpha": alpha, "loss_vs_rtn": ratio}


# --------------------------------------------------------------------------- statistics
def capture_stats(
  model,
  params,
  rules: Sequence[Rule],
  batches: Sequence[tuple],
  request: StatRequest,
  paths: Sequence[str],
  row_mask: RowMask | None = None,
  mesh: Any = None,
  data_axis: str = "data",
) -> dict[str, dict]:
  """``{path: statistics}`` of the inputs of the layers `paths` (see `StatRequest`), from one
  float forward over `batches` with `params` (calibrate mode). With a `mesh`, ``hessian`` and
  ``act_absmax`` are accumulated per device on its share of every batch (split over
  `data_axis`) and all-reduced once per layer (`jaxquant.ptq.distributed`)."""
  if not paths:
    return {}
  if mesh is not None and request.kind in ("hessian", "act_absmax"):
    observer = (hessian_observer if request.kind == "hessian" else activation_observer)(paths)
    acc = distributed.sharded_capture(
      model, params, rules, batches, observer, mesh, data_axis, row_mask
    )
    host = {p: {k: distributed.local_value(v) for k, v in a.items()} for p, a in acc.items()}
    if request.kind == "hessian":
      return {p: {"h": a["h"], "n": float(a["n"])} for p, a in host.items()}
    return host
  if request.kind == "hessian":
    acc = capture(model, params, rules, batches, hessian_observer(paths), row_mask)
    return {p: {"h": np.asarray(acc[p]["h"]), "n": float(acc[p]["n"])} for p in acc}
  if request.kind == "act_absmax":
    acc = capture(model, params, rules, batches, activation_observer(paths), row_mask)
    return {p: {k: np.asarray(v) for k, v in a.items()} for p, a in acc.items()}
  rows = collect_inputs(model, params, rules, batches, paths, row_mask)
  return {
    p: {
      "x": smooth.even_rows(x, request.max_rows),
      "abs_mean": np.mean(np.abs(x), axis=0),
      "n": x.shape[0],
    }
    for p, x in rows.items()
  }


def merged(requests: Sequence[StatRequest]) -> list[StatRequest]:
  """One request per kind; ``inputs`` keeps the most rows any step asked for."""
  out: dict[str, StatRequest] = {}
  for r in requests:
    old = out.get(r.kind)
    if old is None:
      out[r.kind] = r
    elif r.kind == "inputs":
      rows = None if None in (old.max_rows, r.max_rows) else max(old.max_rows, r.max_rows)  # type: ignore[type-var]
      out[r.kind] = StatRequest("inputs", rows)
  return list(out.values())
