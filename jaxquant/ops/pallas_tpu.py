"""Quantized matmuls on the TPU's MXU: a Pallas (Mosaic) kernel for int8 and 4-bit weights.

Activations are int8 codes with one scale per token (W8A8 / W4A8: ``i8 × i8 → i32`` on the
MXU, exact integer sums) or float (W8A16 / W4A16: codes widened to the activation dtype,
float32 accumulation). Weights are a 2-D ``[K, N]`` int8 / uint8 / int4 / uint4 QArray stored
``[K, N]`` (`pallas_common.KernelWeights`); 4-bit codes stay packed two a byte along ``N``
and are unpacked in VMEM by shifts: the low nibbles are the even output columns, the high ones
the odd, so the kernel computes both halves from one read of the bytes and the caller
interleaves the two ``[M, N/2]`` results.

For integer activations ``a`` (scale ``s_x``) and per-channel weight scales the result is

    out = float32(Σ_k a[m, k] q[k, n] − z[n] Σ_k a[m, k]) · s[n] · s_x[m]

with the integer sums exact in int32; with group scales along ``K`` (one group per K block),
``out = (Σ_g float32(Σ_{k∈g} a q − z_g Σ_{k∈g} a) · s_g) · s_x`` summed over the groups in order.

``jax.export`` for ``tpu`` serializes the kernel as a ``tpu_custom_call`` (a stable target)
without a TPU; Mosaic compiles it on the TPU. ``interpret=True`` runs it on any backend.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxquant.numerics import quantize_along
from jaxquant.ops.pallas_common import (
  KernelWeights,
  Layout,
  kernel_weights,
  nibbles,
  pick_block,
  unsigned_codes,
  weights_layout,
  weights_reason,
)
from jaxquant.qarray import QArray
from jaxquant.spec import QuantSpec

LANES = 128
ROWS = 32  # int8 sublane tile: row blocks are multiples of it
BLOCKS_N = (256, 512, 128)
BLOCKS_K = (512, 256, 1024, 128)
PER_TOKEN_INT8 = QuantSpec.parse("int8:token")


@dataclasses.dataclass(frozen=True)
class TpuTiles:
  """Block sizes: rows, columns of each half (``N/2`` halves for packed codes), contraction."""

  m: int
  n: int
  k: int


def _halves(w: Layout) -> int:
  return 2 if w.packed else 1


def default_tiles(m: int, w: Layout) -> TpuTiles | None:
  """Tiles for ``[m, K] × [K, N]`` (None when none fit the TPU's ``(32, 128)`` blocks)."""
  block_m = min(256, -(-m // ROWS) * ROWS)
  block_n = pick_block(w.n // _halves(w), BLOCKS_N)
  block_k = w.group if w.groups > 1 else pick_block(w.k, BLOCKS_K)
  if block_n is None or block_k is None or block_k % LANES:
    return None
  return TpuTiles(block_m, block_n, block_k)


def tpu_reason(
  q: object,
  lhs_shape: tuple[int, ...],
  backend: str | None = None,
  int8_activations: bool = False,
) -> str | None:
  """Why `tpu_matmul` cannot serve ``x[lhs_shape] @ q`` (None when it can), with int8 or
  float activations. `backend` (default ``jax.default_backend()``) must be ``tpu``."""
  why = weights_reason(q)
  if why:
    return why
  assert isinstance(q, QArray)
  backend = backend or jax.default_backend()
  if backend != "tpu":
    return f"backend {backend}: the Mosaic kernel runs on TPUs"
  if q.perm is not None:
    return "codes stored contraction-minor (the TPU kernel reads [K, N])"
  if not lhs_shape or lhs_shape[-1] != q.shape[0]:
    return f"activations {lhs_shape} do not contract with weights {q.shape}"
  w = weights_layout(q)
  if w.groups > 1 and w.group % LANES:
    return f"group size {w.group} is not a multiple of {LANES} (one group per K block)"
  if default_tiles(math.prod(lhs_shape[:-1]), w) is None:
    return f"weights {q.shape}: K and N (per half) must be multiples of {LANES}"
  if int8_activations and not (w.signed or w.packed):
    return "uint8 codes do not fit the MXU's int8 operands"
  return None


def _kernel(x_ref, sx_ref, w_ref, s_ref, *rest, w: Layout, k_steps: int):
  """One ``[halves, block_m, block_n]`` output tile; K is the last (sequential) grid axis."""
  z_ref, o_ref, acc_ref, xs_ref = rest if w.has_zero else (None, *rest)
  k = pl.program_id(2)
  grouped = w.groups > 1
  x = x_ref[...]
  integer = jnp.issubdtype(x.dtype, jnp.integer)
  acc_type = jnp.int32 if integer else jnp.float32
  b = w_ref[...]
  halves = list(nibbles(b, w.signed)) if w.packed else [unsigned_codes(b, w.signed)]
  xsum = jnp.sum(x.astype(acc_type), axis=1, keepdims=True) if w.has_zero else None

  @pl.when(k == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)
    xs_ref[...] = jnp.zeros_like(xs_ref)

  for h, codes in enumerate(halves):
    wide = codes if integer else codes.astype(jnp.float32)  # int32 -> f32 -> bf16: exact
    part = jnp.dot(x, wide.astype(x.dtype), preferred_element_type=acc_type)
    if not grouped:
      acc_ref[h] += part
      continue
    if z_ref is not None and xsum is not None:
      part = _minus_zero(part, xsum, z_ref[h])
    acc_ref[h] += part.astype(jnp.float32) * s_ref[h]
  if xsum is not None and not grouped:
    xs_ref[...] += xsum

  @pl.when(k == k_steps - 1)
  def _():
    for h in range(len(halves)):
      acc = acc_ref[h]
      if not grouped:
        if z_ref is not None:
          acc = _minus_zero(acc, xs_ref[...], z_ref[h])
        acc = acc.astype(jnp.float32) * s_ref[h]
      if sx_ref is not None:
        acc = acc * sx_ref[...]
      o_ref[h] = acc.astype(o_ref.dtype)


def _minus_zero(acc: jax.Array, xsum: jax.Array, z: jax.Array) -> jax.Array:
  """``acc − xsum · z``: in int32 when all three are integers (exact), else float32."""
  if acc.dtype == z.dtype == jnp.int32:
    return acc - xsum * z
  return acc.astype(jnp.float32) - xsum.astype(jnp.float32) * z.astype(jnp.float32)


def _split_halves(a: jax.Array, halves: int) -> jax.Array:
  """``[G, N]`` scales / zero points as ``[halves, G, 1, N / halves]`` (even, odd columns),
  float32 (integer zero points int32): small arrays, converted once per call."""
  g, n = a.shape
  a = a.astype(jnp.int32 if jnp.issubdtype(a.dtype, jnp.integer) else jnp.float32)
  return a.reshape(g, n // halves, halves).transpose(2, 0, 1)[:, :, None, :]


def kernel_call(
  x: jax.Array,
  x_scale: jax.Array | None,
  kw: KernelWeights,
  tiles: TpuTiles,
  out_dtype,
  interpret: bool = False,
) -> jax.Array:
  """The `pallas_call` on rows ``x [M, K]`` (M a multiple of ``tiles.m``): ``[halves, M, N/h]``."""
  w = kw.layout
  m, halves = x.shape[0], _halves(w)
  bm, bn, bk = tiles.m, tiles.n, tiles.k
  k_steps = w.k // bk
  grouped = w.groups > 1
  grid_spec = pl.BlockSpec((halves, None, 1, bn), lambda i, j, k: (0, k if grouped else 0, 0, j))
  operands = [x]
  in_specs = [pl.BlockSpec((bm, bk), lambda i, j, k: (i, k))]
  if x_scale is not None:
    operands.append(x_scale)
    in_specs.append(pl.BlockSpec((bm, 1), lambda i, j, k: (i, 0)))
  operands += [kw.codes, _split_halves(kw.scale, halves)]
  in_specs += [pl.BlockSpec((bk, bn), lambda i, j, k: (k, j)), grid_spec]
  if kw.zero is not None:
    operands.append(_split_halves(kw.zero, halves))
    in_specs.append(grid_spec)
  integer = jnp.issubdtype(x.dtype, jnp.integer)
  acc_type = jnp.int32 if integer and not grouped else jnp.float32
  body = functools.partial(_kernel, w=w, k_steps=k_steps)
  if x_scale is None:
    body = functools.partial(_no_scale, body)
  return pl.pallas_call(
    body,
    out_shape=jax.ShapeDtypeStruct((halves, m, w.n // halves), out_dtype),
    grid=(m // bm, w.n // halves // bn, k_steps),
    in_specs=in_specs,
    out_specs=pl.BlockSpec((halves, bm, bn), lambda i, j, k: (0, i, j)),
    scratch_shapes=[
      pltpu.VMEM((halves, bm, bn), acc_type),
      pltpu.VMEM((bm, 1), jnp.int32 if integer else jnp.float32),
    ],
    compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
    interpret=interpret,
    name="jaxquant_tpu_qmatmul",
  )(*operands)


def _no_scale(body, x_ref, *rest):
  return body(x_ref, None, *rest)


def tpu_matmul(
  x: jax.Array,
  q: QArray,
  *,
  x_scale: jax.Array | None = None,
  tiles: TpuTiles | None = None,
  out_dtype=jnp.float32,
  interpret: bool = False,
) -> jax.Array:
  """``(x · x_scale) @ dequantize(q)`` on the MXU, dequantizing in the kernel.

  Args:
    x: ``[..., K]`` int8 codes (with `x_scale`, one per token ``[..., 1]``) or float
      activations (bfloat16 for the MXU).
    q: a 2-D ``[K, N]`` int8 / uint8 / int4 / uint4 QArray (`tpu_reason` says which apply).
    tiles: block sizes (default `default_tiles`).
    out_dtype: the result dtype.
    interpret: run the kernel body in Pallas's interpreter (any backend).
  Returns:
    ``[..., N]``.
  """
  kw = kernel_weights(q)
  w = kw.layout
  lead, k = x.shape[:-1], x.shape[-1]
  rows = x.reshape(-1, k)
  m = rows.shape[0]
  tiles = tiles or default_tiles(m, w)
  if tiles is None:
    raise ValueError(f"tpu_matmul cannot tile {q}: {tpu_reason(q, x.shape, 'tpu')}.")
  pad = -(-m // tiles.m) * tiles.m - m
  rows = jnp.pad(rows, ((0, pad), (0, 0)))
  sx = None
  if x_scale is not None:
    sx = jnp.broadcast_to(x_scale, lead + (1,)).reshape(-1, 1).astype(jnp.float32)
    sx = jnp.pad(sx, ((0, pad), (0, 0)))
  out = kernel_call(rows, sx, kw, tiles, out_dtype, interpret)  # [halves, M, N / halves]
  out = jnp.moveaxis(out, 0, -1).reshape(rows.shape[0], w.n)
  return out[:m].reshape(lead + (w.n,))


def w8a8_matmul(x: jax.Array, q: QArray, *, out_dtype=None, interpret: bool = False) -> jax.Array:
  """Float ``x [..., K]`` quantized to int8 per token on the fly (absmax), then `tpu_matmul`
  with integer MXU sums against int8 / 4-bit weights (W8A8 / W4A8)."""
  xq = quantize_along(x, PER_TOKEN_INT8, (x.ndim - 1,))
  return tpu_matmul(xq[0], q, x_scale=xq[1], out_dtype=out_dtype or x.dtype, interpret=interpret)
