"""Quantized Hugging Face checkpoints: config.json's `quantization_config` read and checked, the
checkpoint's tensors seen as the dense ones the key maps expect, and the readers that dequantize
them (the formats themselves are `moekit.quant.formats`).

    quant_method "fp8"    DeepSeek-V3 (and Qwen3's -FP8 checkpoints): fmt "e4m3",
                          weight_block_size [bm, bn]. A float8_e4m3fn `X.weight` has a
                          `X.weight_scale_inv` grid beside it; every tensor with no scale is
                          read as it is stored.
    quant_method "mxfp4"  GPT-OSS: an expert projection `P` ships as `P_blocks` / `P_scales`;
                          everything else (modules_to_not_convert) is stored unquantized.

The view (`QuantizedView`) names each quantized tensor by the dense key and shape a bf16
checkpoint would have (GPT-OSS's transposed (E, D, 2F) / (E, F, D)), so the loader's check of
names and shapes covers quantized checkpoints before any weight is read.

`fill` puts each loaded tensor in place a piece (one expert, or one slice of rows) at a time: into
the float parameter, or, loaded quantized, into its `QuantizedWeight` storage: an MXFP4 pair into
MXFP4 storage as shipped (`load_mxfp4`: never decoded), anything else dequantized and quantized
piece by piece (`quantize_into`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moekit.config import QuantizeConfig
from moekit.interop.configs import HF
from moekit.interop.files import CheckpointError, WeightInfo
from moekit.interop.keymaps import OPS, Piece, Source
from moekit.quant.formats import (
    FP8_FORMATS,
    block_row_slices,
    check_fp8_scales,
    check_mxfp4_pair,
    dequantize_fp8_blocks,
    mxfp4_expert_weight,
)
from moekit.quant.modules import QuantizedExperts, QuantizedLinear
from moekit.quant.schemes import GROUP, QuantizedWeight, quantize_into
from moekit.userfiles import SLICE_BYTES, CheckpointReader

QUANT_METHODS = ("fp8", "mxfp4")
SCALE_SUFFIX = "_scale_inv"  # FP8: "X.weight" -> "X.weight_scale_inv"
BLOCKS_SUFFIX, SCALES_SUFFIX = "_blocks", "_scales"  # MXFP4: "P" -> "P_blocks", "P_scales"
FP8_DTYPES = {"F8_E4M3": "e4m3"}  # safetensors' name -> quantization_config's fmt
SCALE_DTYPES = ("F32", "BF16", "F16")
# The key-map ops an MXFP4 pair can fill: GPT-OSS's experts, gate_up_proj (rows interleaved)
# and down_proj; {op: whether the rows interleave gate and up}.
MXFP4_OPS = {"interleaved_t": True, "transpose": False}


@dataclass(frozen=True)
class Quantization:
    """config.json's quantization_config, checked: the method and, for fp8, the block size."""

    method: str
    block_size: tuple[int, int] | None = None


def read_quantization(hf: HF) -> Quantization | None:
    """The checkpoint's `Quantization` (None when config.json has no quantization_config);
    `CheckpointError` naming the field for anything moekit does not read."""
    config = hf.get("quantization_config")
    if not config:
        return None
    method = config.get("quant_method")
    if method not in QUANT_METHODS:
        raise CheckpointError(
            f"quantization_config.quant_method={method!r} is not supported: moekit reads "
            f"{' and '.join(repr(m) for m in QUANT_METHODS)} checkpoints (DeepSeek-V3's FP8, "
            "GPT-OSS's MXFP4); load a dequantized (bfloat16 or float32) copy"
        )
    if method == "mxfp4":
        return Quantization("mxfp4")
    fmt = config.get("fmt", "e4m3")
    if fmt not in FP8_FORMATS:
        raise CheckpointError(
            f"quantization_config.fmt={fmt!r} is not supported: moekit reads FP8 weights in "
            f"{', '.join(repr(f) for f in FP8_FORMATS)} (float8_e4m3fn)"
        )
    value = config.get("weight_block_size")
    ints = isinstance(value, (list, tuple)) and all(type(v) is int and v > 0 for v in value)
    if not ints or len(value) != 2:
        raise CheckpointError(
            f"quantization_config.weight_block_size={value!r} is invalid: moekit reads "
            "block-scaled FP8, which needs two positive block sizes (rows, columns), "
            "[128, 128] for DeepSeek-V3"
        )
    return Quantization("fp8", (value[0], value[1]))


