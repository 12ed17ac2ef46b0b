"""Products with quantized weights: `linear(x, qw, bias)`, F.linear over `qw.dequantize()`, the
reference (decode kernels over the stored layouts come here)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from moekit.quant.schemes import QuantizedWeight


def linear(x: Tensor, qw: QuantizedWeight, bias: Tensor | None = None) -> Tensor:
    """F.linear(x (..., I), W (O, I), bias (O,)) -> (..., O) with W stored as `qw`."""
    return F.linear(x, qw.dequantize(x.dtype), bias)
