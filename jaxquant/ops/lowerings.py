"""Integer lowerings of a quantized contraction, chosen per backend and shape.

Measured with XLA:CPU (jax 0.10, 2 cores; `experiments/bench_ops.py`), a ``4096 × 4096``
``dot_general(i8, i8) -> i32``:

* with one row (``M = 1``) takes a slow matrix-vector path, ~25× slower than with two rows,
  so CPU pads a single row to two (`row_pad`);
* is ~3× faster when the weight codes are stored contraction-minor (``[out, in]`` for a Dense
  kernel, `serving_layout`) than contraction-major (``[in, out]``); a transpose inside the
  graph costs more than the dot, so the layout is chosen once, outside it.

Lowerings (`Lowering.name`):

* ``int8``: ``dot_general(i8, i8) -> i32`` then ``acc · s_x · s_w``. With weight-only int8
  weights and `lowering_scope(dynamic_int8=True)` the activations are quantized on the fly,
  per token (W8A8-dynamic, a numerics change that is opt-in).
* ``w4a8``: packed 4-bit weight codes widened to int8 in the graph (nibble shifts, no
  interleave: the low nibbles meet the even contraction indices, the high ones the odd), int8
  activations, ``i8 × i8 -> i32`` dots. Group scales along the contraction are exact: the
  activations are spread block-diagonally, one row per (token, group), so a single dot yields
  the int32 sum of every group, ``out = s_x Σ_g s_g (acc_g − z_g Σ_{k∈g} q_x)``. That costs
  ``groups ×`` the rows, so it is chosen for few tokens only.
* ``kernel``: the compiled CPU kernels (`jaxquant.ops.cpu_kernels`, XLA FFI) on the stored
  ``[in, out]`` codes: weight-only int8 / 4-bit (float activations, exact group scales and
  zero points) and W8A8 (exact int32 sums). Chosen on CPU for up to `KERNEL_MAX_ROWS` rows
  (`KERNEL_MAX_ROWS_INT8` for W8A8) when the library is built; pure XLA everywhere else.
* ``dequant`` / ``float``: weights dequantized in the graph, float dot.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import cast

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxquant.packing import pack_4bit
from jaxquant.qarray import QArray, codes
from jaxquant.spec import QuantSpec

LOWERINGS = ("kernel", "int8", "w4a8", "dequant", "float")
#: Rows × groups up to which `w4a8` with group scales is chosen automatically (block-diagonal
#: activations make its dot ``groups ×`` taller; beyond this dequantization was faster).
W4A8_MAX_ROWS = 512
DYNAMIC_INT8 = QuantSpec.parse("int8:token")
#: Rows (tokens) up to which the compiled CPU kernels are chosen automatically: weight-only
#: (decode and short prompts) and W8A8, whose XLA int8 dot wins from a few rows on
#: (`experiments/bench_ops.py` measures both).
KERNEL_MAX_ROWS = 64
KERNEL_MAX_ROWS_INT8 = 4


@dataclasses.dataclass(frozen=True)
class Options:
  """What `lowering_scope` sets: a forced lowering, and opt-in dynamic int8 activations."""

  force: str | None = None
  dynamic_int8: bool = False
  kernels: bool = True


_DEFAULT_OPTIONS = Options()  # frozen: safe to share as the default
_OPTIONS: contextvars.ContextVar[Options] = contextvars.ContextVar(
  "jaxquant_lowering", default=_DEFAULT_OPTIONS
)


def current_options() -> Options:
  return _OPTIONS.get()


@contextlib.contextmanager
def lowering_scope(
  force: str | None = None, *, dynamic_int8: bool | None = None, kernels: bool | None = None
):
  """Sets how every `qdot_general` traced inside the scope lowers.

  Args:
    force: one of `LOWERINGS` for every serve-mode contraction with quantized weights (a
      `ValueError` says why where it cannot apply); None: choose by backend and shape.
    dynamic_int8: serve weight-only int8 / 4-bit weights with activations quantized to int8
      per token on the fly (``int8`` W8A8-dynamic, ``w4a8``) where that is faster. Changes the
      numerics (activation rounding), hence opt-in.
    kernels: whether automatic choices may take the compiled CPU kernels (``kernel``; see
      `jaxquant.ops.cpu_kernels`). False keeps every graph pure XLA (portable artifacts).
  """
  old = _OPTIONS.get()
  if force is not None and force not in LOWERINGS:
    raise ValueError(f"lowering {force!r}: choose one of {LOWERINGS} (or None for automatic).")
  new = Options(
    force if force is not None else old.force,
    old.dynamic_int8 if dynamic_int8 is None else dynamic_int8,
    old.kernels if kernels is None else kernels,
  )
  token = _OPTIONS.set(new)
  try:
    yield new
  finally:
    _OPTIONS.reset(token)


# --------------------------------------------------------------------------- layout
def contraction_minor(q: QArray, contracting: tuple[int, ...] = (0,)) -> QArray:
  """`q` with its codes stored so the `contracting` axes come last (``perm`` set).

  For a Dense kernel ``[in, out]`` the stored codes become ``[out, in]`` (4-bit ones packed
  along ``in``). Values are unchanged: ``dequantize`` gives the same tensor.
  """
  free = tuple(a for a in range(q.ndim) if a not in contracting)
  perm = free + tuple(contracting)
  if q.spec.is_cast or q.axis_order == perm:
    return q
  c = jnp.transpose(codes(q), perm)
  if q.packed:
    return dataclasses.replace(q, values=pack_4bit(c), pad=c.shape[-1] % 2, perm=perm)
  return dataclasses.replace(q, values=c, perm=perm)


def serving_layout(tree):
  """Stores every 2-D int8 / 4-bit integer `QArray` in ``tree`` contraction-minor.

  Pure: params in, params out. Dense kernels ``[in, out]`` keep their logical shape and
  values; their codes are stored ``[out, in]``, the layout XLA:CPU's integer dot is ~3×
  faster with. Other leaves pass through.
  """

  def fix(leaf):
    if isinstance(leaf, QArray) and leaf.ndim == 2 and leaf.spec.info.kind == "int":
      return contraction_minor(leaf, (0,))
    return leaf

  return jax.tree.map(fix, tree, is_leaf=lambda x: isinstance(x, QArray))


# --------------------------------------------------------------------------- shapes
def row_pad(rows: int, backend: str) -> int:
  """Rows to add so the integer dot avoids XLA:CPU's slow single-row path."""
  return 1 if backend == "cpu" and rows == 1 else 0


