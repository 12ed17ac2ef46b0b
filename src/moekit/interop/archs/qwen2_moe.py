"""Qwen2-MoE: a shared expert behind a sigmoid gate, q/k/v biases, dense layers chosen by
`decoder_sparse_step` and `mlp_only_layers`, sliding windows on the lower layers."""

from __future__ import annotations

from moekit.config import ModelConfig, MoEConfig
from moekit.interop.architecture import Architecture
from moekit.interop.configs import (
    HF,
    common_from_hf,
    common_to_hf,
    dense_width,
    layer_windows_from_hf,
    layer_windows_to_hf,
    moe_from_hf,
    moe_to_hf,
)
from moekit.interop.keymaps import (
    MLP,
    Source,
    attention_keys,
    common_keys,
    mlp_keys,
    shared_expert_keys,
)

# moekit's fields -> this architecture's config.json keys, where it names them its own way
NAMES = {"n_experts": "num_experts", "d_expert": "moe_intermediate_size"}


def moe_layers_from_hf(hf: HF) -> tuple[int, ...] | str:
    """Qwen's MoE layers: (i + 1) % decoder_sparse_step == 0 and i not in mlp_only_layers."""
    step, dense = hf["decoder_sparse_step"], set(hf["mlp_only_layers"] or [])
    if type(step) is not int or step < 1:
        raise ValueError(f"decoder_sparse_step={step!r} is invalid: must be a positive count")
    layers = [i for i in range(hf["num_hidden_layers"]) if (i + 1) % step == 0 and i not in dense]
    return "all" if len(layers) == hf["num_hidden_layers"] else tuple(layers)


def moe_layers_to_hf(cfg: ModelConfig) -> HF:
    """Qwen's dense layers as mlp_only_layers, and their width."""
    moe = set(cfg.moe_layer_indices)
    dense = [i for i in range(cfg.n_layers) if i not in moe]
    return {
        "decoder_sparse_step": 1,
        "mlp_only_layers": dense,
        "intermediate_size": dense_width(cfg),
    }


def from_hf(hf: HF) -> ModelConfig:
    moe = None
    if hf["num_experts"] > 0:
        moe = MoEConfig(
            **moe_from_hf(hf, NAMES),
            normalize=bool(hf["norm_topk_prob"]),
            n_shared_experts=1,
            d_shared=hf["shared_expert_intermediate_size"],
            shared_gate=True,
        )
    types = hf.get("layer_types") or [
        "sliding_attention" if (i + 1) % 2 and i < hf["max_window_layers"] else "full_attention"
        for i in range(hf["num_hidden_layers"])
    ]
    return ModelConfig(
        **common_from_hf(hf),
        d_ff=hf["intermediate_size"],
        moe=moe,
        moe_layers=moe_layers_from_hf(hf),
        attn_bias="qkv" if hf["qkv_bias"] else False,
        **layer_windows_from_hf(hf, types if hf["use_sliding_window"] else []),
    )


def to_hf(cfg: ModelConfig, moe: MoEConfig) -> HF:
    if moe.shared_width == 0:  # Qwen2-MoE's layers always add a (gated) shared expert
        raise ValueError(
            "qwen2_moe cannot express this model: every Qwen2-MoE layer has a shared expert "
            "(shared_expert_intermediate_size) and this model has none; write it as mixtral, "
            "qwen3_moe or olmoe instead"
        )
    layer_windows = layer_windows_to_hf(cfg)
    return {
        **common_to_hf(cfg),
        **moe_layers_to_hf(cfg),
        **moe_to_hf(moe, NAMES),
        "norm_topk_prob": moe.normalize,
        "shared_expert_intermediate_size": moe.shared_width,
        "qkv_bias": cfg.attn_bias == "qkv",
        "use_sliding_window": layer_windows["sliding_window"] is not None,
        **layer_windows,
        "max_window_layers": cfg.n_layers,
    }


QWEN2_MOE = Architecture(
    names=NAMES,
    model_type="qwen2_moe",
    class_name="Qwen2MoeForCausalLM",
    defaults={
        "rope_theta": 1e4,
        "num_experts": 60,
        "num_experts_per_tok": 4,
        "norm_topk_prob": False,
        "qkv_bias": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "use_sliding_window": False,
        "sliding_window": 4096,
        "max_window_layers": 28,
        "shared_expert_intermediate_size": 5632,
        "num_key_value_heads": 16,
        "max_position_embeddings": 32768,
    },
    aliases={},
    from_hf=from_hf,
    to_hf=to_hf,
    keys={  # Qwen3-MoE's, and the shared expert at `mlp.shared_expert.` with its gate
        **common_keys(),
        **attention_keys(),
        **mlp_keys(),
        **shared_expert_keys(MLP + "shared_expert."),
        "layers.{i}.ffn.shared_experts.gate.weight": Source((MLP + "shared_expert_gate.weight",)),
    },
)
