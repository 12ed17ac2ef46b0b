"""The quantized formats MoE checkpoints are published in, as pure functions over their tensors.

FP8 block-scaled (DeepSeek-V3, `quant_method: "fp8"`): a weight W (M, N) is stored as
float8_e4m3fn with a float32 `weight_scale_inv` grid (ceil(M / bm), ceil(N / bn)), the block size
(bm, bn) from `quantization_config["weight_block_size"]`, and W[i, j] = float(W_fp8[i, j]) *
scale_inv[i // bm, j // bn] (despite its name, scale_inv is the factor to multiply by). The last
block row and column may be partial (DeepSeek-V3's kv_a_proj_with_mqa: (576, 7168), scales (5, 56)),
as in DeepSeek-V3's reference `inference/kernel.py::weight_dequant`. The block size is always the
config's: transformers 5.23's `integrations/finegrained_fp8.py::Fp8Dequantize._dequantize_one`
infers it as shape // grid, which raises on partial blocks and silently computes wrong weights
where the division happens to be exact (a (136, 200) weight with a (2, 2) grid: 68 x 100 blocks).

MXFP4 (GPT-OSS, `quant_method: "mxfp4"`): each expert projection P ships as `P_blocks` uint8
(E, rows, cols / 32, 16) and `P_scales` uint8 (E, rows, cols / 32), byte for byte moekit's own
"mxfp4" scheme (`quant.schemes`), so `mxfp4_expert_weight` reshapes it into a `QuantizedWeight`.
transformers 5.23 (`integrations/mxfp4.py::_convert_moe_packed_tensors`) decodes it the same way
to (E, rows, cols) and transposes to (E, cols, rows): gate_up_proj (E, D, 2F), its last axis
interleaving gate (even) and up (odd), and down_proj (E, F, D). So the shipped rows of
gate_up_proj_blocks alternate gate, up, gate, ... and down_proj_blocks' rows are already
(E, D, F), moekit's w_out.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moekit.quant.schemes import GROUP, QuantizedWeight

FP8_FORMATS = {"e4m3": torch.float8_e4m3fn}  # quantization_config["fmt"] -> the weights' dtype
MXFP4_BLOCK_BYTES = GROUP // 2  # 32 E2M1 codes packed two to a byte


# ---- FP8, block-scaled ----


def check_fp8_scales(
    name: str,
    shape_MN: tuple[int, ...],
    scales_shape: tuple[int, ...],
    block_size: tuple[int, int],
) -> None:
    """Raise ValueError naming `name` unless a weight of `shape_MN` (2-D) with a scale grid of
    `scales_shape` fits blocks of `block_size`."""
    if len(shape_MN) != 2:
        raise ValueError(
            f"{name} has shape {tuple(shape_MN)}: FP8 block-scaled weights are matrices (M, N)"
        )
    expected = tuple(math.ceil(n / b) for n, b in zip(shape_MN, block_size, strict=True))
    if tuple(scales_shape) != expected:
        raise ValueError(
            f"{name} of shape {tuple(shape_MN)} has a scale grid of shape {tuple(scales_shape)}; "
            f"blocks of {list(block_size)} need {expected} (ceil(M / {block_size[0]}), "
            f"ceil(N / {block_size[1]}))"
        )


def dequantize_fp8_blocks(
    w_MN: Tensor,
    scale_inv_GH: Tensor,
    block_size: tuple[int, int],
    dtype: torch.dtype = torch.float32,
    *,
    first_row: int = 0,
    name: str = "the weight",
) -> Tensor:
    """W (M, N) in `dtype` from FP8 `w_MN` and its per-block `scale_inv_GH`, computed in float32:
    W[i, j] = w[i, j] * scale_inv[i // bm, j // bn]. Edge blocks may be partial.

    first_row: where `w_MN` starts in a weight read in row slices, with `scale_inv_GH` then the
    grid's rows from first_row // bm on: row i of the slice takes scale row
    (first_row % bm + i) // bm. A grid of the wrong shape raises ValueError naming `name`."""
    bm, bn = block_size
    offset = first_row % bm
    rows, cols = w_MN.shape
    check_fp8_scales(name, (offset + rows, cols), tuple(scale_inv_GH.shape), block_size)
    row_block_M = torch.arange(offset, offset + rows) // bm
    col_block_N = torch.arange(cols) // bn
    scale_MN = scale_inv_GH.float()[row_block_M][:, col_block_N]
    return w_MN.float().mul_(scale_MN).to(dtype)


def block_row_slices(
    shape_MN: tuple[int, ...], block_size: tuple[int, int], max_elements: int
) -> list[slice]:
    """Row slices of a weight (M, N), whole block rows of about `max_elements` or fewer each
    (at least one block row), for dequantizing it a slice at a time."""
    rows, cols = shape_MN
    bm = block_size[0]
    step = bm * max(1, max_elements // max(bm * cols, 1))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


# ---- MXFP4, GPT-OSS experts ----


def check_mxfp4_pair(
    name: str, blocks_shape: tuple[int, ...], scales_shape: tuple[int, ...]
) -> tuple[int, ...]:
    """The float weight's shape (..., rows, cols) of an MXFP4 pair `name`_blocks (..., rows,
    cols / 32, 16) and `name`_scales (..., rows, cols / 32); ValueError naming `name`, both
    shapes and what would fit when they do not."""
    blocks_shape, scales_shape = tuple(blocks_shape), tuple(scales_shape)
    if len(blocks_shape) < 3 or blocks_shape[-1] != MXFP4_BLOCK_BYTES:
        raise ValueError(
            f"{name}_blocks has shape {blocks_shape}: MXFP4 blocks are (..., rows, cols / {GROUP}, "
            f"{MXFP4_BLOCK_BYTES}), {MXFP4_BLOCK_BYTES} bytes ({GROUP} codes) per scale "
            "(a truncated tensor?)"
        )
    if blocks_shape[:-1] != scales_shape:
        raise ValueError(
            f"{name}_blocks of shape {blocks_shape} and {name}_scales of shape {scales_shape} do "
            f"not match: the scales must be {blocks_shape[:-1]}, one per {MXFP4_BLOCK_BYTES}-byte "
            "block"
        )
    return (*blocks_shape[:-2], blocks_shape[-2] * GROUP)


def mxfp4_expert_weight(
    blocks_ERG16: Tensor,
    scales_ERG: Tensor,
    *,
    interleaved: bool,
    name: str = "the expert weight",
) -> QuantizedWeight:
    """A GPT-OSS expert projection's MXFP4 pair as moekit's `QuantizedWeight("mxfp4")` of the
    expert weight (..., O, I) it stores, the bytes as shipped (rows reordered, never re-encoded).

    blocks_ERG16: uint8 (..., rows, I / 32, 16); scales_ERG: uint8 (..., rows, I / 32); leading
    axes (experts) are kept. interleaved: True for gate_up_proj, whose rows alternate gate and up
    (the result is moekit's w_in (..., 2F, D), [gate; up]); False for down_proj (moekit's w_out
    (..., D, F) as it is). ValueError naming `name` for a misshapen or mistyped pair."""
    check_mxfp4_pair(name, tuple(blocks_ERG16.shape), tuple(scales_ERG.shape))
    for part, t in (("blocks", blocks_ERG16), ("scales", scales_ERG)):
        if t.dtype != torch.uint8:
            raise ValueError(f"{name}_{part} is {t.dtype}: MXFP4 {part} are uint8")
    data_ERB = blocks_ERG16.flatten(-2)  # (..., rows, I / 2): byte j holds codes 2j, 2j + 1
    if interleaved:
        if data_ERB.shape[-2] % 2:
            raise ValueError(
                f"{name} has {data_ERB.shape[-2]} rows: interleaved gate/up rows come in pairs"
            )
        rows = data_ERB.shape[-2]  # gate, up, gate, up, ... -> [gate; up]: even, then odd
        order = torch.cat((torch.arange(0, rows, 2), torch.arange(1, rows, 2)))
        data_ERB, scales_ERG = data_ERB[..., order, :], scales_ERG[..., order, :]
    return QuantizedWeight("mxfp4", data_ERB.contiguous(), scales_ERG.contiguous())
