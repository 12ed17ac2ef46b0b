"""GPT-OSS: attention sinks and biases, alternating sliding windows, experts with biases and a
clamped SwiGLU stored fused ((E, D, 2F), gate and up interleaved), a router with a bias."""

from __future__ import annotations

from moekit.config import ModelConfig, MoEConfig
from moekit.interop.architecture import Architecture
from moekit.interop.configs import (
    HF,
    common_from_hf,
    common_to_hf,
    layer_windows_from_hf,
    layer_windows_to_hf,
    moe_from_hf,
    moe_to_hf,
)
from moekit.interop.keymaps import LAYER, MLP, Source, attention_keys, common_keys

# moekit's fields -> this architecture's config.json keys, where it names them its own way
NAMES = {"n_experts": "num_local_experts", "d_expert": "intermediate_size"}


def from_hf(hf: HF) -> ModelConfig:
    n = hf["num_hidden_layers"]
    types = hf["layer_types"] or [
        "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)
    ]
    moe = MoEConfig(
        **moe_from_hf(hf, NAMES),
        activation="clamped_swiglu",
        swiglu_alpha=float(hf["swiglu_alpha"]),
        swiglu_limit=float(hf["swiglu_limit"]),
        expert_bias=True,
        router_bias=True,
    )
    return ModelConfig(
        **common_from_hf(hf),
        moe=moe,
        attn_bias=bool(hf["attention_bias"]),
        attn_sinks=True,
        **layer_windows_from_hf(hf, types),
    )


def to_hf(cfg: ModelConfig, moe: MoEConfig) -> HF:
    return {
        **common_to_hf(cfg),
        **moe_to_hf(moe, NAMES),
        "swiglu_alpha": moe.swiglu_alpha,
        "swiglu_limit": moe.swiglu_limit,
        "attention_bias": cfg.attn_bias is True,
        **layer_windows_to_hf(cfg),
    }


GPT_OSS = Architecture(
    names=NAMES,
    model_type="gpt_oss",
    class_name="GptOssForCausalLM",
    defaults={
        "rms_norm_eps": 1e-5,
        "rope_theta": 150000.0,
        "num_local_experts": 128,
        "num_experts_per_tok": 4,
        "head_dim": 64,
        "num_key_value_heads": 8,
        "sliding_window": 128,
        "layer_types": None,
        "attention_bias": True,
        "swiglu_alpha": 1.702,
        "swiglu_limit": 7.0,
        "max_position_embeddings": 131072,
        "rope_parameters": {
            "rope_type": "yarn",
            "factor": 32.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
            "original_max_position_embeddings": 4096,
        },
    },
    aliases={"num_experts": "num_local_experts"},
    from_hf=from_hf,
    to_hf=to_hf,
    keys={  # one layout: experts (E, D, 2F) with gate and up interleaved, down_proj transposed
        **common_keys(),
        **attention_keys(),
        "layers.{i}.attn.sinks": Source((LAYER + "self_attn.sinks",)),
        "layers.{i}.ffn.router.weight": Source((MLP + "router.weight",)),
        "layers.{i}.ffn.router.bias": Source((MLP + "router.bias",)),
        "layers.{i}.ffn.experts.w_in": Source((MLP + "experts.gate_up_proj",), "interleaved_t"),
        "layers.{i}.ffn.experts.b_in": Source(
            (MLP + "experts.gate_up_proj_bias",), "interleaved_t"
        ),
        "layers.{i}.ffn.experts.w_out": Source((MLP + "experts.down_proj",), "transpose"),
        "layers.{i}.ffn.experts.b_out": Source((MLP + "experts.down_proj_bias",)),
    },
    reads_hidden_act=False,  # the experts' clamped SwiGLU is fixed; hidden_act is not read
)
