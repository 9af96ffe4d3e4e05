"""Mixed-precision policy and dynamic loss scaling.

A `Policy` names three dtypes: parameters (the FP32 master weights the optimizer updates),
compute (what the forward and backward matmuls run in, e.g. BF16) and output (what the loss
sees). ``Policy.parse("params=float32,compute=bfloat16,output=float32")``.

`DynamicLossScale` multiplies the loss before differentiation so that small FP16 gradients do
not underflow, divides the gradients back, and halves itself (skipping the update) when a
gradient is not finite, doubling again after `period` finite steps. BF16 has FP32's exponent
range and does not need it; `NoLossScale` is the identity with the same interface.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

_DTYPES = {
  "float32": jnp.float32,
  "f32": jnp.float32,
  "fp32": jnp.float32,
  "bfloat16": jnp.bfloat16,
  "bf16": jnp.bfloat16,
  "float16": jnp.float16,
  "f16": jnp.float16,
  "fp16": jnp.float16,
  "half": jnp.float16,
}


def _dtype(name: str):
  if name not in _DTYPES:
    raise ValueError(f"Unknown dtype {name!r} in policy; use one of {', '.join(_DTYPES)}.")
  return _DTYPES[name]


def _cast_floats(tree: PyTree, dtype) -> PyTree:
  def cast(x):
    if isinstance(x, (jax.Array, np.ndarray)) and jnp.issubdtype(x.dtype, jnp.floating):
      return x.astype(dtype)
    return x

  return jax.tree.map(cast, tree)


@dataclasses.dataclass(frozen=True)
class Policy:
  """Param, compute and output dtypes; casts apply to floating leaves only."""

  param_dtype: Any = jnp.float32
  compute_dtype: Any = jnp.float32
  output_dtype: Any = jnp.float32

  @classmethod
  def parse(cls, text: str) -> Policy:
    """``"params=float32,compute=bfloat16,output=float32"`` (any subset; rest float32)."""
    kw = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
      key, _, value = part.partition("=")
      field = {
        "params": "param_dtype",
        "param": "param_dtype",
        "compute": "compute_dtype",
        "output": "output_dtype",
      }.get(key.strip())
      if field is None or not value:
        raise ValueError(
          f"Bad policy part {part!r}; write e.g. 'params=float32,compute=bfloat16,output=float32'."
        )
      kw[field] = _dtype(value.strip())
    return cls(**kw)

  def cast_to_param(self, tree: PyTree) -> PyTree:
    return _cast_floats(tree, self.param_dtype)

  def cast_to_compute(self, tree: PyTree) -> PyTree:
    return _cast_floats(tree, self.compute_dtype)

  def cast_to_output(self, tree: PyTree) -> PyTree:
    return _cast_floats(tree, self.output_dtype)

  def __str__(self) -> str:
    name = lambda d: jnp.dtype(d).name
    return (
      f"params={name(self.param_dtype)},compute={name(self.compute_dtype)},"
      f"output={name(self.output_dtype)}"
    )


def all_finite(tree: PyTree) -> jax.Array:
  """True iff every floating leaf of `tree` is finite (a scalar bool array)."""
  leaves = [
    jnp.all(jnp.isfinite(x))
    for x in jax.tree.leaves(tree)
    if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)
  ]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DynamicLossScale:
  """Loss scale that adapts: ``×2`` after `period` finite steps, ``÷2`` on a non-finite one."""

  scale: jax.Array = dataclasses.field(default_factory=lambda: jnp.asarray(2.0**15, jnp.float32))
  counter: jax.Array = dataclasses.field(default_factory=lambda: jnp.zeros((), jnp.int32))
  period: int = dataclasses.field(default=2000, metadata={"static": True})
  minimum: float = dataclasses.field(default=1.0, metadata={"static": True})

  def scale_loss(self, loss: jax.Array) -> jax.Array:
    return loss * self.scale.astype(loss.dtype)

  def unscale(self, grads: PyTree) -> PyTree:
    inv = 1.0 / self.scale
    return jax.tree.map(lambda g: (g.astype(jnp.float32) * inv).astype(g.dtype), grads)

  def adjust(self, finite: jax.Array) -> DynamicLossScale:
    grow = finite & (self.counter + 1 >= self.period)
    scale = jnp.where(
      finite, jnp.where(grow, self.scale * 2, self.scale), jnp.maximum(self.scale / 2, self.minimum)
    )
    counter = jnp.where(finite & ~grow, self.counter + 1, 0)
    return dataclasses.replace(self, scale=scale, counter=counter)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NoLossScale:
  """The identity loss scale (FP32 or BF16 compute)."""

  def scale_loss(self, loss):
    return loss

  def unscale(self, grads):
    return grads

  def adjust(self, finite):
    return self


def select_tree(pred: jax.Array, on_true: PyTree, on_false: PyTree) -> PyTree:
  """``on_true`` where `pred` else ``on_false``, leaf by leaf (to skip a non-finite step)."""
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)
