"""The checkpoint formats DeepSeek-V3 (FP8, block scales) and GPT-OSS (MXFP4 experts) ship in:
`quant.formats` against an independent decoder (ml_dtypes' float8_e4m3fn, float4_e2m1fn and
float8_e8m0fnu, with the block scales and the gate/up interleaving applied here by plain loops
and slicing), and `load_hf` of small synthetic checkpoints in both formats against transformers.

transformers 5.23 runs GPT-OSS's MXFP4 on CPU dequantized (Mxfp4Config(dequantize=True)): its
logits are compared directly. Its FP8 loader needs `accelerate` (not a dependency here) and infers
the block size as shape // grid, which is wrong for the edge blocks these checkpoints have on
purpose; the FP8 model is compared with transformers running a float32 checkpoint of the
independently decoded weights instead (as is the MXFP4 one, too).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from tests.interop_cases import CASES, COMMON, DROP, hf_config, randomize, tokens
from tests.test_interop_mtp import mtp_model
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from moekit import userfiles
from moekit.config import QuantizeConfig
from moekit.interop import CheckpointError, load_hf, save_hf
from moekit.interop import hf as interop_hf
from moekit.interop import quantized as interop_quantized
from moekit.quant.formats import (
    block_row_slices,
    check_fp8_scales,
    dequantize_fp8_blocks,
    mxfp4_expert_weight,
)
from moekit.quant.modules import QuantizedLinear, quantize_model
from moekit.quant.schemes import QuantizedWeight

FP8_BLOCK = (16, 8)  # not square: rows and columns swapped would not fit
FP8_CONFIG = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": list(FP8_BLOCK),
}
MXFP4_CONFIG = {
    "quant_method": "mxfp4",
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
}
# GPT-OSS with widths MXFP4 can hold (multiples of 32)
GPT_OSS_MXFP4 = dict(hidden_size=64, head_dim=16, intermediate_size=32)


# ---- the independent decoders (ml_dtypes, loops) ----


def decode_fp8(w_fp8_MN: torch.Tensor, scale_inv_GH: torch.Tensor, block: tuple[int, int]):
    """float32 W (M, N): each bm x bn tile of the e4m3 codes times its own scale."""
    codes = w_fp8_MN.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
    out = codes.astype(np.float32)
    scales = scale_inv_GH.numpy()
    bm, bn = block
    assert scales.shape == (math.ceil(out.shape[0] / bm), math.ceil(out.shape[1] / bn))
    for gi in range(scales.shape[0]):
        for gj in range(scales.shape[1]):
            out[gi * bm : (gi + 1) * bm, gj * bn : (gj + 1) * bn] *= scales[gi, gj]
    return torch.from_numpy(out)


def decode_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 (..., rows, G * 32) of blocks (..., rows, G, 16) and scales (..., rows, G): byte j
    of a block holds element 2j in its low nibble, 2j + 1 in its high one."""
    b = blocks.numpy()
    nibbles = np.stack([b & 15, b >> 4], axis=-1).reshape(*b.shape[:-1], 32)
    values = nibbles.astype(np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float32)
    scale = scales.numpy().view(ml_dtypes.float8_e8m0fnu).astype(np.float32)
    return torch.from_numpy((values * scale[..., None]).reshape(*b.shape[:-2], -1))


def as_transformers_reads(decoded_ERC: torch.Tensor) -> torch.Tensor:
    """transformers' dequantized layout: (E, rows, cols) transposed to (E, cols, rows)."""
    return decoded_ERC.transpose(-1, -2).contiguous()


# ---- the formats, as functions ----


