"""`qeinsum`: two-operand einsum through the `qdot_general` seam."""

from __future__ import annotations

import string

import jax
import jax.numpy as jnp

from jaxquant.ops.dot import DotDims, qdot_general


def _expand_ellipsis(term: str, ndim: int, filler: str) -> str:
  if "..." not in term:
    return term
  n = ndim - (len(term) - 3)
  return term.replace("...", filler[-n:] if n > 0 else "")


def expand_equation(subscripts: str, lhs_ndim: int, rhs_ndim: int) -> tuple[str, str, str]:
  """``(lhs, rhs, out)`` index strings with any ``...`` spelled out as letters."""
  s = subscripts.replace(" ", "")
  if "->" not in s or s.count(",") != 1:
    raise ValueError(
      f"qeinsum needs an explicit two-operand equation such as 'btd,dk->btk', got {subscripts!r}."
    )
  inputs, out = s.split("->")
  lhs, rhs = inputs.split(",")
  filler = "".join(c for c in string.ascii_uppercase if c not in s)
  n_ell = max(
    lhs_ndim - (len(lhs) - 3) if "..." in lhs else 0,
    rhs_ndim - (len(rhs) - 3) if "..." in rhs else 0,
  )
  lhs = _expand_ellipsis(lhs, lhs_ndim, filler[:n_ell])
  rhs = _expand_ellipsis(rhs, rhs_ndim, filler[:n_ell])
  out = out.replace("...", filler[:n_ell])
  if len(lhs) != lhs_ndim or len(rhs) != rhs_ndim:
    raise ValueError(
      f"Equation {subscripts!r} does not match operand ranks {lhs_ndim}, {rhs_ndim}."
    )
  return lhs, rhs, out


def einsum_dims(subscripts: str, lhs_ndim: int, rhs_ndim: int) -> tuple[DotDims, tuple[int, ...]]:
  """``(dimension_numbers, perm)`` such that
  ``einsum(s, a, b) == transpose(dot_general(a, b, dimension_numbers), perm)``."""
  lhs, rhs, out = expand_equation(subscripts, lhs_ndim, rhs_ndim)
  batch = [c for c in lhs if c in rhs and c in out]
  contract = [c for c in lhs if c in rhs and c not in out]
  for c in set(lhs + rhs) - set(out) - set(contract):
    raise ValueError(
      f"Equation {subscripts!r} sums index {c!r} within one operand; sum it before qeinsum."
    )
  dims = (
    (tuple(lhs.index(c) for c in contract), tuple(rhs.index(c) for c in contract)),
    (tuple(lhs.index(c) for c in batch), tuple(rhs.index(c) for c in batch)),
  )
  result = batch + [c for c in lhs if c not in rhs] + [c for c in rhs if c not in lhs]
  return dims, tuple(result.index(c) for c in out)


def qeinsum(
  subscripts: str, lhs: jax.Array, rhs, *, precision=None, preferred_element_type=None, **kwargs
) -> jax.Array:
  """``einsum(subscripts, lhs, rhs)`` with `qdot_general`'s quantization keywords.

  `rhs` may be a `QArray`; `lhs_spec`, `lhs_scale`, `rhs_spec`, `mode` pass through.
  """
  kwargs.pop("out_sharding", None)
  rhs_ndim = rhs.ndim if hasattr(rhs, "ndim") else jnp.ndim(rhs)
  dims, perm = einsum_dims(subscripts, jnp.ndim(lhs), rhs_ndim)
  out = qdot_general(
    lhs, rhs, dims, precision=precision, preferred_element_type=preferred_element_type, **kwargs
  )
  return jnp.transpose(out, perm)
