"""`qdot_general`: the one seam every quantized contraction goes through.

Operands are float arrays or `QArray`s; `lhs_spec` quantizes the activations. Two modes:

* ``serve``: the integer path when it applies — activations quantized to int8 (one scale per
  token, i.e. per slice over the contracting axes, or one static scale), weights int8 with
  scales constant along the contraction — lowers to ``dot_general(i8, i8) -> i32`` followed by
  ``acc · s_lhs · s_rhs``. Otherwise the weights are dequantized inside the jitted computation
  (weight-only; 4-bit codes are unpacked in the graph) and the activations, if a spec asks, are
  quantized and dequantized.
* ``fake``: ``dot_general(fake_quant(lhs), fake_quant(rhs))`` with straight-through
  gradients, using the same specs and the same scale computation as serve mode, so
  ``serve ≈ fake`` up to float rounding: ``s_l s_r Σ q_l q_r = Σ (s_l q_l)(s_r q_r)``. When
  both sides are symmetric int8 with scales constant along the contraction, that identity
  lets the fake forward run the serve lowering itself (``int8-ste``, see `fake_int8`).

Serve-mode integer lowerings (``int8`` with row padding and layout, ``w4a8``) and how they
are chosen per backend and shape live in `jaxquant.ops.lowerings`; `lowering=` (or
`lowering_scope`) forces one. `explain` says which lowering a call takes, and why.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Literal, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxquant.numerics import (
  dequantize,
  fake_quant,
  fake_quant_along,
  quantize,
  quantize_along,
)
from jaxquant.ops import cpu_kernels as ck
from jaxquant.ops import lowerings as low
from jaxquant.ops import pallas_kernels as pk
from jaxquant.ops.fake_int8 import ste_int8_dot_general, ste_int8_reason
from jaxquant.qarray import QArray
from jaxquant.spec import QuantSpec, SpecLike, as_spec

log = logging.getLogger("jaxquant.ops")

Mode = Literal["serve", "fake"]
DotDims = tuple[tuple[tuple[int, ...], tuple[int, ...]], tuple[tuple[int, ...], tuple[int, ...]]]


@dataclasses.dataclass(frozen=True)
class Lowering:
  """The chosen way to compute a quantized contraction."""

  name: Literal["kernel", "int8", "int8-ste", "w4a8", "dequant", "float"]
  reason: str
  pad_rows: int = 0  # zero rows added before the integer dot (XLA:CPU's slow 1-row path)
  activations: str | None = None  # int8 activation spec of the integer paths ("dynamic" added)
  # ``kernel`` only: int8 activations (W8A8, `cpu_kernels.int8_matmul`) or float ones
  # (weight-only, `cpu_kernels.weight_only_matmul`)

  def __str__(self) -> str:
    pad = f" [+{self.pad_rows} row pad]" if self.pad_rows else ""
    return f"{self.name}: {self.reason}{pad}"


# --------------------------------------------------------------------------- helpers
def _norm_dims(dims: DotDims, lhs_ndim: int, rhs_ndim: int) -> DotDims:
  (lc, rc), (lb, rb) = dims
  norm = lambda axes, n: tuple(int(a) % n for a in axes)
  return (norm(lc, lhs_ndim), norm(rc, rhs_ndim)), (norm(lb, lhs_ndim), norm(rb, rhs_ndim))


def activation_axes(spec: QuantSpec, ndim: int, contracting: tuple[int, ...]) -> tuple[int, ...]:
  """Axes one activation scale covers: the contraction (per token) or everything (tensor)."""
  if spec.granularity == "tensor":
    return tuple(range(ndim))
  if spec.granularity == "token":
    return contracting
  raise ValueError(
    f"Activation spec {spec}: activations take 'token' (dynamic, one scale per token) or "
    "'tensor' (one scale, static when calibrated) granularity."
  )


def _constant_along(scale: jax.Array | None, axes: tuple[int, ...]) -> bool:
  return scale is None or all(scale.shape[a] == 1 for a in axes)


def _int8_weights_reason(rhs: QArray, contracting: tuple[int, ...]) -> str | None:
  """Why `rhs` cannot take the int8 path (None if it can)."""
  spec = rhs.spec
  if spec.format != "int8":
    return f"weights are {spec.format}, not int8"
  if not spec.symmetric:
    return "weights have zero points"
  if spec.granularity == "group":
    return "weight scales vary along the contraction (groups)"
  if not _constant_along(rhs.scale, contracting):
    return "weight scales vary along the contraction"
  return None


def choose_lowering(
  lhs_ndim: int,
  rhs,
  dims: DotDims,
  lhs_spec: QuantSpec | None,
  mode: Mode = "serve",
  rhs_spec: QuantSpec | None = None,
  *,
  lhs_shape: tuple[int, ...] | None = None,
  lowering: str | None = None,
  backend: str | None = None,
) -> Lowering:
  """The lowering `qdot_general` takes for these operands (see `explain`).

  `lhs_shape` (rows to pad, rows × groups for ``w4a8``), `lowering` (force one; default from
  `lowering_scope`) and `backend` (default ``jax.default_backend()``) refine serve mode.
  """
  rhs_ndim = getattr(rhs, "ndim", np.ndim(rhs))
  dims = _norm_dims(dims, lhs_ndim, rhs_ndim)
  (_, rc), _ = dims
  if mode == "fake":
    why = ste_int8_reason(lhs_spec, rhs_spec, rhs_ndim, rc)
    if why is None and not isinstance(rhs, QArray):
      return Lowering(
        "int8-ste",
        "fake W8A8 on the serve path: i8 x i8 -> i32 forward, straight-through float backward",
      )
    return Lowering("float", "fake quantization: float dot of quantize-dequantized operands")
  if not isinstance(rhs, QArray):
    if lhs_spec is None:
      return Lowering("float", "no quantized operand")
    return Lowering("float", "float weights; activations quantize-dequantized")
  return _choose_serve(lhs_ndim, rhs, dims, lhs_spec, lhs_shape, lowering, backend)


def _kernel_choice(
  lhs_ndim, rhs: QArray, dims, lhs_spec, dynamic: bool, backend: str
) -> tuple[str | None, str]:
  """``(int8 activation spec or None for weight-only, why not)`` for the compiled CPU kernels
  (the Pallas ones off CPU); ``why not`` is '' when one applies."""
  (_, rc), _ = dims
  if not jax.sharding.get_abstract_mesh().empty:
    return None, "under a mesh (jax.set_mesh): the kernels are not partitioned"
  if backend != "cpu":
    return _pallas_choice(lhs_ndim, rhs, dims, lhs_spec, dynamic, backend)
  if not low.is_dense(lhs_ndim, rhs.ndim, dims) or rc != (0,):
    return None, "the compiled kernels take a Dense contraction [..., K] x [K, N]"
  if not ck.available():
    return None, ck.unavailable_reason()
  if lhs_spec is None:
    if dynamic and _int8_weights_reason(rhs, rc) is None and ck.int8_reason(rhs) is None:
      return f"{low.DYNAMIC_INT8} (dynamic)", ""
    return None, ck.weight_only_reason(rhs) or ""
  why = low.int8_act_reason(lhs_spec) or _int8_weights_reason(rhs, rc) or ck.int8_reason(rhs)
  return str(lhs_spec), why or ""


def _pallas_choice(
  lhs_ndim, rhs: QArray, dims, lhs_spec, dynamic: bool, backend: str
) -> tuple[str | None, str]:
  """`_kernel_choice` on GPU and TPU: the Pallas kernels (`pallas_kernels`), whatever the rows."""
  act = lhs_spec or (low.DYNAMIC_INT8 if dynamic and backend == "tpu" else None)
  shape = (1,) * (lhs_ndim - 1) + (rhs.shape[0] if rhs.ndim else 1,)
  why = pk.pallas_reason(rhs, shape, backend, dims, act)
  return (None if act is None else f"{act}{'' if lhs_spec else ' (dynamic)'}"), why or ""


def _kernel_lowering(rhs: QArray, act: str | None, backend: str = "cpu") -> Lowering:
  if backend != "cpu":
    if act is None:
      how = f"weight-only {rhs.spec}: codes dequantized in the kernel, float32 sums"
    else:
      how = f"i8 x i8 -> i32 on the MXU, rescaled by {act} x {rhs.spec}"
    tool = "Triton" if backend in pk.GPU_BACKENDS else "Mosaic"
    return Lowering("kernel", f"Pallas {tool} kernel ({how})", activations=act)
  if act is None:
    return Lowering(
      "kernel",
      f"compiled CPU kernel {ck.WQ_TARGET}: {rhs.spec} codes read once in their stored "
      "[in, out] layout and widened in registers (float activations, exact scales)",
    )
  return Lowering(
    "kernel",
    f"compiled CPU kernel {ck.INT8_TARGET}: i8 x i8 summed exactly in int32 on the stored "
    f"[in, out] codes, rescaled by {act} x {rhs.spec}",
    activations=act,
  )


def _choose_serve(lhs_ndim, rhs: QArray, dims, lhs_spec, lhs_shape, force, backend) -> Lowering:
  """Serve mode with quantized weights: integer lowerings where they apply and pay."""
  (_, rc), _ = dims
  opts = low.current_options()
  force = force or opts.force
  backend = backend or jax.default_backend()
  if force in ("dequant", "float"):
    return Lowering("dequant", f"forced: {rhs.spec} weights dequantized in the graph")
  dense = low.is_dense(lhs_ndim, rhs.ndim, dims)
  rows = low.flat_rows(lhs_shape) if lhs_shape is not None and dense else None
  if force == "kernel" or (force is None and opts.kernels):
    k_act, k_why = _kernel_choice(lhs_ndim, rhs, dims, lhs_spec, opts.dynamic_int8, backend)
    if force == "kernel" and k_why:
      raise ValueError(f"lowering='kernel' cannot apply: {k_why}.")
    limit = low.KERNEL_MAX_ROWS if k_act is None else low.KERNEL_MAX_ROWS_INT8
    if not k_why and (force == "kernel" or rows is None or rows <= limit):
      return _kernel_lowering(rhs, k_act, backend)
  dynamic = lhs_spec is None and (force in ("int8", "w4a8") or opts.dynamic_int8)
  act = low.DYNAMIC_INT8 if dynamic else lhs_spec
  if act is None:
    return Lowering("dequant", f"weight-only {rhs.spec}: dequantized in the graph")
  act_name = f"{act} (dynamic)" if dynamic else str(act)
  act_why = low.int8_act_reason(act)
  int8_why = act_why or _int8_weights_reason(rhs, rc)
  w4_why = act_why or low.w4a8_reason(rhs, lhs_ndim, dims)
  pad = low.row_pad(rows, backend) if rows is not None else 0
  groups = rhs.shape[rc[0]] // rhs.spec.group_size if rhs.spec.granularity == "group" else 1
  if force == "int8" and int8_why:
    raise ValueError(f"lowering='int8' cannot apply: {int8_why}.")
  if force == "w4a8" and w4_why:
    raise ValueError(f"lowering='w4a8' cannot apply: {w4_why}.")
  if int8_why is None and force != "w4a8":
    what = "weight-only int8 served W8A8-dynamic: " if dynamic else ""
    return Lowering(
      "int8",
      f"{what}i8 x i8 -> i32 dot_general ({low.layout_note(rhs, rc)}), "
      f"rescaled by {act_name} x {rhs.spec}",
      pad,
      act_name,
    )
  auto_w4 = dynamic and backend == "cpu"
  if w4_why is None and (force == "w4a8" or auto_w4):
    if force == "w4a8" or rows is None or groups == 1 or rows * groups <= low.W4A8_MAX_ROWS:
      return Lowering(
        "w4a8",
        f"{rhs.spec} codes widened to int8 in the graph, {act_name} "
        f"activations, i8 x i8 -> i32 dot ({groups} scale group(s) along the "
        f"contraction, block-diagonal rows)",
        pad,
        act_name,
      )
    return Lowering(
      "dequant",
      f"w4a8 would need {rows} x {groups} rows > "
      f"{low.W4A8_MAX_ROWS}: weights dequantized in the graph",
    )
  if dynamic:
    return Lowering("dequant", f"weight-only {rhs.spec}: dequantized in the graph")
  why = int8_why if rhs.spec.format == "int8" or w4_why is None else w4_why
  return Lowering("dequant", f"{why}: weights dequantized in the graph, activations simulated")


# --------------------------------------------------------------------------- the seam
def qdot_general(
  lhs: jax.Array,
  rhs: jax.Array | QArray,
  dimension_numbers: DotDims,
  precision=None,
  preferred_element_type=None,
  *,
  lhs_spec: SpecLike | None = None,
  rhs_spec: SpecLike | None = None,
  lhs_scale: jax.Array | None = None,
  lhs_zero_point: jax.Array | None = None,
  mode: Mode = "serve",
  out_dtype=None,
  lowering: str | None = None,
  **kwargs,
) -> jax.Array:
  """`lax.dot_general` with quantized operands.

  Args:
    lhs: float activations ``[..., K]`` (any layout `dimension_numbers` names).
    rhs: float weights, or a `QArray` (serve mode).
    dimension_numbers: as for `lax.dot_general`.
    precision, preferred_element_type: as for `lax.dot_general` (float paths).
    lhs_spec: activation spec: ``token`` granularity (dynamic, one scale per slice over the
      contracting axes) or ``tensor`` (one scale; pass `lhs_scale` for a static one).
    rhs_spec: weight spec for float `rhs` (fake mode quantizes on the fly).
    lhs_scale, lhs_zero_point: static activation scale, shaped to broadcast against `lhs`.
    mode: ``serve`` or ``fake``.
    out_dtype: result dtype (default: `lhs`'s).
    lowering: force a serve lowering (``int8``, ``w4a8``, ``dequant``); default: chosen by
      backend and shape (`lowering_scope`, `explain`).
  Returns:
    ``[batch..., lhs free..., rhs free...]`` as `lax.dot_general` orders them.
  """
  del kwargs  # e.g. out_sharding from newer Flax layers: placement is left to XLA
  lhs_spec, rhs_spec = as_spec(lhs_spec), as_spec(rhs_spec)
  lhs = jnp.asarray(lhs)
  out_dtype = out_dtype or preferred_element_type or lhs.dtype
  rhs_ndim = rhs.ndim if isinstance(rhs, QArray) else jnp.ndim(rhs)
  dims = _norm_dims(dimension_numbers, lhs.ndim, rhs_ndim)
  (lc, _), _ = dims
  if mode == "serve" and rhs_spec is not None and not isinstance(rhs, QArray):
    rhs = quantize(rhs, rhs_spec)
  chosen = choose_lowering(
    lhs.ndim, rhs, dims, lhs_spec, mode, rhs_spec, lhs_shape=tuple(lhs.shape), lowering=lowering
  )
  log.debug("qdot_general %s x %s: %s", lhs.shape, getattr(rhs, "shape", None), chosen)

  if chosen.name == "int8-ste":
    # `ste_int8_reason` chose it: both specs are set (symmetric int8)
    lhs_q, rhs_q = cast(QuantSpec, lhs_spec), cast(QuantSpec, rhs_spec)
    axes = activation_axes(lhs_q, lhs.ndim, lc)
    out = ste_int8_dot_general(lhs, jnp.asarray(rhs), dims, lhs_q, rhs_q, axes, lhs_scale)
    return out.astype(out_dtype)

  if chosen.name == "kernel":  # `_choose_serve` picks it only for QArray weights
    return _kernel_dot(lhs, cast(QArray, rhs), dims, chosen, lhs_spec, lhs_scale).astype(out_dtype)

  if chosen.name in ("w4a8", "int8"):  # int8 activations: static scale, or dynamic
    # `_choose_serve` picks the integer lowerings only for QArray weights
    q_rhs = cast(QArray, rhs)
    act = lhs_spec or low.DYNAMIC_INT8
    q_lhs, s_lhs, _ = quantize_along(
      lhs, act, activation_axes(act, lhs.ndim, lc), scale=lhs_scale if lhs_spec else None
    )
    if chosen.name == "w4a8":
      return low.w4a8_dot(q_lhs, s_lhs, q_rhs, dims, chosen.pad_rows).astype(out_dtype)
    acc = low.int8_dot(q_lhs, q_rhs, dims, chosen.pad_rows)
    s_rhs = cast(jax.Array, q_rhs.scale)  # int8 weights always keep a scale (QArray.validate)
    return low.rescale(acc, s_lhs, s_rhs, tuple(lhs.shape), q_rhs.ndim, dims).astype(out_dtype)

  # float paths: weights dequantized (or fake-quantized), activations quantize-dequantized
  w = float_weights(rhs, rhs_spec, lhs.dtype)
  x = lhs
  if lhs_spec is not None:
    axes = activation_axes(lhs_spec, lhs.ndim, lc)
    x = fake_quant_along(lhs, lhs_spec, axes, scale=lhs_scale, zero_point=lhs_zero_point)
  out = lax.dot_general(
    x, w.astype(x.dtype), dims, precision=precision, preferred_element_type=preferred_element_type
  )
  return out.astype(out_dtype)


def _kernel_dot(
  lhs: jax.Array, q: QArray, dims, chosen: Lowering, lhs_spec, lhs_scale
) -> jax.Array:
  """A Dense contraction ``lhs [..., K] · q [K, N]`` by the compiled CPU kernels (pure-XLA
  lowerings on other platforms), or on a GPU / TPU backend by the Pallas kernels
  (`pallas_kernels`), float32 ``[..., N]``."""
  lead, k, n = lhs.shape[:-1], lhs.shape[-1], q.shape[1]
  if jax.default_backend() != "cpu":  # the backend `_choose_serve` chose for
    act = None if chosen.activations is None else (lhs_spec or low.DYNAMIC_INT8)
    return pk.pallas_matmul(lhs, q, lhs_spec=act, out_dtype=jnp.float32)
  if chosen.activations is None:
    x = lhs.reshape(-1, k).astype(jnp.float32)
    y = ck.weight_only_matmul(x, q, lambda: jnp.dot(x, dequantize(q, jnp.float32)))
    return y.reshape(lead + (n,))
  act = lhs_spec or low.DYNAMIC_INT8
  q_lhs, s_lhs, _ = quantize_along(
    lhs, act, activation_axes(act, lhs.ndim, (lhs.ndim - 1,)), scale=lhs_scale if lhs_spec else None
  )
  s_rows = jnp.broadcast_to(jnp.asarray(s_lhs, jnp.float32), lead + (1,)).reshape(-1)
  s_rhs = cast(jax.Array, q.scale)

  def fallback() -> jax.Array:
    acc = low.int8_dot(q_lhs, q, dims, 0)
    return low.rescale(acc, s_lhs, s_rhs, tuple(lhs.shape), 2, dims).reshape(-1, n)

  y = ck.int8_matmul(q_lhs.reshape(-1, k), s_rows, q, fallback)
  return y.reshape(lead + (n,))


def float_weights(rhs, rhs_spec: QuantSpec | None, dtype) -> jax.Array:
  """Weights for a float contraction: dequantized QArray, fake-quantized, or as they are."""
  if isinstance(rhs, QArray):
    return dequantize(rhs, dtype)
  if rhs_spec is not None:
    return fake_quant(jnp.asarray(rhs), rhs_spec)
  return jnp.asarray(rhs)


def explain(
  lhs: jax.Array | jax.ShapeDtypeStruct,
  rhs,
  dimension_numbers: DotDims | None = None,
  lhs_spec: SpecLike | None = None,
  mode: Mode = "serve",
  rhs_spec: SpecLike | None = None,
  lowering: str | None = None,
  backend: str | None = None,
) -> Lowering:
  """Which lowering `qdot_general` picks for these operands, and why.

  `dimension_numbers` defaults to contracting the last axis of `lhs` with the first of `rhs`
  (a Dense layer).
  """
  if dimension_numbers is None:
    dimension_numbers = (((len(lhs.shape) - 1,), (0,)), ((), ()))
  return choose_lowering(
    len(lhs.shape),
    rhs,
    dimension_numbers,
    as_spec(lhs_spec),
    mode,
    as_spec(rhs_spec),
    lhs_shape=tuple(lhs.shape),
    lowering=lowering,
    backend=backend,
  )
