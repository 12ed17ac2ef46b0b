"""OLMoE: every layer MoE, q/k norms over the full width, q/k/v clipped at `clip_qkv`; its
config has no head_dim."""

from __future__ import annotations

from moekit.config import ModelConfig, MoEConfig
from moekit.interop.architecture import Architecture
from moekit.interop.configs import (
    HF,
    common_from_hf,
    common_to_hf,
    derived_head_dim,
    moe_from_hf,
    moe_to_hf,
)
from moekit.interop.keymaps import attention_keys, common_keys, mlp_keys

# moekit's fields -> this architecture's config.json keys, where it names them its own way
NAMES = {"n_experts": "num_experts", "d_expert": "intermediate_size"}


def from_hf(hf: HF) -> ModelConfig:
    moe = MoEConfig(
        **moe_from_hf(hf, NAMES),
        normalize=bool(hf["norm_topk_prob"]),
    )
    common = common_from_hf(hf) | {"head_dim": derived_head_dim(hf)}  # OLMoE reads no head_dim
    return ModelConfig(
        **common,
        moe=moe,
        attn_bias=bool(hf["attention_bias"]),
        qk_norm="full",
        clip_qkv=hf["clip_qkv"],
    )


def to_hf(cfg: ModelConfig, moe: MoEConfig) -> HF:
    out = common_to_hf(cfg)
    del out["head_dim"]
    return {
        **out,
        **moe_to_hf(moe, NAMES),
        "norm_topk_prob": moe.normalize,
        "attention_bias": cfg.attn_bias is True,
        "clip_qkv": cfg.clip_qkv,
    }


OLMOE = Architecture(
    names=NAMES,
    model_type="olmoe",
    class_name="OlmoeForCausalLM",
    defaults={
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e4,
        "num_experts": 64,
        "num_experts_per_tok": 8,
        "norm_topk_prob": False,
        "clip_qkv": None,
        "router_aux_loss_coef": 0.01,
    },
    aliases={"num_local_experts": "num_experts"},
    from_hf=from_hf,
    to_hf=to_hf,
    keys={**common_keys(), **attention_keys(), **mlp_keys()},
)
