"""DeepSeek-V3: multi-head latent attention, sigmoid scores with an auxiliary-loss-free
correction bias, group-limited routing, shared experts, dense first layers, and the
multi-token-prediction layers after the last (`num_nextn_predict_layers`; the released layer 61):
`model.layers.{N}.enorm / hnorm / eh_proj / shared_head.norm` and a decoder layer's tensors, plus
copies of the embedding (`embed_tokens`) and head (`shared_head.head`), which moekit shares with
the main model (as vLLM's deepseek_mtp.py and transformers' MtpModel do)."""

from __future__ import annotations

from moekit.config import MLAConfig, ModelConfig, MoEConfig
from moekit.interop.architecture import Architecture
from moekit.interop.configs import HF, common_from_hf, common_to_hf, dense_width, moe_from_hf
from moekit.interop.keymaps import (
    LAYER,
    MLP,
    KeyMap,
    Source,
    attention_keys,
    common_keys,
    mlp_keys,
    shared_expert_keys,
)

# The routing the architecture computes (transformers' DeepseekV3 always does; other readers,
# llama.cpp's converter among them, take softmax where config.json does not say sigmoid).
SCORING = {"scoring_func": "sigmoid", "topk_method": "noaux_tc"}


# moekit's fields -> this architecture's config.json keys, where it names them its own way
NAMES = {
    "n_experts": "n_routed_experts",
    "d_expert": "moe_intermediate_size",
    "n_groups": "n_group",
    "topk_groups": "topk_group",
    "routed_scaling": "routed_scaling_factor",
}


def from_hf(hf: HF) -> ModelConfig:
    for key, value in SCORING.items():
        if hf[key] != value:
            raise ValueError(f"{key}={hf[key]!r}: deepseek_v3 routes with {key}={value!r} only")
    routed = moe_from_hf(hf, NAMES)
    routed["aux_loss_coef"] = 0.0  # auxiliary-loss-free: the correction bias balances instead
    moe = MoEConfig(
        **routed,
        score="sigmoid",
        normalize=bool(hf["norm_topk_prob"]),
        routed_scaling=float(hf[NAMES["routed_scaling"]]),
        n_groups=hf[NAMES["n_groups"]] or 1,
        topk_groups=hf[NAMES["topk_groups"]] or 1,
        n_shared_experts=hf["n_shared_experts"] or 0,
    )
    mla = MLAConfig(
        q_lora_rank=hf["q_lora_rank"],
        kv_lora_rank=hf["kv_lora_rank"],
        qk_nope_head_dim=hf["qk_nope_head_dim"],
        qk_rope_head_dim=hf["qk_rope_head_dim"],
        v_head_dim=hf["v_head_dim"],
        rope_interleave=bool(hf["rope_interleave"]),
    )
    common = common_from_hf(hf)
    common.update(n_kv_heads=None, head_dim=None)  # latent attention has neither
    return ModelConfig(
        **common,
        d_ff=hf["intermediate_size"],
        moe=moe,
        first_dense=hf["first_k_dense_replace"] or 0,
        attn_bias=bool(hf["attention_bias"]),
        mla=mla,
        mtp_depth=hf["num_nextn_predict_layers"] or 0,
    )


def to_hf(cfg: ModelConfig, moe: MoEConfig) -> HF:
    if cfg.mla is None:
        raise ValueError("deepseek_v3 needs multi-head latent attention: set ModelConfig.mla")
    m = cfg.mla
    out = common_to_hf(cfg)
    out.update(num_key_value_heads=cfg.n_heads, head_dim=m.qk_rope_head_dim)
    return {
        **out,
        "intermediate_size": dense_width(cfg),
        NAMES["d_expert"]: moe.d_expert,
        NAMES["n_experts"]: moe.n_experts,
        "num_experts_per_tok": moe.top_k,
        "n_shared_experts": moe.n_shared_experts,
        NAMES["routed_scaling"]: moe.routed_scaling,
        NAMES["n_groups"]: moe.n_groups,
        NAMES["topk_groups"]: moe.topk_groups,
        "norm_topk_prob": moe.normalize,
        "first_k_dense_replace": cfg.n_layers - len(cfg.moe_layer_indices),
        "q_lora_rank": m.q_lora_rank,
        "kv_lora_rank": m.kv_lora_rank,
        "qk_nope_head_dim": m.qk_nope_head_dim,
        "qk_rope_head_dim": m.qk_rope_head_dim,
        "v_head_dim": m.v_head_dim,
        "rope_interleave": m.rope_interleave,
        "attention_bias": cfg.attn_bias is True,
        "num_nextn_predict_layers": cfg.mtp_depth,
        **SCORING,
    }


# moekit's latent-attention modules -> DeepSeek-V3's (under self_attn.)
_LATENT_ATTENTION = {
    "q_proj": "q_proj",
    "q_a_proj": "q_a_proj",
    "q_a_norm": "q_a_layernorm",
    "q_b_proj": "q_b_proj",
    "kv_a_proj": "kv_a_proj_with_mqa",
    "kv_a_norm": "kv_a_layernorm",
    "kv_b_proj": "kv_b_proj",
    "o_proj": "o_proj",
}


def mtp_keys() -> KeyMap:
    """The MTP layers' own tensors (their blocks' take the layers' templates)."""
    own = {"enorm": "enorm", "hnorm": "hnorm", "eh_proj": "eh_proj", "norm": "shared_head.norm"}
    return {
        f"mtp.{{i}}.{ours}.weight": Source((f"{LAYER}{theirs}.weight",))
        for ours, theirs in own.items()
    }


def mtp_copies(cfg: ModelConfig) -> dict[str, str]:
    """Each MTP layer's copies of the embedding and of the head (the embedding when tied)."""
    head = "model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"
    out = {}
    for layer in range(cfg.n_layers, cfg.n_layers + cfg.mtp_depth):
        out[f"model.layers.{layer}.embed_tokens.weight"] = "model.embed_tokens.weight"
        out[f"model.layers.{layer}.shared_head.head.weight"] = head
    return out


DEEPSEEK_V3 = Architecture(
    names=NAMES,
    model_type="deepseek_v3",
    class_name="DeepseekV3ForCausalLM",
    defaults={
        "rope_theta": 1e4,
        "n_routed_experts": 256,
        "num_experts_per_tok": 8,
        "n_shared_experts": 1,
        "routed_scaling_factor": 2.5,
        "n_group": 8,
        "topk_group": 4,
        "norm_topk_prob": True,
        "first_k_dense_replace": 3,
        "q_lora_rank": 1536,
        "kv_lora_rank": 512,
        "qk_rope_head_dim": 64,
        "qk_nope_head_dim": 128,
        "v_head_dim": 128,
        "rope_interleave": True,
        "num_nextn_predict_layers": 1,
        **SCORING,
    },
    aliases={"num_local_experts": "n_routed_experts", "num_mtp_layers": "num_nextn_predict_layers"},
    from_hf=from_hf,
    to_hf=to_hf,
    keys={  # latent attention, `mlp.shared_experts.*`, the router's correction bias
        **common_keys(),
        **attention_keys(_LATENT_ATTENTION),
        **mlp_keys(),
        "layers.{i}.ffn.router.expert_bias": Source((MLP + "gate.e_score_correction_bias",)),
        **shared_expert_keys(MLP + "shared_experts."),
        **mtp_keys(),
    },
    copies=mtp_copies,
)
