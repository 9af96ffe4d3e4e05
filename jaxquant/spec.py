"""Quantization specs: what a tensor is quantized to, and how.

A `QuantSpec` names the number format, the granularity of the scales, whether a zero point is
kept, how the clipping range is found, and how values are rounded. Specs are frozen and
hashable (they are static metadata under `jit`) and have a short string form used by rules,
recipes and the CLI::

    FORMAT[:GRANULARITY][:asym][:CALIBRATION][:stochastic]

    int8              per output channel, symmetric, absmax range
    int8:token        one scale per row (activations)
    int4:g128:asym    groups of 128 along the contraction axis, with zero points
    nf4:g64           NormalFloat4 code book, absmax per group of 64
    fp8_e4m3:tensor   one scale for the whole tensor
    int8:channel@0:p99.9:stochastic

GRANULARITY is ``tensor``, ``channel`` (default), ``token`` or ``gN``, optionally followed by
``@AXIS``; CALIBRATION is ``absmax`` (default), ``minmax``, ``pN`` (percentile N in (0, 100],
any float form: ``p99.9``, ``p100``, ``p1e-07``) or ``mse``. ``str(spec)`` writes the shortest
form that parses back to an equal spec.
"""

from __future__ import annotations

import dataclasses
import math
import re
import statistics
from typing import Literal, cast, overload

import ml_dtypes
import numpy as np

Granularity = Literal["tensor", "channel", "token", "group"]
Calibration = Literal["absmax", "minmax", "percentile", "mse"]
Rounding = Literal["nearest", "stochastic"]


@dataclasses.dataclass(frozen=True)
class FormatInfo:
  """Static facts about one number format.

  `kind` is ``int`` (uniform integer grid), ``float`` (scaled FP8), ``codebook`` (NF4 index
  into 16 levels) or ``cast`` (a plain dtype cast, no scale). For ``int`` formats `qmin`/`qmax`
  bound the stored integers; symmetric quantization uses the narrow range ``[-qmax, qmax]`` so
  that the grid is symmetric about an exact zero. For ``float`` formats `qmax` is the largest
  finite value of the dtype.
  """

  name: str
  bits: int
  kind: Literal["int", "float", "codebook", "cast"]
  qmin: float
  qmax: float
  storage: np.dtype
  signed: bool = True

  @property
  def packed(self) -> bool:
    """Whether two values share one stored byte."""
    return self.bits == 4

  @property
  def default_symmetric(self) -> bool:
    """Unsigned integer grids carry a zero point; every other format is symmetric."""
    return self.signed or self.kind != "int"


