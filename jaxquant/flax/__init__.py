"""Run unchanged Flax models quantized: Linen (`quantize_model`) and NNX (`nnx.quantize_model`)."""

from jaxquant.flax import nnx
from jaxquant.flax.linen import QuantizedModel, quantize_model

__all__ = ["QuantizedModel", "nnx", "quantize_model"]
