"""Qwen3-MoE: Qwen2-MoE's layer choice without the shared expert; per-head q/k norms; one
sliding window for all layers or none."""

from __future__ import annotations

from moekit.config import ModelConfig, MoEConfig
from moekit.interop.architecture import Architecture
from moekit.interop.archs.qwen2_moe import moe_layers_from_hf, moe_layers_to_hf
from moekit.interop.configs import (
    HF,
    common_from_hf,
    common_to_hf,
    moe_from_hf,
    moe_to_hf,
    one_window,
)
from moekit.interop.keymaps import attention_keys, common_keys, mlp_keys

# moekit's fields -> this architecture's config.json keys, where it names them its own way
NAMES = {"n_experts": "num_local_experts", "d_expert": "moe_intermediate_size"}


def from_hf(hf: HF) -> ModelConfig:
    moe = MoEConfig(
        **moe_from_hf(hf, NAMES),
        normalize=bool(hf["norm_topk_prob"]),
    )
    return ModelConfig(
        **common_from_hf(hf),
        d_ff=hf["intermediate_size"],
        moe=moe,
        moe_layers=moe_layers_from_hf(hf),
        attn_bias=bool(hf["attention_bias"]),
        qk_norm="head",
        sliding_window=hf["sliding_window"] if hf["use_sliding_window"] else None,
    )


def to_hf(cfg: ModelConfig, moe: MoEConfig) -> HF:
    window = one_window(cfg)
    return {
        **common_to_hf(cfg),
        **moe_layers_to_hf(cfg),
        **moe_to_hf(moe, NAMES | {"n_experts": "num_experts"}),  # as published configs name it
        "norm_topk_prob": moe.normalize,
        "attention_bias": cfg.attn_bias is True,
        "use_sliding_window": window is not None,
        "sliding_window": window,
    }


QWEN3_MOE = Architecture(
    names=NAMES,
    model_type="qwen3_moe",
    class_name="Qwen3MoeForCausalLM",
    defaults={
        "rope_theta": 1e4,
        "num_local_experts": 128,
        "num_experts_per_tok": 8,
        "norm_topk_prob": False,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "use_sliding_window": False,
        "sliding_window": 4096,
        "num_key_value_heads": 4,
        "max_position_embeddings": 32768,
    },
    aliases={"num_experts": "num_local_experts"},  # transformers' attribute_map
    from_hf=from_hf,
    to_hf=to_hf,
    keys={**common_keys(), **attention_keys(), **mlp_keys()},
)
