"""Weight-only matmul on GPU: a Pallas kernel (Triton backend) that dequantizes in registers.

W8A16 / W4A16: float activations ``x [M, K]`` times int8 / uint8 / int4 / uint4 weight codes
(`pallas_common.KernelWeights`, read once in their stored layout, 4-bit codes packed two a
byte), float32 accumulation:

    out[m, n] = Σ_g s[g, n] · (Σ_{k∈g} x[m, k] q[k, n] − z[g, n] Σ_{k∈g} x[m, k])

The grid tiles ``M`` and ``N``; each program walks ``K`` in blocks of ``block_k`` (one scale
group per block when the scales vary along ``K``, so group scales and zero points are exact).
Codes are widened to the activation dtype (exact: integers below 256) and the dot runs on the
tensor cores with float32 accumulation; the scale multiplies the block's partial sum.

On this jaxlib the Triton lowering emits the kernel as Triton IR in a ``__gpu$xla.gpu.triton``
custom call, compiled by XLA on the GPU: lowering and ``jax.export`` for ``cuda`` need no GPU,
but the export must opt out of the custom-call stability check (`EXPORT_CHECKS`), since
Triton IR carries no compatibility guarantee. ``interpret=True`` runs the same kernel body on
any backend (the tests run it on CPU).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from jaxquant.ops.pallas_common import (
  KernelWeights,
  Layout,
  kernel_weights,
  pick_block,
  unpack_nibbles,
  unsigned_codes,
  weights_layout,
  weights_reason,
)
from jaxquant.qarray import QArray

#: What `jax.export` must skip to serialize a function that calls this kernel for ``cuda``.
EXPORT_CHECKS = (jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton"),)
GPU_BACKENDS = ("gpu", "cuda", "rocm")
BLOCKS_N = (64, 128, 32, 16)
BLOCKS_K = (128, 64, 256, 32, 16)
MIN_BLOCK = 16  # Triton's smallest dot tile


@dataclasses.dataclass(frozen=True)
class Tiles:
  """Block sizes of one call: rows, output columns, contraction; Triton warps and stages."""

  m: int
  n: int
  k: int
  warps: int = 4
  stages: int = 3


def _pow2(v: int) -> bool:
  return v > 0 and v & (v - 1) == 0


def default_tiles(m: int, w: Layout) -> Tiles | None:
  """Tiles for ``[m, K] × [K, N]`` (None when no power-of-two blocks fit the shapes).

  Decode (``m ≤ 16``): one 16-row block, narrow column blocks for more programs; prefill:
  ``128 × 128`` blocks and 8 warps. ``block_k`` is the group size when scales vary along K.
  """
  block_m = min(128, max(MIN_BLOCK, 1 << max(m - 1, 0).bit_length()))
  if m <= 16:
    choices: tuple[int, ...] = (32, 64, 16)
  elif m <= 64:
    choices = BLOCKS_N
  else:
    choices = (128, 64, 32, 16)
  block_n = pick_block(w.n, choices)
  block_k = w.group if w.groups > 1 else pick_block(w.k, BLOCKS_K)
  if block_n is None or block_k is None or not _pow2(block_k) or block_k < MIN_BLOCK:
    return None
  return Tiles(block_m, block_n, block_k, warps=8 if block_m * block_n >= 128 * 64 else 4)


def gpu_reason(q: object, lhs_shape: tuple[int, ...], backend: str | None = None) -> str | None:
  """Why `weight_only_matmul` cannot serve ``x[lhs_shape] @ q`` (None when it can).

  `backend` (default ``jax.default_backend()``) must be a GPU one for the kernel to be chosen.
  """
  why = weights_reason(q)
  if why:
    return why
  assert isinstance(q, QArray)
  backend = backend or jax.default_backend()
  if backend not in GPU_BACKENDS:
    return f"backend {backend}: the Triton kernel runs on GPUs"
  if not lhs_shape or lhs_shape[-1] != q.shape[0]:
    return f"activations {lhs_shape} do not contract with weights {q.shape}"
  w = weights_layout(q)
  if w.groups > 1 and (not _pow2(w.group) or w.group < MIN_BLOCK):
    return f"group size {w.group} is not a power of two ≥ {MIN_BLOCK}"
  if default_tiles(math.prod(lhs_shape[:-1]), w) is None:
    return f"weights {q.shape} have no power-of-two blocks ≥ {MIN_BLOCK} that divide them"
  return None


def _codes_tile(w_ref, i, block_k: int, w: Layout) -> jax.Array:
  """Block ``i`` along K of the codes as int32: ``[block_k, bn]`` (or ``[bn, block_k]``)."""
  width = block_k // 2 if w.packed and w.minor else block_k
  start = pl.multiple_of(i * width, width)
  b = w_ref[:, pl.ds(start, width)] if w.minor else w_ref[pl.ds(start, width), :]
  return unpack_nibbles(b, w.signed) if w.packed else unsigned_codes(b, w.signed)


def _kernel(x_ref, w_ref, s_ref, *rest, w: Layout, tiles: Tiles):
  """One ``[block_m, block_n]`` output tile: the K loop of the module docstring's sum."""
  z_ref, o_ref = rest if w.has_zero else (None, rest[0])
  bm, bn, bk = tiles.m, tiles.n, tiles.k
  grouped = w.groups > 1
  dims = (((1,), (1,)), ((), ())) if w.minor else (((1,), (0,)), ((), ()))

  def partial_sum(i):
    x = x_ref[:, pl.ds(pl.multiple_of(i * bk, bk), bk)]
    q = _codes_tile(w_ref, i, bk, w).astype(x.dtype)
    dot = lax.dot_general(x, q, dims, preferred_element_type=jnp.float32)
    if not w.has_zero:
      return dot, None
    return dot, jnp.sum(x.astype(jnp.float32), axis=1, keepdims=True)

  def row(ref, i):
    return ref[pl.ds(i, 1), :].astype(jnp.float32)  # [1, bn]

  def body(i, carry):
    acc, xs = carry
    dot, xsum = partial_sum(i)
    if not grouped:
      return acc + dot, xs if xsum is None else xs + xsum
    if z_ref is not None and xsum is not None:
      dot = dot - xsum * row(z_ref, i)
    return acc + dot * row(s_ref, i), xs

  zeros = (jnp.zeros((bm, bn), jnp.float32), jnp.zeros((bm, 1), jnp.float32))
  acc, xs = lax.fori_loop(0, w.k // bk, body, zeros)
  if not grouped:
    if z_ref is not None:
      acc = acc - xs * row(z_ref, 0)
    acc = acc * row(s_ref, 0)
  o_ref[...] = acc.astype(o_ref.dtype)


def kernel_call(
  x: jax.Array, kw: KernelWeights, tiles: Tiles, out_dtype, interpret: bool = False
) -> jax.Array:
  """The `pallas_call` on rows ``x [M, K]`` (M a multiple of ``tiles.m``): ``[M, N]``."""
  m, w = x.shape[0], kw.layout
  per_byte = 2 if w.packed else 1
  if w.minor:
    w_spec = pl.BlockSpec((tiles.n, w.k // per_byte), lambda i, j: (j, 0))
  else:
    w_spec = pl.BlockSpec((w.k, tiles.n // per_byte), lambda i, j: (0, j))
  grid_spec = pl.BlockSpec((w.groups, tiles.n), lambda i, j: (0, j))
  operands = [x, kw.codes, kw.scale] + ([kw.zero] if kw.zero is not None else [])
  in_specs = [pl.BlockSpec((tiles.m, w.k), lambda i, j: (i, 0)), w_spec, grid_spec]
  in_specs += [grid_spec] * w.has_zero
  return pl.pallas_call(
    functools.partial(_kernel, w=w, tiles=tiles),
    out_shape=jax.ShapeDtypeStruct((m, w.n), out_dtype),
    grid=(m // tiles.m, w.n // tiles.n),
    in_specs=in_specs,
    out_specs=pl.BlockSpec((tiles.m, tiles.n), lambda i, j: (i, j)),
    compiler_params=pltr.CompilerParams(num_warps=tiles.warps, num_stages=tiles.stages),
    interpret=interpret,
    name="jaxquant_weight_only_matmul",
  )(*operands)


def weight_only_matmul(
  x: jax.Array,
  q: QArray,
  *,
  tiles: Tiles | None = None,
  out_dtype=None,
  interpret: bool = False,
) -> jax.Array:
  """``x @ dequantize(q)`` with the codes dequantized inside the kernel.

  Args:
    x: float activations ``[..., K]`` (bfloat16 / float16 for the tensor cores; float32 runs
      IEEE float32 dots).
    q: a 2-D ``[K, N]`` int8 / uint8 / int4 / uint4 QArray (`gpu_reason` says which apply):
      per-tensor, per-output-channel or group scales along ``K``, optional zero points, codes
      ``[K, N]`` or contraction-minor ``[N, K]``.
    tiles: block sizes (default `default_tiles`).
    out_dtype: result dtype (default `x`'s).
    interpret: run the kernel body in Pallas's interpreter (any backend).
  Returns:
    ``[..., N]``.
  """
  kw = kernel_weights(q)
  lead, k = x.shape[:-1], x.shape[-1]
  rows = x.reshape(-1, k)
  m = rows.shape[0]
  tiles = tiles or default_tiles(m, kw.layout)
  if tiles is None:
    raise ValueError(f"weight_only_matmul cannot tile {q}: {gpu_reason(q, x.shape, 'gpu')}.")
  padded = -(-m // tiles.m) * tiles.m
  rows = jnp.pad(rows, ((0, padded - m), (0, 0)))
  out = kernel_call(rows, kw, tiles, out_dtype or x.dtype, interpret)
  return out[:m].reshape(lead + (kw.layout.n,))
