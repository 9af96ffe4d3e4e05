"""Quantization-aware training: a jitted train step with fake quantization and a precision
policy, learned quantizer parameters, and conversion of the result to serving QArrays.

    step = make_train_step(model, rules, optax.adam(1e-3), loss_fn,
                           policy=Policy.parse("params=float32,compute=bfloat16"))
    state = TrainState.create(params, optimizer)
    state, metrics = step(state, batch)
    qparams, act_stats = convert(state.params, rules)   # serve with the same specs

`loss_fn(apply, params, batch) -> scalar` calls ``apply({"params": params}, ...)``, where
`apply` is the fake-quant forward of the unchanged Linen model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxquant.flax import quantize_model
from jaxquant.learned import LSQ, PACT, lsq_init_scale
from jaxquant.numerics import quantize
from jaxquant.rules import Rule
from jaxquant.training.policy import DynamicLossScale, NoLossScale, Policy, select_tree
from jaxquant.transforms import map_leaves, named_leaves, quantize_params, selection

PyTree = Any
LossFn = Callable[[Callable, PyTree, Any], jax.Array]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
  """FP32 master params, optimizer state (moments in the params' dtype), loss scale, step."""

  params: PyTree
  opt_state: PyTree
  loss_scale: Any
  step: jax.Array

  @classmethod
  def create(cls, params, optimizer: optax.GradientTransformation, loss_scale=None):
    return cls(
      params, optimizer.init(params), loss_scale or NoLossScale(), jnp.zeros((), jnp.int32)
    )


def make_train_step(
  model,
  rules: Sequence[Rule],
  optimizer: optax.GradientTransformation,
  loss_fn: LossFn,
  policy: Policy | None = None,
  *,
  track_grad_norm: bool = False,
) -> Callable[[TrainState, Any], tuple[TrainState, dict]]:
  """A jitted ``step(state, batch) -> (state, metrics)``.

  Forward and backward run in ``policy.compute_dtype`` with fake-quantized weights (and
  activations where a rule says); gradients reach the FP32 master params straight through.
  A non-finite step is skipped (params and optimizer state kept, the loss scale, if dynamic,
  halved): with dynamic loss scaling, any Inf/NaN gradient; without, a non-finite loss.
  Metrics: ``loss``, ``finite``, ``loss_scale``, and ``grad_norm`` (global L2 norm of the
  unscaled gradients) with dynamic loss scaling or ``track_grad_norm=True``.
  """
  fake = quantize_model(model, rules, "fake")
  policy = policy or Policy()

  def step(state: TrainState, batch):
    def scaled_loss(params):
      compute = policy.cast_to_compute(params)
      loss = loss_fn(fake.apply, compute, policy.cast_to_compute(batch))
      loss = jnp.asarray(loss, policy.output_dtype).astype(jnp.float32)
      return state.loss_scale.scale_loss(loss), loss

    grads, loss = jax.grad(scaled_loss, has_aux=True)(state.params)
    grads = state.loss_scale.unscale(grads)
    metrics = {"loss": loss}
    if track_grad_norm or not isinstance(state.loss_scale, NoLossScale):
      metrics["grad_norm"] = _global_norm(grads)  # Inf/NaN anywhere makes the norm non-finite
      finite = jnp.isfinite(metrics["grad_norm"]) & jnp.isfinite(loss)
    else:
      finite = jnp.isfinite(loss)  # without loss scaling, overflow shows in the loss
    # optax mixes Python floats with its int32 step count (bias corrections): let it promote
    # as it expects even when the caller runs JAX with strict dtype promotion.
    with jax.numpy_dtype_promotion("standard"):
      updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # the selects fuse into the update: skipping costs nothing on the normal path
    new = TrainState(
      select_tree(finite, params, state.params),
      select_tree(finite, opt_state, state.opt_state),
      state.loss_scale.adjust(finite),
      state.step + finite.astype(jnp.int32),
    )
    scale = getattr(new.loss_scale, "scale", jnp.ones(()))
    return new, {**metrics, "finite": finite, "loss_scale": scale}

  return jax.jit(step)


def _global_norm(tree: PyTree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(tree)))


# --------------------------------------------------------------------------- learned params
def add_learned_quantizers(
  params: PyTree,
  rules: Sequence[Rule],
  *,
  weights: bool = True,
  activations: bool = False,
  pact_init: float = 6.0,
) -> PyTree:
  """Adds ``lsq_scale`` (init: the RTN scale) beside every quantized kernel and, for layers
  with an activation spec, ``pact_alpha`` (init `pact_init`): trainable like any parameter."""
  extra: dict[str, dict[str, jax.Array]] = {}
  for path, value in named_leaves(params):
    idx, spec, _ = selection(path, value, tuple(rules))
    if idx is None or spec is None or not path.endswith("kernel"):
      continue
    module = path.rsplit("/", 1)[0]
    if weights:
      extra.setdefault(module, {})[LSQ] = lsq_init_scale(value, spec)
    if activations and rules[idx].act is not None:
      extra.setdefault(module, {})[PACT] = jnp.asarray(pact_init, jnp.float32)
  return _with_leaves(params, extra)


def _with_leaves(params: PyTree, extra: dict[str, dict[str, jax.Array]]) -> PyTree:
  out = dict(params)
  for module, leaves in extra.items():
    node, parts = out, module.split("/")
    for part in parts[:-1]:
      node[part] = dict(node[part])
      node = node[part]
    node[parts[-1]] = {**node[parts[-1]], **leaves}
  return out


def convert(qat_params: PyTree, rules: Sequence[Rule]) -> tuple[PyTree, dict[str, dict]]:
  """Serve-mode params and static activation statistics from a QAT result.

  Kernels with a learned ``lsq_scale`` are quantized with exactly that step (so serve
  matches the fake-quant forward); ``pact_alpha`` becomes the layer's static activation range
  (pass the returned statistics as ``calibration=`` to the serve model). Other matched
  kernels are quantized as `quantize_params` would.
  """
  leaves = dict(named_leaves(qat_params))
  done, stats, drop = {}, {}, set()
  for path, value in leaves.items():
    if not path.endswith("/" + LSQ) and not path.endswith("/" + PACT):
      continue
    module = path.rsplit("/", 1)[0]
    kernel_path = f"{module}/kernel"
    drop.add(path)
    if path.endswith(LSQ):
      _, spec, _ = selection(kernel_path, leaves[kernel_path], tuple(rules))
      if spec is None:
        raise ValueError(
          f"{kernel_path} has a learned {LSQ}, but no rule quantizes it; convert with the "
          "rules the model was trained with."
        )
      done[kernel_path] = quantize(leaves[kernel_path], spec, scale=value, path=kernel_path)
    else:
      alpha = jnp.abs(value).astype(jnp.float32)
      stats[kernel_path] = {
        "absmax": alpha,
        "min": -alpha,
        "max": alpha,
        "count": jnp.ones(()),
        "sample": jnp.zeros((1,)),
      }
  kept = _without(qat_params, drop)
  return quantize_params(map_leaves(lambda p, v: done.get(p, v), kept), rules), stats


def _without(tree: PyTree, paths: set[str], prefix: str = "") -> PyTree:
  if not isinstance(tree, dict):
    return tree
  return {
    k: _without(v, paths, f"{prefix}{k}/") for k, v in tree.items() if f"{prefix}{k}" not in paths
  }


def default_loss_scale(policy: Policy):
  """Dynamic loss scaling for float16 compute; none for float32 or bfloat16."""
  return DynamicLossScale() if jnp.dtype(policy.compute_dtype) == jnp.float16 else NoLossScale()