def quantize_fp8(w_MN: torch.Tensor, block: tuple[int, int]):
    """(codes, scale_inv) with amax / 448 per block (an all-zero block gets scale 0)."""
    bm, bn = block
    grid = (math.ceil(w_MN.shape[0] / bm), math.ceil(w_MN.shape[1] / bn))
    scale_inv_GH = torch.zeros(grid)
    codes = torch.empty(w_MN.shape)
    for gi in range(grid[0]):
        for gj in range(grid[1]):
            tile = w_MN[gi * bm : (gi + 1) * bm, gj * bn : (gj + 1) * bn]
            scale_inv_GH[gi, gj] = tile.abs().max() / 448
            scale = scale_inv_GH[gi, gj] if scale_inv_GH[gi, gj] > 0 else 1.0
            codes[gi * bm : (gi + 1) * bm, gj * bn : (gj + 1) * bn] = tile / scale
    return codes.to(torch.float8_e4m3fn), scale_inv_GH


def odd_scales(scale_inv_GH: torch.Tensor) -> torch.Tensor:
    """The grid with its last (edge) block row negative and block (0, 1) zero."""
    scale_inv_GH = scale_inv_GH.clone()
    scale_inv_GH[-1] *= -1
    scale_inv_GH[0, min(1, scale_inv_GH.shape[1] - 1)] = 0.0
    return scale_inv_GH


def fp8_case(shape: tuple[int, int], grid: tuple[int, int], seed: int):
    """Codes and a scale grid of a random (M, N) weight in 128 x 128 blocks, odd scales."""
    torch.manual_seed(seed)
    w_fp8, scale_inv = quantize_fp8(torch.randn(shape), (128, 128))
    assert tuple(scale_inv.shape) == grid
    return w_fp8, odd_scales(scale_inv)


@pytest.mark.parametrize("shape, grid", [((136, 200), (2, 2)), ((576, 7168), (5, 56))])
def test_fp8_edge_blocks_negative_and_zero_scales_match_the_independent_decoder(
    shape, grid
) -> None:
    w_fp8, scale_inv = fp8_case(shape, grid, seed=0)
    ours = dequantize_fp8_blocks(w_fp8, scale_inv, (128, 128))
    assert torch.equal(ours, decode_fp8(w_fp8, scale_inv, (128, 128)))
    assert (ours[:128, 128:256] == 0).all() and (ours[:128, :128] != 0).any()  # zero scale (0, 1)


def test_fp8_block_size_is_the_configs_not_shape_over_grid() -> None:
    """transformers 5.23 reads a (136, 200) weight with a (2, 2) grid as 68 x 100 blocks."""
    w_fp8, scale_inv = fp8_case((136, 200), (2, 2), seed=0)
    ours = dequantize_fp8_blocks(w_fp8, scale_inv, (128, 128))
    shape_over_grid = decode_fp8(w_fp8, scale_inv, (68, 100))
    assert (ours - shape_over_grid).abs().max() > 0.1
    # the 8 x 72 edge tile takes its own scale (negative: the grid's last row is)
    corner = decode_fp8(w_fp8, scale_inv, (128, 128))[128:, 128:]
    assert torch.equal(ours[128:, 128:], corner)
    expected = w_fp8[128:, 128:].float() * scale_inv[1, 1]
    assert scale_inv[1, 1] < 0 and torch.equal(ours[128:, 128:], expected)


