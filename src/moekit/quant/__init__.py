"""Weight-only quantization applied to a built model from outside it: the storage schemes
(schemes.py), the checkpoint formats models ship in (formats.py), decode kernels over quantized
weights (kernels.py) and the swap of a model's projections for quantized ones."""

from moekit.quant.schemes import SCHEMES, QuantizedWeight, dequantize, quantize

__all__ = ["SCHEMES", "QuantizedWeight", "dequantize", "quantize"]
