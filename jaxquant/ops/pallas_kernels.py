"""The accelerator kernels behind one entry point: which applies (`pallas_reason`), and the
call (`pallas_matmul`).

* GPU (`pallas_gpu`, Triton): weight-only W8A16 / W4A16, codes dequantized in registers.
* TPU (`pallas_tpu`, Mosaic): weight-only on the MXU with float activations, and W8A8 / W4A8
  with int8 activations quantized per token on the fly (``i8 × i8 → i32``).

Both serve a Dense contraction ``x [..., K] @ q [K, N]`` (the last axis of ``x`` against the
first of ``q``). ``interpret=True`` runs either kernel's body on any backend.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
from jax import lax

from jaxquant.ops.pallas_gpu import GPU_BACKENDS, gpu_reason, weight_only_matmul
from jaxquant.ops.pallas_tpu import tpu_matmul, tpu_reason, w8a8_matmul
from jaxquant.qarray import QArray
from jaxquant.spec import QuantSpec

DotDims = tuple[tuple[tuple[int, ...], tuple[int, ...]], tuple[tuple[int, ...], tuple[int, ...]]]


def int8_token_spec(spec: QuantSpec | None) -> bool:
  """Whether `spec` asks for symmetric int8 activations with one dynamic scale per token."""
  return bool(
    spec is not None
    and spec.format == "int8"
    and spec.symmetric
    and spec.granularity == "token"
    and spec.rounding == "nearest"
  )


def pallas_reason(
  q: object,
  lhs_shape: tuple[int, ...],
  backend: str | None = None,
  dims: DotDims | None = None,
  lhs_spec: QuantSpec | None = None,
) -> str | None:
  """Why no Pallas kernel serves ``x[lhs_shape] · q`` on `backend` (None when one does).

  Args:
    q: the weights (a 2-D integer QArray for any kernel to apply).
    lhs_shape: the activations' shape ``[..., K]``.
    backend: ``gpu`` / ``cuda`` / ``rocm`` or ``tpu`` (default ``jax.default_backend()``).
    dims: normalized ``dot_general`` dimension numbers (default: a Dense contraction).
    lhs_spec: the activation spec: None (weight-only), or int8 per token (TPU only).
  """
  backend = backend or jax.default_backend()
  if dims is not None and dims != (((len(lhs_shape) - 1,), (0,)), ((), ())):
    return "not a Dense contraction (last activation axis with the first weight axis)"
  if lhs_spec is not None and not int8_token_spec(lhs_spec):
    return f"activation spec {lhs_spec}: the kernels take none or dynamic int8 per token"
  if backend in GPU_BACKENDS:
    if lhs_spec is not None:
      return "the GPU kernel is weight-only (float activations)"
    return gpu_reason(q, lhs_shape, backend)
  if backend == "tpu":
    return tpu_reason(q, lhs_shape, backend, int8_activations=lhs_spec is not None)
  return f"backend {backend}: Pallas kernels run on GPUs and TPUs"


def pallas_matmul(
  x: jax.Array,
  q: QArray,
  *,
  lhs_spec: QuantSpec | None = None,
  backend: str | None = None,
  out_dtype=None,
  interpret: bool = False,
) -> jax.Array:
  """``x [..., K] @ q [K, N]`` by the kernel `pallas_reason` found for `backend`: ``[..., N]``
  in `out_dtype` (default `x`'s)."""
  backend = backend or jax.default_backend()
  out_dtype = out_dtype or x.dtype
  if backend in GPU_BACKENDS:
    return weight_only_matmul(x, q, out_dtype=out_dtype, interpret=interpret)
  if lhs_spec is not None:
    return w8a8_matmul(x, q, out_dtype=out_dtype, interpret=interpret)
  return tpu_matmul(x, q, out_dtype=out_dtype, interpret=interpret)


def portable_matmul(
  x: jax.Array,
  q: QArray,
  fallback: Callable[[jax.Array, QArray], jax.Array],
  *,
  lhs_spec: QuantSpec | None = None,
) -> jax.Array:
  """``x @ q`` chosen per platform when the computation is lowered (`lax.platform_dependent`):
  the Triton kernel on cuda / rocm and the Mosaic kernel on tpu where `pallas_reason` accepts,
  ``fallback(x, q)`` (same shape and dtype) everywhere else. The choice follows the platform
  lowered for, not the default backend: a CPU-only machine exports the Triton kernel for
  ``cuda`` and the Mosaic one for ``tpu``. One platform per export: jax 0.10.2 lowers every
  kept branch for every platform of a multi-platform export, and a `pallas_call` lowers for
  one backend only."""
  out_dtype = jax.eval_shape(fallback, x, q).dtype
  branches = {}
  for platform, backend in (("cuda", "gpu"), ("rocm", "rocm"), ("tpu", "tpu")):
    if pallas_reason(q, tuple(x.shape), backend, lhs_spec=lhs_spec) is None:
      branches[platform] = functools.partial(
        _matmul_on, backend=backend, lhs_spec=lhs_spec, out_dtype=out_dtype
      )
  return lax.platform_dependent(x, q, default=fallback, **branches)


def _matmul_on(x, q, *, backend: str, lhs_spec, out_dtype) -> jax.Array:
  return pallas_matmul(x, q, lhs_spec=lhs_spec, backend=backend, out_dtype=out_dtype)
