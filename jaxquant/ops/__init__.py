"""Quantized contractions: every matmul, einsum and convolution goes through these."""

from jaxquant.ops.conv import qconv
from jaxquant.ops.dot import Lowering, choose_lowering, explain, qdot_general
from jaxquant.ops.einsum import einsum_dims, qeinsum

__all__ = ["Lowering", "choose_lowering", "einsum_dims", "explain", "qconv", "qdot_general",
           "qeinsum"]  # fmt: skip
