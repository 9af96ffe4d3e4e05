"""GPTQ (Frantar et al., 2023): quantize one input row at a time, pushing each row's error
onto the rows not yet quantized through the inverse Hessian of the layer's inputs.

For a Flax kernel ``W [in, out]`` with calibration inputs ``X [n, in]``, ``H = 2 XᵀX / n``.
With ``U`` the upper Cholesky factor of ``H⁻¹`` (after damping), row ``i`` is quantized to
``q_i`` and the error ``e_i = (w_i − q_i) / U_ii`` updates ``W[j] −= U_ij e_i`` for ``j > i``
— lazily, a block of rows at a time. Options: act-order (rows by decreasing ``H_ii``), groups
of G rows sharing a scale per output column (static groups: scales from the original weights,
which act-order implies so that groups stay contiguous), symmetric or asymmetric integer grids,
dead inputs (``H_ii = 0``) zeroed, and damping raised automatically if Cholesky fails.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.numerics import compute_scale
from jaxquant.qarray import QArray, from_codes
from jaxquant.spec import QuantSpec, SpecLike, as_spec, check_group_size


@dataclasses.dataclass(frozen=True)
class GPTQConfig:
  """Knobs of `gptq_quantize`: relative damping, lazy block rows, act-order, static groups."""

  damp: float = 0.01
  block_size: int = 128
  act_order: bool = True
  static_groups: bool = False
  max_damp_tries: int = 8


def gptq_eligible(spec: QuantSpec | None, shape) -> bool:
  """Whether GPTQ applies: a 2-D ``[in, out]`` kernel, an integer spec per output channel or
  in groups along the input axis."""
  return (
    spec is not None
    and spec.info.kind == "int"
    and len(shape) == 2
    and (
      (spec.granularity == "channel" and spec.resolved_axis(2) == 1)
      or (spec.granularity == "group" and spec.resolved_axis(2) == 0)
    )
  )


_compute_scale = jax.jit(compute_scale, static_argnums=1)  # one compile per group shape


def group_scales(w: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
  """Scale and zero point per output column of the rows `w [g, out]`, by the spec's range
  calibration (``absmax``/``minmax``: the full range; ``mse``: the clip with the least
  squared rounding error, the "mse" grid of GPTQ's reference), as `numerics` computes them."""
  if spec.calibration == "percentile":
    raise ValueError(f"GPTQ scales use absmax, minmax or mse calibration, not {spec}.")
  per_column = dataclasses.replace(spec, granularity="channel", group_size=None, axis=-1)
  scale, zero = _compute_scale(jnp.asarray(w, jnp.float32), per_column)
  scale = np.asarray(scale, np.float32).reshape(-1)
  zero = np.zeros_like(scale) if zero is None else np.asarray(zero, np.float32).reshape(-1)
  return scale, zero


def _quantize_row(w, scale, zero, spec):
  lo, hi = spec.int_range
  codes = np.clip(np.round(w / scale) + zero, lo, hi)
  return codes, (codes - zero) * scale


def damped_inverse_factor(h: np.ndarray, damp: float, tries: int) -> tuple[np.ndarray, float]:
  """Upper Cholesky factor ``U`` of ``(H + λI)⁻¹``; λ starts at ``damp · mean(diag H)`` and
  grows tenfold while Cholesky fails. Returns ``(U, λ)``."""
  mean_diag = float(np.mean(np.diag(h))) or 1.0
  lam = max(damp, 1e-6) * mean_diag
  eye = np.eye(h.shape[0])
  for _ in range(tries):
    try:
      lower = np.linalg.cholesky(h + lam * eye)
      inv = np.linalg.inv(lower)
      h_inv = inv.T @ inv
      return np.linalg.cholesky(h_inv).T, lam
    except np.linalg.LinAlgError:
      lam *= 10
  raise ValueError(
    f"GPTQ: the Hessian stays singular after damping up to {lam / 10:.3g} "
    f"({tries} tries); use more calibration data or a larger damp."
  )


def gptq_quantize(
  w: np.ndarray,
  h: np.ndarray,
  spec: SpecLike,
  config: GPTQConfig = GPTQConfig(),
) -> tuple[QArray, dict]:
  """GPTQ of a kernel ``w [in, out]`` given ``h = XᵀX`` (any positive multiple) ``[in, in]``.

  `spec` is an integer format with ``channel`` (axis -1) or ``group`` (axis 0) granularity.
  Returns the QArray and ``{"damp": λ, "dead": count}``.
  """
  spec = as_spec(spec)
  if spec.info.kind != "int" or spec.granularity not in ("channel", "group"):
    raise ValueError(f"GPTQ needs an integer spec per channel or per group, got {spec}.")
  if w.ndim != 2 or h.shape != (w.shape[0], w.shape[0]):
    raise ValueError(f"GPTQ needs w [in, out] and h [in, in]; got {w.shape} and {h.shape}.")
  if spec.granularity == "group" and spec.resolved_axis(2) != 0:
    raise ValueError(f"GPTQ groups run along the input axis 0 of [in, out]; got {spec}.")
  if spec.granularity == "channel" and spec.resolved_axis(2) != 1:
    raise ValueError(f"GPTQ channels are the output axis -1 of [in, out]; got {spec}.")
  check_group_size(spec, w.shape)
  n_in = w.shape[0]
  W = np.array(w, np.float64)
  H = np.array(h, np.float64)
  dead = np.diag(H) == 0
  H[dead, dead] = 1.0
  W[dead, :] = 0.0
  group = spec.group_size if spec.granularity == "group" else None

  # Scales fixed up front: per channel always; per group when static (act-order implies it).
  static = group is None or config.static_groups or config.act_order
  if group is None:
    fixed = [group_scales(W, spec)]
  elif static:
    fixed = [group_scales(W[g : g + group], spec) for g in range(0, n_in, group)]

  perm = np.argsort(-np.diag(H), kind="stable") if config.act_order else np.arange(n_in)
  W, H = W[perm], H[perm][:, perm]
  U, lam = damped_inverse_factor(H, config.damp, config.max_damp_tries)

  codes = np.zeros_like(W)
  scales = np.zeros((n_in // (group or n_in), W.shape[1]), np.float32)
  zeros = np.zeros_like(scales)
  for i1 in range(0, n_in, config.block_size):
    i2 = min(i1 + config.block_size, n_in)
    W1 = W[i1:i2].copy()
    err = np.zeros_like(W1)
    for i in range(i2 - i1):
      row = perm[i1 + i]  # original input index
      g = 0 if group is None else row // group
      if static:
        scale, zero = fixed[g]
        scales[g], zeros[g] = scale, zero
      elif row % group == 0:  # rows arrive in order: a group's scale from its updated rows
        rows = np.concatenate([W1[i:], W[i2:]])[:group]
        scale, zero = group_scales(rows, spec)
        scales[g], zeros[g] = scale, zero
      c, q = _quantize_row(W1[i], scale, zero, spec)
      codes[i1 + i] = c
      e = (W1[i] - q) / U[i1 + i, i1 + i]
      W1[i:] -= np.outer(U[i1 + i, i1 + i : i2], e)
      err[i] = e
    W[i2:] -= U[i1:i2, i2:].T @ err

  codes = codes[np.argsort(perm)]
  return _as_qarray(codes, scales, zeros, spec, w), {"damp": lam, "dead": int(dead.sum())}


def _as_qarray(codes, scales, zeros, spec: QuantSpec, w) -> QArray:
  n_in, n_out = w.shape
  if spec.granularity == "group":
    scale = scales.reshape(n_in // spec.group_size, 1, n_out)
  else:
    scale = scales.reshape(1, n_out)
  values = jnp.asarray(codes.astype(spec.info.storage))
  zero = (
    None if spec.symmetric else jnp.asarray(zeros.reshape(scale.shape).astype(spec.info.storage))
  )
  scale = jnp.asarray(scale.astype(spec.scale_storage))
  return from_codes(values, scale, zero, spec, np.dtype(w.dtype))
