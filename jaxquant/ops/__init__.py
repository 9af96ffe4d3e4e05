"""Quantized contractions: every matmul, einsum and convolution goes through these."""

from jaxquant.ops.conv import qconv
from jaxquant.ops.dot import Lowering, choose_lowering, explain, qdot_general
from jaxquant.ops.einsum import einsum_dims, qeinsum
from jaxquant.ops.fake_int8 import ste_backward
from jaxquant.ops.lowerings import LOWERINGS, contraction_minor, lowering_scope, serving_layout

__all__ = [
  "LOWERINGS",
  "Lowering",
  "choose_lowering",
  "contraction_minor",
  "einsum_dims",
  "explain",
  "lowering_scope",
  "qconv",
  "qdot_general",
  "qeinsum",
  "serving_layout",
  "ste_backward",
]
