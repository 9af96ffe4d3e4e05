"""Post-training quantization as steps: quantizers (RTN, GPTQ, AWQ clip, HQQ), smoothers
(SmoothQuant, AWQ scales) and the one layer-sequential driver that runs them."""

from jaxquant.ptq.capture import block_of, capture, collect_inputs, hessian_observer
from jaxquant.ptq.driver import CalibrationSet, Result, run
from jaxquant.ptq.gptq import GPTQConfig, gptq_quantize
from jaxquant.ptq.smooth import SmoothGroup
from jaxquant.ptq.steps import REGISTRY, StatRequest, make_step, register

__all__ = [
  "REGISTRY",
  "CalibrationSet",
  "GPTQConfig",
  "Result",
  "SmoothGroup",
  "StatRequest",
  "block_of",
  "capture",
  "collect_inputs",
  "gptq_quantize",
  "hessian_observer",
  "make_step",
  "register",
  "run",
]