def is_dense(lhs_ndim: int, rhs_ndim: int, dims) -> bool:
  """Whether the contraction is ``[..., K] · [K, N]``-like: one axis, last of lhs, no batch."""
  (lc, rc), (lb, _) = dims
  return rhs_ndim == 2 and not lb and lc == (lhs_ndim - 1,) and len(rc) == 1


def _stored_dims(q: QArray, axes: tuple[int, ...]) -> tuple[int, ...]:
  order = q.axis_order
  return tuple(order.index(a) for a in axes)


def layout_note(q: QArray, contracting: tuple[int, ...]) -> str:
  minor = _stored_dims(q, contracting) == tuple(range(q.ndim - len(contracting), q.ndim))
  return "contraction-minor codes" if minor else "contraction-major codes (serving_layout: ~3x)"


# --------------------------------------------------------------------------- int8
def int8_dot(q_lhs: jax.Array, q: QArray, dims, pad: int) -> jax.Array:
  """``dot_general(q_lhs, codes(q), dims) -> i32`` on the stored layout of `q`.

  Output as `lax.dot_general` orders it for the logical operands. With `pad`, a Dense-like
  contraction flattens the leading axes of `q_lhs` into rows and adds `pad` zero rows
  (dropped after).
  """
  (lc, rc), (lb, rb) = dims
  values = q.values
  src, dst = _stored_dims(q, rc), _stored_dims(q, rb)
  if pad and is_dense(q_lhs.ndim, q.ndim, dims):
    x = q_lhs.reshape(-1, q_lhs.shape[-1])
    rows = x.shape[0]
    x = jnp.pad(x, ((0, pad), (0, 0)))
    acc = lax.dot_general(x, values, (((1,), src), ((), ())), preferred_element_type=jnp.int32)
    return acc[:rows].reshape(q_lhs.shape[:-1] + (acc.shape[-1],))
  acc = lax.dot_general(q_lhs, values, ((lc, src), (lb, dst)), preferred_element_type=jnp.int32)
  if q.perm is None:
    return acc
  # rhs free axes come out in stored order: put them back in logical order
  stored_free = [a for a in q.axis_order if a not in rc and a not in rb]
  logical_free = sorted(stored_free)
  n_lead = acc.ndim - len(stored_free)
  order = tuple(range(n_lead)) + tuple(n_lead + stored_free.index(a) for a in logical_free)
  return jnp.transpose(acc, order)