def _nf4_code() -> np.ndarray:
  """The 16 NF4 levels (Dettmers et al., 2023): quantiles of N(0, 1) scaled to [-1, 1].

  8 positive levels at quantiles ``linspace(δ, 1/2, 9)[:-1]``, 7 negative ones at
  ``linspace(δ, 1/2, 8)[:-1]``, and an exact zero, with ``δ = 0.9677083``.
  """
  offset = 0.9677083
  inv_cdf = statistics.NormalDist().inv_cdf
  positive = [inv_cdf(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
  negative = [-inv_cdf(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
  levels = np.sort(np.array(positive + [0.0] + negative))
  return (levels / levels.max()).astype(np.float32)


#: The NF4 code book: ``nf4`` codes index these 16 levels in [-1, 1] (times the scale).
NF4_CODE = _nf4_code()

FORMATS: dict[str, FormatInfo] = {
  f.name: f
  for f in (
    FormatInfo("int8", 8, "int", -128, 127, np.dtype(np.int8)),
    FormatInfo("uint8", 8, "int", 0, 255, np.dtype(np.uint8), signed=False),
    FormatInfo("int4", 4, "int", -8, 7, np.dtype(np.int8)),
    FormatInfo("uint4", 4, "int", 0, 15, np.dtype(np.uint8), signed=False),
    FormatInfo("fp8_e4m3", 8, "float", -448.0, 448.0, np.dtype(ml_dtypes.float8_e4m3fn)),
    FormatInfo("fp8_e5m2", 8, "float", -57344.0, 57344.0, np.dtype(ml_dtypes.float8_e5m2)),
    FormatInfo("nf4", 4, "codebook", 0, 15, np.dtype(np.uint8), signed=False),
    FormatInfo("bf16", 16, "cast", -3.39e38, 3.39e38, np.dtype(ml_dtypes.bfloat16)),
  )
}

GRANULARITIES = ("tensor", "channel", "token", "group")
CALIBRATIONS = ("absmax", "minmax", "percentile", "mse")
ROUNDINGS = ("nearest", "stochastic")
# Dtypes a scale can be stored in: float32 by default; float16 as GPTQ/AWQ checkpoints keep it
# (half the overhead: 0.1875 instead of 0.3125 bits a weight for int4 g128 with zero points).
SCALE_DTYPES: dict[str, np.dtype] = {
  "f32": np.dtype(np.float32),
  "f16": np.dtype(np.float16),
  "bf16": np.dtype(ml_dtypes.bfloat16),
}

_GRAMMAR = (
  "FORMAT[:GRANULARITY][:asym][:CALIBRATION][:stochastic][:scale=DTYPE], e.g. 'int8', "
  "'int8:token', 'int4:g128:asym', 'int4:g128:asym:scale=f16', 'nf4:g64', "
  f"'fp8_e4m3:tensor'; FORMAT is one of {', '.join(FORMATS)}; GRANULARITY is tensor, "
  "channel, token or gN (optionally @AXIS); CALIBRATION is absmax, minmax, pN (percentile) "
  f"or mse; DTYPE (of the stored scales) is {', '.join(SCALE_DTYPES)}"
)


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """How to quantize one tensor.

  Attributes:
    format: a key of `FORMATS` (``int8``, ``int4``, ``uint8``, ``uint4``, ``fp8_e4m3``,
      ``fp8_e5m2``, ``nf4``, ``bf16``).
    granularity: which elements share one scale. ``tensor``: all of them. ``channel``: all
      elements with the same index along `axis` (default -1, the output features of a Flax
      kernel ``[..., in, out]``). ``token``: all elements with the same index on every axis but
      `axis` (default -1, the features of an activation ``[..., tokens, features]``).
      ``group``: runs of `group_size` consecutive elements along `axis` (default -2, the
      contraction axis of a Flax kernel), separately for every index of the other axes.
    group_size: elements per group, for ``group`` granularity.
    axis: the axis the granularity refers to; None takes the default above.
    symmetric: no zero point, range ``[-qmax, qmax]``; None takes the format's default
      (unsigned formats are asymmetric).
    calibration: how the clipping range ``[lo, hi]`` is found from the values: ``absmax`` and
      ``minmax`` take the full observed range, ``percentile`` clips at the `percentile`-th
      percentile, ``mse`` searches the clip that minimises the squared error.
    percentile: for ``percentile`` calibration, in (0, 100].
    rounding: ``nearest`` (half to even) or ``stochastic`` (needs a PRNG key).
    scale_dtype: how scales are stored, a key of `SCALE_DTYPES` (``f32``, ``f16``, ``bf16``);
      codes are computed from the stored (rounded) scale, so ``dequantize`` is exact for it.
  """

  format: str = "int8"
  granularity: Granularity = "channel"
  group_size: int | None = None
  axis: int | None = None
  symmetric: bool | None = None
  calibration: Calibration = "absmax"
  percentile: float | None = None
  rounding: Rounding = "nearest"
  scale_dtype: str = "f32"

  def __post_init__(self):
    if self.format not in FORMATS:
      raise ValueError(
        f"Unknown quantization format {self.format!r}; use one of {', '.join(FORMATS)}."
      )
    if self.granularity not in GRANULARITIES:
      raise ValueError(
        f"Unknown granularity {self.granularity!r}; use one of {', '.join(GRANULARITIES)}."
      )
    if self.granularity == "group":
      if not isinstance(self.group_size, int) or self.group_size < 1:
        raise ValueError(
          f"Group granularity needs a positive integer group_size, got {self.group_size!r}"
          " (in a spec string write it as gN, e.g. 'int4:g128')."
        )
    elif self.group_size is not None:
      raise ValueError(
        f"group_size={self.group_size} only applies to granularity='group', "
        f"not {self.granularity!r}."
      )
    if self.axis is not None and not isinstance(self.axis, int):
      raise TypeError(f"axis must be an int or None, got {self.axis!r}.")
    info = FORMATS[self.format]
    if self.symmetric is None:
      object.__setattr__(self, "symmetric", info.default_symmetric)
    if self.symmetric and not info.signed and info.kind == "int":
      raise ValueError(
        f"{self.format} is unsigned and so needs a zero point; use symmetric=False "
        f"(':asym'), or the signed format {self.format[1:]!r} for a symmetric grid."
      )
    if not self.symmetric and info.kind in ("float", "codebook"):
      raise ValueError(
        f"{self.format} is symmetric by construction; drop ':asym' (or use an integer "
        "format such as 'uint4' for a zero point)."
      )
    if self.calibration not in CALIBRATIONS:
      raise ValueError(
        f"Unknown calibration {self.calibration!r}; use one of {', '.join(CALIBRATIONS)}."
      )
    if self.calibration == "percentile":
      if self.percentile is None or not (0.0 < float(self.percentile) <= 100.0):
        raise ValueError(
          f"Percentile calibration needs 0 < percentile <= 100, got {self.percentile!r} "
          "(in a spec string write e.g. 'p99.9')."
        )
      object.__setattr__(self, "percentile", float(self.percentile))
    elif self.percentile is not None:
      raise ValueError("percentile is only used with calibration='percentile'.")
    if self.rounding not in ROUNDINGS:
      raise ValueError(f"Unknown rounding {self.rounding!r}; use 'nearest' or 'stochastic'.")
    if self.scale_dtype not in SCALE_DTYPES:
      raise ValueError(
        f"Unknown scale dtype {self.scale_dtype!r}; use one of {', '.join(SCALE_DTYPES)} "
        "(in a spec string write e.g. 'scale=f16')."
      )
    if self.scale_dtype != "f32" and info.kind == "cast":
      raise ValueError(f"{self.format} is a plain cast and keeps no scale; drop 'scale=...'.")
    if self.rounding == "stochastic" and info.kind != "int":
      raise ValueError(
        f"Stochastic rounding applies to integer formats, not {self.format}; "
        "use rounding='nearest'."
      )

  # ----------------------------------------------------------------- derived facts
  @property
  def info(self) -> FormatInfo:
    return FORMATS[self.format]

  @property
  def bits(self) -> int:
    return self.info.bits

  @property
  def scale_storage(self) -> np.dtype:
    """The dtype scales are stored in."""
    return SCALE_DTYPES[self.scale_dtype]

  @property
  def is_cast(self) -> bool:
    """True for formats that are a plain dtype cast (``bf16``): no scale is kept."""
    return self.info.kind == "cast"

  @property
  def int_range(self) -> tuple[float, float]:
    """``(lo, hi)`` of the integer codes this spec stores: the narrow ``[-qmax, qmax]`` when
    symmetric, the format's full ``[qmin, qmax]`` with a zero point."""
    info = self.info
    return (-info.qmax, info.qmax) if self.symmetric else (info.qmin, info.qmax)

  def resolved_axis(self, ndim: int) -> int:
    """The non-negative axis this spec's granularity refers to, for an ``ndim``-d tensor."""
    if self.granularity == "tensor" or ndim == 0:
      return 0
    default = -2 if (self.granularity == "group" and ndim >= 2) else -1
    axis = default if self.axis is None else self.axis
    if not -ndim <= axis < ndim:
      raise ValueError(
        f"Spec {self} refers to axis {axis}, but the tensor has only {ndim} dimensions; "
        "set the axis with '@AXIS' (e.g. 'int8:channel@0')."
      )
    return axis % ndim

  # ----------------------------------------------------------------- string form
  @classmethod
  def parse(cls, text: str | QuantSpec) -> QuantSpec:
    """Parses ``FORMAT[:GRANULARITY][:asym][:CALIBRATION][:stochastic][:scale=DTYPE]``."""
    if isinstance(text, QuantSpec):
      return text
    if not isinstance(text, str) or not text.strip():
      raise ValueError(f"Expected a quantization spec string, got {text!r}; write {_GRAMMAR}.")
    tokens = [t.strip().lower() for t in text.strip().split(":")]
    fmt, rest = tokens[0], tokens[1:]
    if fmt not in FORMATS:
      raise ValueError(f"Unknown format {fmt!r} in spec {text!r}; write {_GRAMMAR}.")
    kw: dict = {"format": fmt}
    for tok in rest:
      m_gran = re.fullmatch(r"(tensor|channel|token|g(\d+))(?:@(-?\d+))?", tok)
      m_pct = re.fullmatch(_PERCENTILE, tok)
      if m_gran:
        _set_once(kw, "granularity", "group" if m_gran.group(2) else m_gran.group(1), text)
        if m_gran.group(2):
          kw["group_size"] = int(m_gran.group(2))
        if m_gran.group(3) is not None:
          kw["axis"] = int(m_gran.group(3))
      elif tok in ("asym", "sym"):
        _set_once(kw, "symmetric", tok == "sym", text)
      elif tok in ("absmax", "minmax", "mse"):
        _set_once(kw, "calibration", tok, text)
      elif m_pct:
        _set_once(kw, "calibration", "percentile", text)
        kw["percentile"] = float(m_pct.group(1))
      elif tok in ("stochastic", "nearest"):
        _set_once(kw, "rounding", tok, text)
      elif tok.startswith("scale="):
        _set_once(kw, "scale_dtype", tok.removeprefix("scale="), text)
      else:
        raise ValueError(f"Unknown part {tok!r} in spec {text!r}; write {_GRAMMAR}.")
    return cls(**kw)

  def __str__(self) -> str:
    """The string form: ``QuantSpec.parse(str(spec)) == spec`` for every valid spec (a cast
    prints the fields it ignores too, when they are not the defaults)."""
    parts = [self.format]
    gran = {"group": f"g{self.group_size}"}.get(self.granularity, self.granularity)
    if self.axis is not None:
      gran += f"@{self.axis}"
    if gran != "channel":
      parts.append(gran)
    if self.symmetric != self.info.default_symmetric:
      parts.append("sym" if self.symmetric else "asym")
    if self.calibration == "percentile":
      parts.append(f"p{float_str(cast(float, self.percentile))}")
    elif self.calibration != "absmax":
      parts.append(self.calibration)
    if self.rounding != "nearest":
      parts.append(self.rounding)
    if self.scale_dtype != "f32":
      parts.append(f"scale={self.scale_dtype}")
    return ":".join(parts)

  # ----------------------------------------------------------------- sizes
  def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the scale (and zero point) kept for a tensor of `shape`.

    Scales keep the reduced axes with size 1 so they broadcast; for ``group`` granularity they
    broadcast against the grouped view ``shape[:a] + (n // G, G) + shape[a+1:]``.
    """
    shape = tuple(shape)
    ndim = len(shape)
    if self.granularity == "tensor" or ndim == 0:
      return (1,) * ndim
    axis = self.resolved_axis(ndim)
    if self.granularity == "channel":
      return tuple(d if i == axis else 1 for i, d in enumerate(shape))
    if self.granularity == "token":
      return tuple(1 if i == axis else d for i, d in enumerate(shape))
    check_group_size(self, shape)
    group = cast(int, self.group_size)  # __post_init__: a positive int for "group"
    return shape[:axis] + (shape[axis] // group, 1) + shape[axis + 1 :]

  def nbytes(self, shape: tuple[int, ...]) -> int:
    """Bytes that a tensor of `shape` takes quantized: values + scales + zero points."""
    shape = tuple(shape)
    if self.is_cast:
      return math.prod(shape) * self.info.storage.itemsize
    if self.info.packed:
      lead, last = (shape[:-1], shape[-1]) if shape else ((), 1)
      values = math.prod(lead) * ((last + 1) // 2)
    else:
      values = math.prod(shape) * self.info.storage.itemsize
    n_scales = math.prod(self.scale_shape(shape))
    scales = self.scale_storage.itemsize * n_scales
    return values + scales + (0 if self.symmetric else n_scales)


# ``pN``: a float as `float_str` prints it (``p99.9``, ``p100``, ``p1e-07``, ``p.5``).
_PERCENTILE = r"p((?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?)"


def float_str(x: float) -> str:
  """`x` in few digits that parse back to exactly `x`: ``%g`` when that is exact (``99.9``,
  ``100``), else the shortest repr (``99.99999``, ``1e-07``)."""
  short = f"{x:g}"
  return short if float(short) == x else repr(float(x))


def _set_once(kw: dict, key: str, value, text: str) -> None:
  if key in kw:
    raise ValueError(f"Spec {text!r} sets {key} twice; write {_GRAMMAR}.")
  kw[key] = value


def check_group_size(spec: QuantSpec, shape: tuple[int, ...], path: str = "") -> None:
  """Raises a ValueError naming `path` if `spec`'s group size does not divide its axis."""
  if spec.granularity != "group" or not shape:
    return
  axis = spec.resolved_axis(len(shape))
  n = shape[axis]
  group = cast(int, spec.group_size)  # __post_init__: a positive int for "group"
  if n % group:
    divisors = [d for d in range(min(n, group), 0, -1) if n % d == 0][:3]
    where = f"{path}: " if path else ""
    raise ValueError(
      f"{where}group size {spec.group_size} does not divide axis {axis} of size {n} "
      f"(shape {tuple(shape)}). Use a group size that divides {n} (e.g. "
      f"{', '.join(map(str, divisors))}), or give this parameter a per-channel spec in a rule."
    )


SpecLike = QuantSpec | str


@overload
def as_spec(spec: SpecLike) -> QuantSpec: ...
@overload
def as_spec(spec: None) -> None: ...
@overload
def as_spec(spec: SpecLike | None) -> QuantSpec | None: ...
def as_spec(spec: SpecLike | None) -> QuantSpec | None:
  """Accepts a `QuantSpec`, its string form, or None."""
  if spec is None or isinstance(spec, QuantSpec):
    return spec
  if isinstance(spec, str):
    return QuantSpec.parse(spec)
  raise TypeError(f"Expected a QuantSpec or a spec string such as 'int8', got {spec!r}.")
