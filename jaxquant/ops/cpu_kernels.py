"""Compiled CPU kernels for quantized Dense contractions, through XLA's FFI.

XLA:CPU widens int8 / 4-bit weight codes to float (or int4 to int8) in memory before its dot,
so every weight-only format reads more bytes than float32 would. These kernels (C++ in
``ops/kernels/cpu_matmul.cc``, built by ``pip install``) read the stored codes once and widen
them in registers:

* `weight_only_matmul`: ``x [M, K] float32 × q [K, N]`` (int8 or packed 4-bit codes, channel
  or group scales along K, optional zero points) →
  ``y[m, n] = Σ_g s[g, n] (Σ_{k∈g} x[m, k] q[k, n] − z[g, n] Σ_{k∈g} x[m, k])``, the exact
  weight-only numerics of ``x @ dequantize(q)`` up to float32 summation order;
* `int8_matmul`: ``a [M, K] int8 × q [K, N] int8`` summed exactly in int32, then
  ``· s_a[m] · s_w[n]`` (W8A8).

Both take the codes in the stored layout of `quantize` (``[in, out]``, no `serving_layout`
needed), run on XLA's intra-op thread pool, and are wrapped in `lax.platform_dependent`, so a
graph that uses them still lowers (to the pure-XLA path) for GPU and TPU. XLA cannot partition
them: under a mesh set with `jax.set_mesh` the lowering choice skips them, and a jitted
function whose operands are sharded without one should run under
`lowering_scope(kernels=False)` (otherwise XLA gathers the weights). When the library is
not built (`available` is False, `unavailable_reason` says why) or ``JAXQUANT_CPU_KERNELS=0``,
callers fall back to the XLA lowerings.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import os
from collections.abc import Callable
from pathlib import Path
from typing import cast

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxquant.qarray import QArray

WQ_TARGET = "jaxquant_wq_matmul"
INT8_TARGET = "jaxquant_int8_matmul"
_LIB_STEM = "_cpu_kernels"


def _library_path() -> Path | None:
  override = os.environ.get("JAXQUANT_CPU_KERNELS_LIB")
  if override:
    return Path(override)
  here = Path(__file__).parent
  for suffix in importlib.machinery.EXTENSION_SUFFIXES:
    candidate = here / f"{_LIB_STEM}{suffix}"
    if candidate.exists():
      return candidate
  return None


@functools.cache
def _load() -> tuple[bool, str]:
  """Loads and registers the kernels once: ``(ok, why not)``."""
  if os.environ.get("JAXQUANT_CPU_KERNELS", "1") == "0":
    return False, "disabled by JAXQUANT_CPU_KERNELS=0"
  path = _library_path()
  if path is None:
    return (
      False,
      "the compiled kernels are not built (reinstall with a C++ compiler: pip install -e .)",
    )
  try:
    lib = ctypes.cdll.LoadLibrary(str(path))
  except OSError as e:
    return False, f"cannot load {path}: {e}"
  global _LIB
  _LIB = lib
  for target, symbol in ((WQ_TARGET, "JaxquantWqMatmul"), (INT8_TARGET, "JaxquantInt8Matmul")):
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
  return True, ""


_LIB: ctypes.CDLL | None = None
#: The kernels' code paths, narrowest first (`isa`, `set_isa`).
ISAS = ("scalar", "avx2", "avx512")


def isa() -> str:
  """The code path the kernels run on this CPU: ``avx512`` (AVX-512 F/BW/VNNI: 16-lane widening,
  ``vpdpbusd`` for W8A8), ``avx2`` (AVX2 + FMA) or ``scalar``; '' when they are not loaded."""
  if not available() or _LIB is None:
    return ""
  return ISAS[_LIB.jaxquant_kernels_isa()]


def set_isa(name: str) -> str:
  """Caps the kernels' code path at `name` (one of `ISAS`; ``avx512`` lifts the cap), process
  wide, to compare or test the narrower paths on a wide CPU. Returns the path now in use."""
  if name not in ISAS:
    raise ValueError(f"set_isa({name!r}): choose one of {ISAS}.")
  _require()
  assert _LIB is not None
  return ISAS[_LIB.jaxquant_kernels_set_isa(ISAS.index(name))]


def available() -> bool:
  """Whether the compiled CPU kernels are loaded (and not disabled)."""
  return _load()[0]


def unavailable_reason() -> str:
  """Why `available` is False ('' when it is True)."""
  return _load()[1]


def _require() -> None:
  ok, why = _load()
  if not ok:
    raise RuntimeError(f"jaxquant CPU kernels: {why}")


# --------------------------------------------------------------------------- eligibility
def weight_only_reason(q: QArray) -> str | None:
  """Why 2-D `q` (a Dense kernel ``[K, N]``) cannot take `weight_only_matmul` (None if it can)."""
  spec = q.spec
  if spec.info.kind != "int" or spec.info.bits not in (4, 8):
    return f"weights are {spec.format}, not 8- or 4-bit integers"
  if q.ndim != 2 or q.perm is not None:
    return "the kernel takes 2-D codes in the stored [in, out] layout"
  if spec.info.bits == 4 and not q.packed:
    return "4-bit codes are not packed"
  if spec.granularity == "group" and spec.resolved_axis(2) != 0:
    return "weight groups run along the output axis"
  if spec.granularity not in ("group", "channel", "tensor"):
    return f"{spec.granularity} weight scales"
  if spec.granularity == "channel" and spec.resolved_axis(2) == 0:
    return "weight scales vary along the contraction"
  return None


def int8_reason(q: QArray) -> str | None:
  """Why 2-D int8 `q` cannot take `int8_matmul` (None if it can)."""
  if q.ndim != 2 or q.perm is not None or q.values.dtype != jnp.int8:
    return "the kernel takes 2-D int8 codes in the stored [in, out] layout"
  if q.scale is None or q.scale.shape[0] != 1:
    return "weight scales vary along the contraction"
  return None


# --------------------------------------------------------------------------- calls
def _scales_gn(t: jax.Array, n: int) -> jax.Array:
  """A scale or zero point of a ``[K, N]`` QArray (``[G, 1, N]``, ``[1, N]`` or ``[1, 1]``) as
  float32 ``[G, N]``."""
  t = jnp.asarray(t).astype(jnp.float32)
  t = t.reshape(-1, t.shape[-1]) if t.ndim else t.reshape(1, 1)
  return jnp.broadcast_to(t, (t.shape[0], n))


def _on_cpu(kernel: Callable[[], jax.Array], fallback: Callable[[], jax.Array]) -> jax.Array:
  """`kernel` on CPU, `fallback` elsewhere (so cuda / tpu lowerings stay pure XLA)."""
  return lax.platform_dependent(cpu=kernel, default=fallback)


def weight_only_matmul(x: jax.Array, q: QArray, fallback: Callable[[], jax.Array]) -> jax.Array:
  """``x [M, K] @ dequantize(q) [K, N]`` in float32 by the compiled kernel (CPU), `fallback`
  elsewhere. `weight_only_reason(q)` must be None."""
  n = q.shape[1]
  bits = q.spec.info.bits
  scale = _scales_gn(cast(jax.Array, q.scale), n)  # integer QArrays keep a scale
  has_zero = q.zero_point is not None
  zero = _scales_gn(q.zero_point, n) if q.zero_point is not None else jnp.zeros((1, 1), jnp.float32)
  values = q.values if bits == 8 else lax.bitcast_convert_type(q.values, jnp.uint8)

  _require()

  def kernel():
    return jax.ffi.ffi_call(
      WQ_TARGET, jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32), vmap_method="sequential"
    )(
      x.astype(jnp.float32),
      values,
      scale,
      zero,
      bits=np.int64(bits),
      signed=np.int64(q.spec.info.signed),
      has_zero=np.int64(has_zero),
    )

  return _on_cpu(kernel, fallback)


def int8_matmul(
  a: jax.Array, s_a: jax.Array, q: QArray, fallback: Callable[[], jax.Array]
) -> jax.Array:
  """``(a [M, K] int8 · codes(q) [K, N] int8) · s_a[m] · s_w[n]`` in float32, summed exactly in
  int32, by the compiled kernel (CPU); `fallback` elsewhere. `int8_reason(q)` must be None."""
  m = a.shape[0]
  n = q.shape[1]
  s_a = jnp.broadcast_to(jnp.asarray(s_a, jnp.float32).reshape(-1), (m,))
  s_w = jnp.broadcast_to(jnp.asarray(q.scale, jnp.float32).reshape(-1), (n,))

  _require()

  def kernel():
    return jax.ffi.ffi_call(
      INT8_TARGET, jax.ShapeDtypeStruct((m, n), jnp.float32), vmap_method="sequential"
    )(a, s_a, q.values, s_w)

  return _on_cpu(kernel, fallback)