# --------------------------------------------------------------------------- w4a8
def w4a8_reason(q: QArray, lhs_ndim: int, dims) -> str | None:
  """Why packed 4-bit `q` cannot take `w4a8` (None if it can)."""
  spec = q.spec
  if spec.info.kind != "int" or spec.info.bits != 4:
    return f"weights are {spec.format}, not 4-bit integers"
  if not is_dense(lhs_ndim, q.ndim, dims):
    return "w4a8 takes a 2-D weight contracted on one axis with the last activation axis"
  (_, (rc,)), _ = dims
  if spec.granularity == "group":
    if spec.resolved_axis(2) != rc:
      return "weight groups run along the free axis"
    if cast(int, spec.group_size) % 2:  # QuantSpec.__post_init__: an int for "group"
      return "odd group size"
  elif spec.granularity == "channel" and spec.resolved_axis(2) == rc:
    return "weight scales vary along the contraction"
  return None


def _nibbles(packed: jax.Array, signed: bool) -> tuple[jax.Array, jax.Array]:
  """``(low, high)`` nibbles of ``uint8`` codes as int8 (sign-extended when `signed`)."""
  s = lax.bitcast_convert_type(packed, jnp.int8)
  four = jnp.int8(4)
  if signed:
    return lax.shift_right_arithmetic(lax.shift_left(s, four), four), lax.shift_right_arithmetic(
      s, four
    )
  return s & jnp.int8(0xF), lax.shift_right_logical(s, four)


