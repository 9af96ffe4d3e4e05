"""jaxquant: quantization for JAX and Flax as pure transformations over parameter pytrees."""

from jaxquant._version import __version__
from jaxquant.io import load, save
from jaxquant.numerics import compute_scale, dequantize, fake_quant, quantize
from jaxquant.qarray import QArray, qarray_sharding
from jaxquant.recipes import Recipe, apply_recipe, load_recipe
from jaxquant.rules import Rule, default_rules
from jaxquant.spec import FORMATS, QuantSpec
from jaxquant.transforms import (
  Plan,
  dequantize_params,
  fake_quant_params,
  plan,
  quantize_params,
)

__all__ = [
  "FORMATS",
  "Plan",
  "QArray",
  "QuantSpec",
  "Recipe",
  "Rule",
  "__version__",
  "apply_recipe",
  "compute_scale",
  "default_rules",
  "dequantize",
  "dequantize_params",
  "fake_quant",
  "fake_quant_params",
  "load",
  "load_recipe",
  "plan",
  "qarray_sharding",
  "quantize",
  "quantize_params",
  "save",
]
