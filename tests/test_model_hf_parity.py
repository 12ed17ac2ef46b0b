"""MoETransformer computes what `transformers` computes for the same weights: tiny random
Qwen3-MoE (GQA, per-head q/k norm), OLMoE (q/k norm over the projections, unnormalised top-k) and
Mixtral (sliding window) models, built from configs; nothing is downloaded."""

from __future__ import annotations

import re

import pytest
import torch

from moekit import ModelConfig, MoEConfig, MoETransformer

transformers = pytest.importorskip("transformers")

# Hugging Face parameter names -> moekit's (the first rule that matches applies).
RENAMES = [
    (r"^model\.embed_tokens\.", "embed."),
    (r"^model\.norm\.", "norm."),
    (r"^model\.layers\.(\d+)\.self_attn\.", r"layers.\1.attn."),
    (r"^model\.layers\.(\d+)\.input_layernorm\.", r"layers.\1.attn_norm."),
    (r"^model\.layers\.(\d+)\.post_attention_layernorm\.", r"layers.\1.ffn_norm."),
    (r"^model\.layers\.(\d+)\.mlp\.gate\.", r"layers.\1.ffn.router."),
    (r"^model\.layers\.(\d+)\.mlp\.experts\.gate_up_proj$", r"layers.\1.ffn.experts.w_in"),
    (r"^model\.layers\.(\d+)\.mlp\.experts\.down_proj$", r"layers.\1.ffn.experts.w_out"),
]
HF_COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    num_experts_per_tok=2,
    rms_norm_eps=1e-6,
    max_position_embeddings=64,
    tie_word_embeddings=False,
    eos_token_id=1,
    attn_implementation="eager",
)
MOE = MoEConfig(d_model=64, d_expert=32, n_experts=8, top_k=2)
OURS = ModelConfig(
    vocab_size=128,
    d_model=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=32,
    moe=MOE,
    max_seq_len=64,
    norm_eps=1e-6,
    rope_theta=1e6,
)


def rope(theta: float) -> dict:
    return {"rope_type": "default", "rope_theta": theta}


def qwen3_moe() -> tuple[torch.nn.Module, ModelConfig]:
    hf = transformers.Qwen3MoeConfig(
        **HF_COMMON,
        moe_intermediate_size=32,
        num_experts=8,
        norm_topk_prob=True,
        rope_parameters=rope(1e6),
    )
    return transformers.Qwen3MoeForCausalLM(hf), OURS.replace(qk_norm="head")


def olmoe() -> tuple[torch.nn.Module, ModelConfig]:
    hf = transformers.OlmoeConfig(
        **{**HF_COMMON, "num_key_value_heads": 4, "head_dim": 16},
        intermediate_size=32,
        num_experts=8,
        rope_parameters=rope(1e4),
    )
    ours = OURS.replace(
        n_kv_heads=None,
        head_dim=None,
        qk_norm="full",
        rope_theta=1e4,
        moe=MOE.replace(normalize=False),
    )
    return transformers.OlmoeForCausalLM(hf), ours


def mixtral_windowed() -> tuple[torch.nn.Module, ModelConfig]:
    hf = transformers.MixtralConfig(
        **HF_COMMON,
        intermediate_size=32,
        num_local_experts=8,
        sliding_window=5,
        rope_parameters=rope(1e6),
    )
    return transformers.MixtralForCausalLM(hf), OURS.replace(sliding_window=5)


def renamed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for pattern, replacement in RENAMES:
            new_key = re.sub(pattern, replacement, key)
            if new_key != key:
                key = new_key
                break
        out[key] = value
    return out


@pytest.mark.parametrize("build", [qwen3_moe, olmoe, mixtral_windowed])
def test_logits_match_transformers(build) -> None:
    hf_model, cfg = build()
    hf_model = hf_model.float().eval()
    with torch.no_grad():
        for p in hf_model.parameters():
            p.normal_(0, 0.1) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    ours = MoETransformer(cfg).eval()
    missing, unexpected = ours.load_state_dict(renamed(hf_model.state_dict()), strict=False)
    assert unexpected == [] and all(k.endswith("router.expert_bias") for k in missing)
    x = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, hf_model(x).logits, rtol=0, atol=1e-4)