def _block_diag(x: jax.Array, groups: int) -> jax.Array:
  """``[M, K]`` to ``[M · groups, K]``: row ``(m, g)`` keeps only group ``g`` of row ``m``."""
  m, k = x.shape
  if groups == 1:
    return x
  eye = np.eye(groups, dtype=bool).reshape(1, groups, groups, 1)
  blocks = jnp.where(eye, x.reshape(m, 1, groups, k // groups), jnp.zeros((), x.dtype))
  return blocks.reshape(m * groups, k)


def _scales_gn(t: jax.Array | None, q: QArray, rc: int, groups: int) -> jax.Array | None:
  """Scale or zero point of 2-D `q` as ``[groups, N]`` (N: the free axis)."""
  if t is None:
    return None
  n = q.shape[1 - rc]
  if q.spec.granularity == "group":
    t = t.reshape((groups, n) if rc == 0 else (n, groups))
    return t if rc == 0 else t.T
  t = jnp.broadcast_to(t, q.shape)
  t = t[0] if rc == 0 else t[:, 0]
  return t.reshape(1, n)


def w4a8_dot(q_lhs: jax.Array, s_lhs: jax.Array, q: QArray, dims, pad: int) -> jax.Array:
  """``dequantize(q_lhs) · dequantize(q)`` in float32 through ``i8 × i8 -> i32`` dots.

  `q_lhs` int8 ``[..., K]`` with scale `s_lhs` (per row ``[..., 1]`` or a scalar); `q` a 2-D
  packed 4-bit QArray contracted on axis ``rc``. Returns ``[..., N]`` float32.
  """
  (_, (rc,)), _ = dims
  k, n = q.shape[rc], q.shape[1 - rc]
  lead = q_lhs.shape[:-1]
  x = q_lhs.reshape(-1, k)
  rows = x.shape[0]
  x = jnp.pad(x, ((0, pad), (0, 0))) if pad else x
  m = x.shape[0]
  groups = k // q.spec.group_size if q.spec.granularity == "group" else 1
  if not q.packed:  # unpacked 4-bit codes: widen trivially, one dot per group block
    w = codes(q).astype(jnp.int8)
    halves = [(_block_diag(x, groups), w, rc)]
    interleave = False
  else:
    lo, hi = _nibbles(q.values, q.spec.info.signed)
    packed_axis = q.axis_order[-1]
    c_stored = _stored_dims(q, (rc,))[0]
    if packed_axis == rc:  # nibbles split the contraction: even / odd indices
      xk = jnp.pad(x, ((0, 0), (0, k % 2)))
      halves = [
        (_block_diag(xk[:, 0::2], groups), lo, c_stored),
        (_block_diag(xk[:, 1::2], groups), hi, c_stored),
      ]
      interleave = False
    else:  # nibbles split the output columns: even / odd
      xb = _block_diag(x, groups)
      halves = [(xb, lo, c_stored), (xb, hi, c_stored)]
      interleave = True
  accs = [
    lax.dot_general(xb, w, (((1,), (c,)), ((), ())), preferred_element_type=jnp.int32)
    for xb, w, c in halves
  ]
  if interleave:
    acc = jnp.stack(accs, axis=-1).reshape(accs[0].shape[0], -1)[:, :n]
  else:
    acc = sum(accs[1:], accs[0])
  acc = acc.reshape(m, groups, n).astype(jnp.float32)
  zero = _scales_gn(q.zero_point, q, rc, groups)
  if zero is not None:
    xsum = jnp.sum(x.astype(jnp.int32).reshape(m, groups, k // groups), axis=-1)
    acc = acc - xsum.astype(jnp.float32)[:, :, None] * zero.astype(jnp.float32)[None]
  scale = _scales_gn(q.scale, q, rc, groups)
  out = jnp.einsum("mgn,gn->mn", acc, jnp.asarray(scale).astype(jnp.float32))[:rows]
  s = jnp.asarray(s_lhs, jnp.float32)
  s = s.reshape(-1, 1) if s.size == rows else s.reshape(())
  return (out * s).reshape(lead + (n,))


def free_axes(ndim: int, *used: tuple[int, ...]) -> tuple[int, ...]:
  """Axes of an ``ndim``-d operand that are in none of `used` (contracting, batch)."""
  taken = {a for axes in used for a in axes}
  return tuple(a for a in range(ndim) if a not in taken)


def rescale(
  acc: jax.Array,
  s_lhs: jax.Array,
  s_rhs: jax.Array,
  lhs_shape: tuple[int, ...],
  rhs_ndim: int,
  dims,
) -> jax.Array:
  """``acc · s_lhs · s_rhs`` in float32, the scales moved to `dot_general`'s output layout
  ``[batch..., lhs free..., rhs free...]``.

  `s_lhs` broadcasts against ``lhs`` with size 1 along the contraction (per token or one
  scalar); `s_rhs` has the weights' rank with size 1 along the contraction (per channel).
  """
  (lc, rc), (lb, rb) = dims
  lfree, rfree = free_axes(len(lhs_shape), lc, lb), free_axes(rhs_ndim, rc, rb)
  s_l = jnp.broadcast_to(s_lhs, tuple(1 if a in lc else d for a, d in enumerate(lhs_shape)))
  s_l = jnp.transpose(s_l, lb + lfree + lc).reshape(
    tuple(s_l.shape[a] for a in lb + lfree) + (1,) * len(rfree)
  )
  s_r = jnp.transpose(s_rhs, rb + rfree + rc).reshape(
    tuple(s_rhs.shape[a] for a in rb) + (1,) * len(lfree) + tuple(s_rhs.shape[a] for a in rfree)
  )
  return acc.astype(jnp.float32) * s_l.astype(jnp.float32) * s_r.astype(jnp.float32)


def int8_act_reason(spec: QuantSpec) -> str | None:
  """Why activations under `spec` cannot be int8 codes of an integer dot (None if they can)."""
  if spec.format != "int8" or not spec.symmetric:
    return f"activations are {spec}, not symmetric int8"
  if spec.granularity not in ("token", "tensor"):
    return f"activation granularity {spec.granularity} varies along the contraction"
  return None


def flat_rows(shape: tuple[int, ...]) -> int:
  return math.prod(shape[:-1]) if shape else 1
