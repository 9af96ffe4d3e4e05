"""Post-training quantization that compensates for rounding error: GPTQ, AWQ, SmoothQuant, HQQ."""

from jaxquant.ptq.capture import block_of, capture, hessian_observer
from jaxquant.ptq.gptq import GPTQConfig, gptq_quantize
from jaxquant.ptq.sequential import gptq_params

__all__ = ["GPTQConfig", "block_of", "capture", "gptq_params", "gptq_quantize",
           "hessian_observer"]  # fmt: skip