@dataclass
class QuantizedView:
    """A checkpoint's tensors as the dense ones they stand for.

    files: {dense key: WeightInfo}, what the loader checks against the config: unquantized
        tensors as they are; a quantized one under the key and shape of its dense form (its
        WeightInfo.dtype says how it is stored: "F8_E4M3", "MXFP4").
    stored: the checkpoint's tensors as stored (scale grids, blocks and scales included).
    fp8_scales: {weight key: its scale-grid key}.
    mxfp4_pairs: {dense key: (its blocks key, its scales key)}.
    """

    quantization: Quantization | None
    files: dict[str, WeightInfo]
    stored: dict[str, WeightInfo]  # the checkpoint's own tensors, by their own keys
    fp8_scales: dict[str, str] = field(default_factory=dict)
    mxfp4_pairs: dict[str, tuple[str, str]] = field(default_factory=dict)

    def misshapen(self, key: str, needed: tuple[int, ...]) -> str:
        """What is wrong with `key` when its dense shape is not the `needed` one."""
        found = self.files[key].shape
        if key not in self.mxfp4_pairs:
            return f"{key} has shape {found}, the config needs {needed}"
        blocks, scales = self.mxfp4_pairs[key]
        *lead, cols, rows = needed  # stored (..., rows, cols / 32, 16), read transposed
        scales_needed = (*lead, rows, cols // GROUP)
        return (
            f"{blocks} {self.stored[blocks].shape} with {scales} {self.stored[scales].shape} "
            f"hold a {found} weight (as transformers reads it), the config needs {needed}: "
            f"blocks {(*scales_needed, GROUP // 2)}, scales {scales_needed}"
        )

    def check_op(self, op: str, keys: list[str]) -> list[str]:
        """Problems of filling a moekit tensor with `op` from `keys`: MXFP4 pairs fill GPT-OSS's
        experts only."""
        return [
            f"{key} is MXFP4-quantized where moekit reads op {op!r}: moekit dequantizes MXFP4 "
            f"for GPT-OSS's experts only (ops {', '.join(MXFP4_OPS)})"
            for key in keys
            if key in self.mxfp4_pairs and op not in MXFP4_OPS
        ]


def quantized_view(
    files: dict[str, WeightInfo], quantization: Quantization | None
) -> QuantizedView:
    """The `QuantizedView` of a checkpoint's headers; `CheckpointError` listing every tensor whose
    quantization is wrong (a weight without its scales, blocks without scales, mismatched or
    truncated shapes, an FP8 tensor in a checkpoint that declares no FP8), before any weight is
    read."""
    view = QuantizedView(quantization, dict(files), files)
    method = quantization.method if quantization is not None else None
    if method == "fp8":
        problems = _view_fp8(view, quantization.block_size)
    else:
        problems = [
            f"{key} is {info.dtype} but config.json declares no quant_method 'fp8' (with its "
            "weight_block_size): its scales would be ignored"
            for key, info in files.items()
            if info.dtype.startswith("F8")
        ]
        if method == "mxfp4":
            problems += _view_mxfp4(view)
    if problems:
        more = f" ... and {len(problems) - 12} more" if len(problems) > 12 else ""
        raise CheckpointError(
            f"this {method or 'unquantized'} checkpoint's quantized tensors do not fit its "
            f"quantization_config: {'; '.join(problems[:12])}{more}"
        )
    return view


def _view_fp8(view: QuantizedView, block_size: tuple[int, int]) -> list[str]:
    """Pair every FP8 weight with its scale grid (checked against the block size); the scale keys
    leave `view.files`."""
    files, problems = view.files, []
    for scale_key in [k for k in files if k.endswith(SCALE_SUFFIX)]:
        key, scales = scale_key.removesuffix(SCALE_SUFFIX), files.pop(scale_key)
        if key not in files:
            problems.append(f"{scale_key} scales no tensor: {key} is missing")
        elif files[key].dtype not in FP8_DTYPES:
            problems.append(f"{key} is {files[key].dtype} but has a {scale_key}: expected F8_E4M3")
        elif scales.dtype not in SCALE_DTYPES:
            problems.append(f"{scale_key} is {scales.dtype}: FP8 scales are float32 (F32)")
        else:
            try:
                check_fp8_scales(key, files[key].shape, scales.shape, block_size)
            except ValueError as err:
                problems.append(str(err))
            view.fp8_scales[key] = scale_key
    for key, info in files.items():
        if info.dtype.startswith("F8") and key not in view.fp8_scales:
            if info.dtype not in FP8_DTYPES:
                problems.append(f"{key} is {info.dtype}: fmt 'e4m3' weights are F8_E4M3")
            elif key + SCALE_SUFFIX not in view.stored:
                problems.append(f"{key} is {info.dtype} without its scale grid {key}{SCALE_SUFFIX}")
    return problems


def _view_mxfp4(view: QuantizedView) -> list[str]:
    """Join every `P_blocks` / `P_scales` pair into one dense key `P` of the transposed shape
    transformers dequantizes it to."""
    files, problems = view.files, []
    stems = {k.removesuffix(BLOCKS_SUFFIX) for k in files if k.endswith(BLOCKS_SUFFIX)}
    stems |= {k.removesuffix(SCALES_SUFFIX) for k in files if k.endswith(SCALES_SUFFIX)}
    for stem in sorted(stems):
        blocks, scales = stem + BLOCKS_SUFFIX, stem + SCALES_SUFFIX
        if blocks not in files or scales not in files:
            there, absent = (blocks, scales) if blocks in files else (scales, blocks)
            problems.append(f"{there} has no partner: {absent} is missing")
            continue
        wrong_dtype = [k for k in (blocks, scales) if files[k].dtype != "U8"]
        if wrong_dtype:
            problems += [
                f"{k} is {files[k].dtype}: MXFP4 blocks and scales are U8" for k in wrong_dtype
            ]
            continue
        try:
            shape = check_mxfp4_pair(stem, files[blocks].shape, files[scales].shape)
        except ValueError as err:
            problems.append(str(err))
            continue
        dense = (*shape[:-2], shape[-1], shape[-2])
        files[stem] = WeightInfo(files[blocks].path, "MXFP4", dense)
        view.mxfp4_pairs[stem] = (blocks, scales)
        del files[blocks], files[scales]
    return problems


class DequantizingReader(CheckpointReader):
    """A `CheckpointReader` that reads FP8 weights dequantized (to `dtype`), one whole block row
    slice at a time; MXFP4 pairs are read by `load_mxfp4`."""

    def __init__(self, view: QuantizedView, dtype: torch.dtype) -> None:
        super().__init__({k: info.path for k, info in view.stored.items()})
        self.view, self.dtype = view, dtype

    def read_stored(self, key: str, rows: slice | int | None = None) -> Tensor:
        """A tensor of the checkpoint as it is stored (a scale grid, MXFP4 blocks)."""
        return super().read(key, rows)

    def read(self, key: str, rows: slice | int | None = None) -> Tensor:
        if key in self.view.mxfp4_pairs:
            raise CheckpointError(f"{key} is MXFP4: read it with load_mxfp4")
        if key not in self.view.fp8_scales:
            return super().read(key, rows)
        if isinstance(rows, int):
            return self.read(key, slice(rows, rows + 1))[0]
        # an FP8 weight's rows, dequantized with the rows of the scale grid they need
        start, stop, _ = (rows or slice(None)).indices(self.view.files[key].shape[0])
        block_size = self.view.quantization.block_size
        w_MN = self.read_stored(key, slice(start, stop))
        grid_rows = slice(start // block_size[0], -(-stop // block_size[0]))
        scale_inv_GH = self.read_stored(self.view.fp8_scales[key], grid_rows)
        return dequantize_fp8_blocks(
            w_MN, scale_inv_GH, block_size, self.dtype, first_row=start, name=key
        )

    def row_slices(self, key: str) -> Iterator[slice]:
        if key not in self.view.fp8_scales:
            yield from super().row_slices(key)
            return
        budget = SLICE_BYTES // 4  # elements: each is dequantized through float32
        yield from block_row_slices(
            self.view.files[key].shape, self.view.quantization.block_size, budget
        )


def load_schemes(
    quantize: QuantizeConfig | None, keep_quantized: bool, quantization: Quantization | None
) -> QuantizeConfig | None:
    """The `QuantizeConfig` `load_hf` loads the model in (None: float)."""
    if quantize is not None and keep_quantized:
        raise ValueError(
            "load_hf takes keep_quantized or quantize, not both: quantize with experts='mxfp4' "
            "keeps MXFP4 experts as shipped"
        )
    if quantize is not None:
        return quantize
    if keep_quantized and quantization is not None and quantization.method == "mxfp4":
        return QuantizeConfig(weights="none", experts="mxfp4")
    return None


def destination(model: nn.Module, name: str) -> Tensor | QuantizedWeight:
    """Where the load plan's moekit tensor `name` goes: a quantized module's storage, or the
    float parameter or buffer itself."""
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner)
    if isinstance(module, QuantizedExperts) and attr in ("w_in", "w_out"):
        return module.quantized_weights()[("w_in", "w_out").index(attr)]
    if isinstance(module, QuantizedLinear) and attr == "weight":
        return module.weight_q
    return getattr(module, attr).data


def check_kept(
    model: nn.Module, plan: list[tuple[str, Source, list[str]]], view: QuantizedView
) -> None:
    """keep_quantized keeps MXFP4 experts: every routed expert weight must be shipped in MXFP4
    (a float one would be quantized, which keep_quantized never does)."""
    for name, _, keys in plan:
        if isinstance(destination(model, name), QuantizedWeight) and (
            keys[0] not in view.mxfp4_pairs
        ):
            raise CheckpointError(
                f"keep_quantized keeps MXFP4 experts as shipped, but {keys[0]} (moekit's {name}) "
                f"is stored {view.files[keys[0]].dtype}, not MXFP4: load with "
                "keep_quantized=False, or quantize the experts (quantize=QuantizeConfig(...))"
            )


def fill(
    dest: Tensor | QuantizedWeight, op: str, keys: list[str], reader: DequantizingReader
) -> None:
    """Fill one moekit tensor `dest` (float, or its quantized storage) from the checkpoint `keys`
    joined by the key-map `op`, one piece at a time: at most one expert, or one slice of rows, is
    ever in float (`dest` float: copied; quantized: `quantize_into` from the piece in the
    reader's dtype, what the float load would hold). An MXFP4 pair goes through `load_mxfp4`."""
    if keys[0] in reader.view.mxfp4_pairs:
        pieces = load_mxfp4(dest, keys[0], op, reader)
    else:
        pieces = OPS[op][0](tuple(dest.shape), keys, reader)
    for index, value in pieces:
        if isinstance(dest, QuantizedWeight):  # from what the float load would hold
            quantize_into(dest[index], value.to(reader.dtype))
        else:
            dest[index].copy_(value)


def load_mxfp4(
    dest: Tensor | QuantizedWeight, key: str, op: str, reader: DequantizingReader
) -> Iterator[Piece]:
    """Load moekit's stacked expert weight (w_in (E, 2F, D) or w_out (E, D, F)) from the MXFP4
    pair of `key`, one expert at a time through `mxfp4_expert_weight` (the bytes as shipped, rows
    reordered). MXFP4 storage `dest` takes those bytes here (never decoded); for any other `dest`
    (float, or storage in another scheme) the pieces yielded are each expert decoded
    (`QuantizedWeight.dequantize`, to the reader's dtype: the float parameters'), at most
    SLICE_BYTES of float32 rows at a time, for `fill` to copy or requantize."""
    blocks, scales = reader.view.mxfp4_pairs[key]
    kept = isinstance(dest, QuantizedWeight) and dest.scheme == "mxfp4"
    for e in range(dest.shape[0]):
        qw_OI = mxfp4_expert_weight(
            reader.read_stored(blocks, e),
            reader.read_stored(scales, e),
            interleaved=MXFP4_OPS[op],
            name=key,
        )
        if kept:
            dest.data[e].copy_(qw_OI.data)
            dest.scales[e].copy_(qw_OI.scales)
            continue
        for part in block_row_slices(qw_OI.shape, (1, 1), SLICE_BYTES // 4):  # one-row blocks
            yield (e, part), qw_OI[part].dequantize(reader.dtype)