def test_block_row_slices_dequantize_an_fp8_weight_like_the_whole_weight() -> None:
    torch.manual_seed(1)
    w_fp8, scale_inv = quantize_fp8(torch.randn(41, 30), FP8_BLOCK)
    scale_inv = odd_scales(scale_inv)
    whole = dequantize_fp8_blocks(w_fp8, scale_inv, FP8_BLOCK)
    slices = block_row_slices((41, 30), FP8_BLOCK, max_elements=16 * 30)
    assert [(s.start, s.stop) for s in slices] == [(0, 16), (16, 32), (32, 41)]
    for start, stop in ((0, 16), (5, 23), (17, 41), (40, 41)):
        grid_rows = scale_inv[start // 16 : -(-stop // 16)]
        part = dequantize_fp8_blocks(w_fp8[start:stop], grid_rows, FP8_BLOCK, first_row=start)
        assert torch.equal(part, whole[start:stop])


def test_fp8_scale_grid_mismatch_names_the_tensor_the_shapes_and_what_fits() -> None:
    check_fp8_scales("kv_a_proj_with_mqa.weight", (576, 7168), (5, 56), (128, 128))
    with pytest.raises(ValueError, match=r"q\.weight of shape \(576, 7168\) has a scale grid of"):
        check_fp8_scales("q.weight", (576, 7168), (4, 56), (128, 128))
    expected = r"shape \(4, 56\); blocks of \[128, 128\] need \(5, 56\)"
    with pytest.raises(ValueError, match=expected):
        dequantize_fp8_blocks(
            torch.zeros(576, 7168).to(torch.float8_e4m3fn), torch.ones(4, 56), (128, 128)
        )


def random_mxfp4(lead_rows: tuple[int, ...], cols: int, seed: int, scale_bytes: list[int]):
    """Random blocks (every code, ±0 included) and scale bytes drawn from `scale_bytes`."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (*lead_rows, cols // 32, 16), generator=g, dtype=torch.uint8)
    pick = torch.randint(0, len(scale_bytes), (*lead_rows, cols // 32), generator=g)
    return blocks, torch.tensor(scale_bytes, dtype=torch.uint8)[pick]


def test_mxfp4_expert_weight_matches_the_independent_decoder_in_moekit_layout() -> None:
    blocks, scales = random_mxfp4((3, 6), 64, seed=2, scale_bytes=[0, 100, 126, 127, 128, 140])
    assert {0, 8, 7, 15} <= set((blocks & 15).unique().tolist())  # ±0, 6 and -6 are among them
    dense = as_transformers_reads(decode_mxfp4(blocks, scales))  # (E, D, 2F)
    gate, up = dense[..., 0::2], dense[..., 1::2]  # GPT-OSS's forward
    w_in = mxfp4_expert_weight(blocks, scales, interleaved=True)
    assert torch.equal(w_in.dequantize(), torch.cat([gate, up], dim=-1).transpose(-1, -2))
    # the bytes as shipped, rows reordered: gate rows (even) first, then up rows (odd)
    assert torch.equal(w_in.data[:, :3], blocks[:, 0::2].flatten(-2))
    assert torch.equal(w_in.scales[:, 3:], scales[:, 1::2])
    w_out = mxfp4_expert_weight(blocks, scales, interleaved=False)  # down_proj: (E, D, F) as is
    assert torch.equal(w_out.dequantize(), as_transformers_reads(dense))
    assert torch.equal(w_out.dequantize(torch.bfloat16), dense.transpose(-1, -2).bfloat16())


def test_mxfp4_mismatched_or_truncated_pairs_name_the_tensor() -> None:
    blocks, scales = random_mxfp4((2, 4), 64, seed=3, scale_bytes=[127])
    with pytest.raises(ValueError, match=r"w_blocks has shape \(2, 4, 2, 15\).*truncated"):
        mxfp4_expert_weight(blocks[..., :15], scales, interleaved=False, name="w")
    expected = r"w_blocks of shape \(2, 4, 1, 16\) and w_scales of shape \(2, 4, 2\).*\(2, 4, 1\)"
    with pytest.raises(ValueError, match=expected):
        mxfp4_expert_weight(blocks[:, :, :1], scales, interleaved=False, name="w")
    with pytest.raises(ValueError, match=r"w_scales is torch\.float32"):
        mxfp4_expert_weight(blocks, scales.float(), interleaved=False, name="w")


# ---- small checkpoints in both formats ----


def gpt_oss_config():
    _, _, _, overrides = CASES["gpt_oss"]
    kwargs = {k: v for k, v in {**COMMON, **overrides, **GPT_OSS_MXFP4}.items() if v is not DROP}
    return transformers.GptOssConfig(**kwargs)


def write_checkpoint(folder: Path, tensors: dict, config: dict) -> Path:
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def saved(model, folder: Path) -> tuple[dict, dict]:
    """The float32 tensors and config.json transformers' save_pretrained writes for `model`."""
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    tensors = load_file(str(folder / "model.safetensors"))
    shutil.rmtree(folder)
    return tensors, config


def is_fp8_quantized(key: str, t: torch.Tensor) -> bool:
    """DeepSeek-V3's FP8 weights: every linear weight but the embedding, head, router and the MTP
    layer's eh_proj and copies of the embedding and head."""
    skip = ("embed_tokens", "lm_head", "mlp.gate.weight", "norm", "eh_proj", "shared_head.head")
    return key.endswith(".weight") and t.dim() == 2 and not any(s in key for s in skip)


def fp8_checkpoints(tensors: dict, config: dict, root: Path) -> tuple[Path, Path]:
    """(FP8 checkpoint of float32 `tensors`, float32 checkpoint of its decoded weights)."""
    quantized, dense = {}, {}
    for key, t in tensors.items():
        if is_fp8_quantized(key, t):
            w_fp8, scale_inv = quantize_fp8(t, FP8_BLOCK)
            scale_inv = odd_scales(scale_inv)
            quantized |= {key: w_fp8, key + "_scale_inv": scale_inv}
            dense[key] = decode_fp8(w_fp8, scale_inv, FP8_BLOCK)
        else:
            quantized[key] = dense[key] = t
    fp8 = config | {"quantization_config": FP8_CONFIG}
    return write_checkpoint(root / "fp8", quantized, fp8), write_checkpoint(
        root / "dense", dense, config
    )


@pytest.fixture(scope="module")
def deepseek_fp8(tmp_path_factory) -> tuple[Path, Path]:
    """transformers' tiny DeepSeek-V3 as (FP8 checkpoint, float32 checkpoint of its decoded
    weights)."""
    root = tmp_path_factory.mktemp("deepseek_fp8")
    model = randomize(transformers.DeepseekV3ForCausalLM(hf_config("deepseek_v3")).float())
    fp8_dir, dense_dir = fp8_checkpoints(*saved(model, root / "src"), root)
    edge = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"
    shapes = {k: tuple(v.shape) for k, v in load_file(str(fp8_dir / "model.safetensors")).items()}
    assert shapes[edge] == (24, 40) and shapes[edge + "_scale_inv"] == (2, 5)
    return fp8_dir, dense_dir


def test_fp8_mtp_layer_loads_like_its_decoded_weights(tmp_path) -> None:
    """DeepSeek-V3's layer 61 as released: its block FP8, eh_proj and the copies of the
    embedding and head unquantized."""
    (tmp_path / "src").mkdir()
    save_hf(mtp_model(), tmp_path / "src", "deepseek_v3")
    tensors = load_file(str(tmp_path / "src" / "model.safetensors"))
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    assert "model.layers.3.self_attn.kv_a_proj_with_mqa.weight" in tensors
    fp8_dir, dense_dir = fp8_checkpoints(tensors, config, tmp_path)
    ours = load_hf(fp8_dir, dtype="float32")
    assert ours.cfg.mtp_depth == 1
    same_weights(ours, load_hf(dense_dir, dtype="float32"))


@pytest.fixture(scope="module")
def gpt_oss_mxfp4(tmp_path_factory) -> tuple[Path, Path]:
    """(MXFP4 checkpoint, float32 checkpoint of its independently decoded weights)."""
    root = tmp_path_factory.mktemp("gpt_oss_mxfp4")
    model = randomize(transformers.GptOssForCausalLM(gpt_oss_config()).float())
    tensors, config = saved(model, root / "src")
    quantized, dense = dict(tensors), dict(tensors)
    for seed, key in enumerate(k for k in tensors if k.endswith(("gate_up_proj", "down_proj"))):
        e, cols, rows = tensors[key].shape  # (E, D, 2F) or (E, F, D): stored transposed
        blocks, scales = random_mxfp4((e, rows), cols, seed, scale_bytes=[119, 120, 121, 122, 123])
        del quantized[key]
        quantized |= {key + "_blocks": blocks, key + "_scales": scales}
        dense[key] = as_transformers_reads(decode_mxfp4(blocks, scales))
    mx_dir = write_checkpoint(
        root / "mxfp4", quantized, config | {"quantization_config": MXFP4_CONFIG}
    )
    return mx_dir, write_checkpoint(root / "dense", dense, config)


def transformers_logits(model_class, folder: Path, x: torch.Tensor, **kwargs) -> torch.Tensor:
    model = model_class.from_pretrained(
        folder, attn_implementation="eager", experts_implementation="eager", **kwargs
    )
    with torch.no_grad():
        return model.eval()(x).logits


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def test_deepseek_fp8_checkpoint_loads_its_decoded_weights_and_transformers_logits(
    deepseek_fp8,
) -> None:
    fp8_dir, dense_dir = deepseek_fp8
    ours = load_hf(fp8_dir, dtype="float32")
    same_weights(ours, load_hf(dense_dir, dtype="float32"))  # every weight, in moekit's layout
    x = tokens()
    theirs = transformers_logits(transformers.DeepseekV3ForCausalLM, dense_dir, x)
    with torch.no_grad():
        assert (ours(x).logits - theirs).abs().max() < 1e-4


def test_gpt_oss_mxfp4_checkpoint_loads_its_decoded_weights_and_transformers_logits(
    gpt_oss_mxfp4,
) -> None:
    mx_dir, dense_dir = gpt_oss_mxfp4
    ours = load_hf(mx_dir, dtype="float32")
    same_weights(ours, load_hf(dense_dir, dtype="float32"))
    x = tokens()
    with torch.no_grad():
        logits = ours(x).logits
    dense = transformers_logits(transformers.GptOssForCausalLM, dense_dir, x)
    assert (logits - dense).abs().max() < 1e-4
    mxfp4 = transformers_logits(  # transformers' own MXFP4 dequantizer, on CPU
        transformers.GptOssForCausalLM,
        mx_dir,
        x,
        quantization_config=transformers.Mxfp4Config(dequantize=True),
        dtype=torch.float32,
    )
    assert (logits - mxfp4).abs().max() < 1e-4


def test_quantized_checkpoints_load_in_bfloat16_by_default(deepseek_fp8, gpt_oss_mxfp4) -> None:
    for folder in (deepseek_fp8[0], gpt_oss_mxfp4[0]):
        default, wide = load_hf(folder), load_hf(folder, dtype="float32")
        for (name, p), q in zip(
            default.state_dict().items(), wide.state_dict().values(), strict=True
        ):
            if "expert_bias" in name:
                assert p.dtype == torch.float32
            else:
                assert p.dtype == torch.bfloat16 and torch.equal(p, q.bfloat16()), name


def test_fp8_has_no_kept_form_and_quantizes_as_it_streams(deepseek_fp8) -> None:
    """keep_quantized leaves FP8 weights dequantized (moekit stores no FP8); quantize= loads them
    straight into int8, a slice at a time: what quantize_model makes of the float load."""
    fp8_dir = deepseek_fp8[0]
    same_weights(load_hf(fp8_dir, keep_quantized=True), load_hf(fp8_dir))
    config = QuantizeConfig(weights="int8")
    streamed = load_hf(fp8_dir, quantize=config)
    assert isinstance(streamed.layers[1].attn.o_proj, QuantizedLinear)
    same_weights(streamed, quantize_model(load_hf(fp8_dir), config))


class LargestFloat(TorchDispatchMode):
    """The largest float tensor (bytes of its storage) any torch op allocates while active. An
    op's output over a storage given to it (a view, an in-place op, a tensor set over the
    checkpoint's memory-mapped file) allocates nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {_storage(a) for a in tree_leaves((args, kwargs))}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and _storage(t) not in given:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def _storage(a: object) -> int | None:
    if isinstance(a, torch.Tensor):
        return a.untyped_storage().data_ptr()
    return a.data_ptr() if isinstance(a, torch.UntypedStorage | torch.TypedStorage) else None


@pytest.mark.parametrize(
    "case", ["fp8 per-expert keys", "fused layout", "float transposed", "mxfp4 to int4"]
)
def test_quantize_while_loading_holds_one_expert_in_float_at_a_time(
    case: str, deepseek_fp8, gpt_oss_mxfp4, tmp_path, monkeypatch
) -> None:
    """load_hf(quantize=...) fills a layer's quantized experts one expert (or part of one) at a
    time: no float tensor larger than one expert's weight in float32 is made while they are
    filled (the whole layer in float was), and the result is quantize_model's of the float
    load."""
    int8, int4 = QuantizeConfig(weights="int8"), QuantizeConfig(weights="int8", experts="int4")
    folder, config = {
        "fp8 per-expert keys": (deepseek_fp8[0], int8),
        "fused layout": (deepseek_fp8[1], int8),
        "float transposed": (gpt_oss_mxfp4[1], int4),
        "mxfp4 to int4": (gpt_oss_mxfp4[0], int4),
    }[case]
    if case == "fused layout":
        model = load_hf(folder, dtype="float32")
        folder = save_hf(model, tmp_path / "fused", "deepseek_v3", layout="fused")
    seen = []
    real = interop_hf.fill

    def watched(dest, *args) -> None:
        if not (isinstance(dest, QuantizedWeight) and dest.data.dim() == 3):
            return real(dest, *args)
        with LargestFloat() as mode:
            real(dest, *args)
        seen.append((args[1][0], mode.largest, math.prod(dest.shape[1:]) * 4))

    monkeypatch.setattr(interop_hf, "fill", watched)
    streamed = load_hf(folder, quantize=config)
    monkeypatch.undo()
    assert seen and all(largest <= one_expert for _, largest, one_expert in seen), seen
    same_weights(streamed, quantize_model(load_hf(folder), config))


def test_fp8_weights_streamed_in_small_slices_load_the_same(deepseek_fp8, monkeypatch) -> None:
    whole = load_hf(deepseek_fp8[0], dtype="float32")
    monkeypatch.setattr(userfiles, "SLICE_BYTES", 16 * 40)
    monkeypatch.setattr(interop_quantized, "SLICE_BYTES", 4 * 16 * 8)  # one block row of 8
    seen = []
    real = interop_quantized.dequantize_fp8_blocks
    monkeypatch.setattr(
        interop_quantized,
        "dequantize_fp8_blocks",
        lambda w, s, *a, **k: seen.append(w.shape[0]) or real(w, s, *a, **k),
    )
    same_weights(whole, load_hf(deepseek_fp8[0], dtype="float32"))
    assert {16, 8} <= set(seen)  # whole block rows of 16, the 8-row edge alone


# ---- bad input: one CheckpointError naming what is wrong, before any weight is read ----


def edited(folder: Path, tmp_path: Path, config=None, tensors=None) -> Path:
    out = tmp_path / "edited"
    shutil.copytree(folder, out)
    if config is not None:
        cfg = json.loads((out / "config.json").read_text())
        config(cfg["quantization_config"])
        (out / "config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        weights = load_file(str(out / "model.safetensors"))
        tensors(weights)
        weights = {k: v.contiguous() for k, v in weights.items()}
        save_file(weights, str(out / "model.safetensors"))
    return out


KV_A = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"
GATE_UP = "model.layers.2.mlp.experts.gate_up_proj"
DOWN = "model.layers.0.mlp.experts.down_proj"


def _set(key: str, value):
    return lambda d: d.__setitem__(key, value(d))


BAD_FP8 = {
    "unknown quant_method": (
        dict(config=_set("quant_method", lambda c: "gptq")),
        r"quant_method='gptq' is not supported: moekit reads 'fp8' and 'mxfp4'",
    ),
    "fp8 fmt other than e4m3": (
        dict(config=_set("fmt", lambda c: "e5m2")),
        r"quantization_config\.fmt='e5m2' is not supported.*'e4m3'",
    ),
    "no block size": (
        dict(config=lambda c: c.pop("weight_block_size")),
        r"weight_block_size=None is invalid.*\[128, 128\]",
    ),
    "missing scale tensor": (
        dict(tensors=lambda t: t.pop(KV_A + "_scale_inv")),
        rf"{KV_A} is F8_E4M3 without its scale grid {KV_A}_scale_inv",
    ),
    "scale grid of the wrong shape": (
        dict(tensors=_set(KV_A + "_scale_inv", lambda t: torch.ones(1, 5))),
        rf"{KV_A} of shape \(24, 40\) has a scale grid of shape \(1, 5\); blocks of \[16, 8\] "
        r"need \(2, 5\)",
    ),
    "a scale without its weight": (
        dict(tensors=lambda t: t.pop(KV_A)),
        rf"{KV_A}_scale_inv scales no tensor: {KV_A} is missing",
    ),
}
BAD_MXFP4 = {
    "truncated blocks": (
        dict(tensors=_set(GATE_UP + "_blocks", lambda t: t[GATE_UP + "_blocks"][..., :15])),
        rf"{GATE_UP}_blocks has shape \(5, 64, 2, 15\): MXFP4 blocks are "
        r".*16\), 16 bytes .*truncated",
    ),
    "blocks and scales mismatched": (
        dict(tensors=_set(DOWN + "_scales", lambda t: t[DOWN + "_scales"][:, :, :0])),
        rf"{DOWN}_blocks of shape \(5, 64, 1, 16\) and {DOWN}_scales of shape \(5, 64, 0\) "
        r"do not match: the scales must be \(5, 64, 1\)",
    ),
    "missing scales": (
        dict(tensors=lambda t: t.pop(DOWN + "_scales")),
        rf"{DOWN}_blocks has no partner: {DOWN}_scales is missing",
    ),
    "a pair of the wrong size": (
        dict(
            tensors=lambda t: t.update(
                {k: t[k][:, :32] for k in (GATE_UP + "_blocks", GATE_UP + "_scales")}
            )
        ),
        rf"{GATE_UP}_blocks \(5, 32, 2, 16\) with {GATE_UP}_scales \(5, 32, 2\) hold a "
        r"\(5, 64, 32\) weight.*needs \(5, 64, 64\): blocks \(5, 64, 2, 16\), scales \(5, 64, 2\)",
    ),
    "fp8 tensors in an mxfp4 checkpoint": (
        dict(tensors=_set("lm_head.weight", lambda t: t["lm_head.weight"].to(torch.float8_e4m3fn))),
        r"lm_head\.weight is F8_E4M3 but config\.json declares no quant_method 'fp8'",
    ),
}


def refuse_reads(monkeypatch) -> None:
    def read(self, key, rows=None):
        raise AssertionError(f"{key} was read before the checkpoint was checked")

    monkeypatch.setattr(userfiles.CheckpointReader, "read", read)


@pytest.mark.parametrize("case", list(BAD_FP8) + list(BAD_MXFP4))
def test_bad_quantized_checkpoints_fail_naming_the_problem_before_reading(
    case: str, deepseek_fp8, gpt_oss_mxfp4, tmp_path, monkeypatch
) -> None:
    (edit, message), source = (
        (BAD_FP8[case], deepseek_fp8[0]) if case in BAD_FP8 else (BAD_MXFP4[case], gpt_oss_mxfp4[0])
    )
    folder = edited(source, tmp_path, **edit)
    refuse_reads(monkeypatch)
    with pytest.raises(CheckpointError, match=message):
        load_hf(folder)


def test_save_hf_writes_unquantized_only(gpt_oss_mxfp4, tmp_path) -> None:
    model = load_hf(gpt_oss_mxfp4[0])
    with pytest.raises(ValueError, match="save_hf writes unquantized weights"):
        save_hf(model, tmp_path / "out", "gpt_oss", extra_config={"quantization_config": {}})
    assert not (tmp_path / "out").exists()
    back = load_hf(save_hf(model, tmp_path / "out", "gpt_oss"))  # bfloat16, unquantized
    same_weights(model, back)
