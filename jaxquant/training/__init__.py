"""Mixed-precision training and quantization-aware training."""

from jaxquant.learned import lsq_fake_quant, pact_fake_quant
from jaxquant.training.policy import DynamicLossScale, NoLossScale, Policy, all_finite
from jaxquant.training.qat import (
  TrainState,
  add_learned_quantizers,
  convert,
  default_loss_scale,
  make_train_step,
)

__all__ = [
  "DynamicLossScale",
  "NoLossScale",
  "Policy",
  "TrainState",
  "add_learned_quantizers",
  "all_finite",
  "convert",
  "default_loss_scale",
  "lsq_fake_quant",
  "make_train_step",
  "pact_fake_quant",
]
