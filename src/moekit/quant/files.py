"""Quantized checkpoints: a run directory (config.json, tokenizer.json,
checkpoints/step-NNNNNN/model.safetensors) whose checkpoint also holds `quantization.json`, the
`QuantizeConfig` its tensors were quantized with. `moekit.load` (through `train.sample.load_run`)
rebuilds the quantized model from it; `moekit quantize` writes one (`train.checkpoint.
write_quantized_run`).

It holds no optimizer state: a quantized model is for inference (`moekit train --resume` refuses
it), and `moekit convert --to-hf` writes its dequantized weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from moekit.config import ModelConfig, QuantizeConfig
from moekit.cpu_memory import advise_huge_pages
from moekit.model.transformer import MoETransformer
from moekit.quant.modules import QuantizedExperts, QuantizedLinear, quantize_model

QUANTIZATION_FILE = "quantization.json"  # beside a quantized checkpoint's model.safetensors


def read_quantization(checkpoint: Path) -> QuantizeConfig | None:
    """The `QuantizeConfig` of a checkpoint directory; None if its weights are not quantized."""
    path = Path(checkpoint) / QUANTIZATION_FILE
    if not path.is_file():
        return None
    remedy = f"write the quantized checkpoint again (moekit quantize), or delete {path}"
    return QuantizeConfig.from_file(path, remedy)


def empty_quantized_model(cfg: ModelConfig, quantization: QuantizeConfig) -> MoETransformer:
    """The model of `cfg` quantized as `quantization`, allocated once on the CPU and uninitialised
    (the float weights are never built); buffers zero. For a quantized checkpoint to load into:
    its memory is advised to huge pages before it is first touched (decoding streams every weight
    per token; see `moekit.cpu_memory.advise_huge_pages`)."""
    with torch.device("meta"):
        model = quantize_model(MoETransformer(cfg), quantization, empty=True)
    return allocate_on_cpu(model, huge_pages=True)


def allocate_on_cpu(model: nn.Module, huge_pages: bool = False) -> nn.Module:
    """A model built on the meta device, allocated once on the CPU, uninitialised but for its
    buffers (zero); with `huge_pages` its memory advised to them before it is first touched."""
    model.to_empty(device="cpu")
    if huge_pages:
        advise_huge_pages(model)
    for buffer in model.buffers():
        buffer.zero_()
    return model


def is_quantized(model: MoETransformer) -> bool:
    """Whether any of `model`'s modules is quantized."""
    return any(isinstance(m, QuantizedLinear | QuantizedExperts) for m in model.modules())


def dtype_problems(targets: dict[str, Tensor], stored: dict[str, torch.dtype | None]) -> list[str]:
    """The first tensor of a checkpoint (`stored`: name -> dtype) whose dtype a model's tensor of
    that name (`targets`) cannot take: a quantized tensor's codes or scales must match exactly
    (int4's float16 scales read as MXFP4's exponent bytes would decode another scheme, silently);
    floats may convert (a bfloat16 checkpoint into a float32 model)."""
    return [
        f"{n} is {dtype} in the checkpoint, {targets[n].dtype} in the model"
        for n, dtype in stored.items()
        if n in targets
        and dtype != targets[n].dtype
        and not (targets[n].is_floating_point() and dtype is not None and dtype.is_floating_point)
    ][:1]
