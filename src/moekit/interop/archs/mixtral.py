"""Mixtral: every layer MoE, no shared experts; one sliding window for all layers or none."""

from __future__ import annotations

from moekit.config import ModelConfig, MoEConfig
from moekit.interop.architecture import Architecture
from moekit.interop.configs import (
    HF,
    common_from_hf,
    common_to_hf,
    moe_from_hf,
    moe_to_hf,
    one_window,
)
from moekit.interop.keymaps import LAYER, MLP, Source, attention_keys, common_keys, expert_keys

HUB = LAYER + "block_sparse_moe."  # the hub's prefix of the router and experts


# moekit's fields -> this architecture's config.json keys, where it names them its own way
NAMES = {"n_experts": "num_local_experts", "d_expert": "intermediate_size"}


def from_hf(hf: HF) -> ModelConfig:
    moe = MoEConfig(**moe_from_hf(hf, NAMES))
    return ModelConfig(**common_from_hf(hf), moe=moe, sliding_window=hf["sliding_window"])


def to_hf(cfg: ModelConfig, moe: MoEConfig) -> HF:
    return {
        **common_to_hf(cfg),
        **moe_to_hf(moe, NAMES),
        "sliding_window": one_window(cfg),
    }


MIXTRAL = Architecture(
    names=NAMES,
    model_type="mixtral",
    class_name="MixtralForCausalLM",
    defaults={
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "num_key_value_heads": 8,
        "sliding_window": None,
        "max_position_embeddings": 131072,
    },
    aliases={"num_experts": "num_local_experts"},
    from_hf=from_hf,
    to_hf=to_hf,
    keys={  # the hub's `block_sparse_moe.experts.{e}.w1/w3/w2`, transformers 5's `mlp.`
        **common_keys(),
        **attention_keys(),
        "layers.{i}.ffn.router.weight": (
            Source((HUB + "gate.weight",)),
            Source((MLP + "gate.weight",)),
        ),
        **expert_keys(HUB, MLP, ("w1", "w3", "w2")),
    },
)
