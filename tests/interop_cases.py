"""Tiny random Hugging Face MoE checkpoints, one or two per architecture, built with transformers'
config classes (odd sizes, three layers) and saved locally; nothing is downloaded.

Router weights are drawn wide (std 1) so that every token's top-k choice is far from a tie, and
DeepSeek's correction bias is random and partly negative.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from moekit import MoETransformer

COMMON = dict(
    vocab_size=97,
    hidden_size=40,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=12,
    num_experts_per_tok=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)
DROP = object()  # an override that removes a COMMON key the config class does not have
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}


def _rope(theta: float) -> dict:
    return {"rope_type": "default", "rope_theta": theta}


DEEPSEEK = dict(
    head_dim=DROP,
    num_key_value_heads=4,
    intermediate_size=36,
    moe_intermediate_size=24,
    n_routed_experts=8,
    num_experts_per_tok=3,
    n_group=4,
    topk_group=2,
    first_k_dense_replace=1,
    n_shared_experts=1,
    routed_scaling_factor=2.5,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=12,
    v_head_dim=10,
    num_nextn_predict_layers=0,  # transformers' models have no MTP layer (test_interop_mtp.py)
)

# case -> (architecture, config class, model class, config overrides); the classes are looked up
# when used, so that a test imports only the transformers models it needs.
CASES: dict[str, tuple[str, str, str, dict]] = {
    "mixtral": (
        "mixtral",
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(
            intermediate_size=24, num_local_experts=5, sliding_window=7, rope_parameters=_rope(1e6)
        ),
    ),
    "qwen2_moe": (  # a dense layer, a sliding-window layer, an unnormalised top-k
        "qwen2_moe",
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            intermediate_size=36,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=20,
            num_experts=6,
            mlp_only_layers=[1],
            norm_topk_prob=False,
            use_sliding_window=True,
            sliding_window=5,
            max_window_layers=2,
            rope_parameters=_rope(1e4),
        ),
    ),
    "qwen3_moe": (  # every second layer MoE, biases on q, k, v and o
        "qwen3_moe",
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            intermediate_size=36,
            moe_intermediate_size=24,
            num_experts=6,
            decoder_sparse_step=2,
            norm_topk_prob=True,
            attention_bias=True,
            rope_parameters=_rope(1e6),
        ),
    ),
    "olmoe": (
        "olmoe",
        "OlmoeConfig",
        "OlmoeForCausalLM",
        dict(
            head_dim=DROP,
            intermediate_size=24,
            num_experts=6,
            clip_qkv=2.0,
            rope_parameters=_rope(1e4),
        ),
    ),
    "deepseek_v3": (  # YaRN with DeepSeek's mscale terms, interleaved RoPE, low-rank queries
        "deepseek_v3",
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            **DEEPSEEK,
            q_lora_rank=20,
            rope_parameters={**YARN, "rope_theta": 1e4, "mscale": 1.0, "mscale_all_dim": 0.8},
        ),
    ),
    "deepseek_v3_plain_q": (  # full-rank queries, halves RoPE, unnormalised weights
        "deepseek_v3",
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            **DEEPSEEK,
            q_lora_rank=None,
            rope_interleave=False,
            norm_topk_prob=False,
            rope_parameters=_rope(1e4),
        ),
    ),
    "gpt_oss": (  # sinks, alternating windows, a limit low enough to clamp, untruncated YaRN
        "gpt_oss",
        "GptOssConfig",
        "GptOssForCausalLM",
        dict(
            intermediate_size=24,
            num_local_experts=5,
            sliding_window=5,
            swiglu_limit=1.0,
            rope_parameters={
                **YARN,
                "rope_theta": 150000.0,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
            },
        ),
    ),
}


def hf_config(case: str) -> transformers.PretrainedConfig:
    _, config_class, _, overrides = CASES[case]
    kwargs = {k: v for k, v in {**COMMON, **overrides}.items() if v is not DROP}
    return getattr(transformers, config_class)(**kwargs)


def hf_class(case: str) -> type:
    return getattr(transformers, CASES[case][2])


def _fill(name: str, tensor: torch.Tensor) -> None:
    """Norm weights near 1, router weights and sinks wide, the rest small; biases included."""
    if "norm" in name or "layernorm" in name:
        tensor.uniform_(0.5, 1.5)
    elif "e_score_correction_bias" in name or "router.expert_bias" in name:
        tensor.uniform_(-0.3, 0.2)  # partly negative
    elif any(k in name for k in ("mlp.gate.", "router.", "sinks")) and "proj" not in name:
        tensor.normal_(0.0, 1.0)
    else:
        tensor.normal_(0.0, 0.1)


@torch.no_grad()
def randomize(
    model: torch.nn.Module, seed: int = 0, correction_bias: bool = True
) -> torch.nn.Module:
    """Draw every parameter (and the correction biases) as `_fill` says (moekit or HF names)."""
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        _fill(name, p)
    for name, b in model.named_buffers():
        is_bias = "correction_bias" in name or name.endswith("router.expert_bias")
        if is_bias and correction_bias:
            _fill(name, b)
    return model


def save_hf_case(case: str, folder: Path) -> Path:
    """A random float32 checkpoint of `case` written by transformers' save_pretrained."""
    model = randomize(hf_class(case)(hf_config(case)).float())
    model.save_pretrained(folder)
    return folder


def load_transformers(case: str, folder: Path) -> tuple[torch.nn.Module, dict]:
    """transformers' model of `case` from `folder` (eager attention and experts, eval mode) and
    its loading report (missing, unexpected, mismatched keys)."""
    model, info = hf_class(case).from_pretrained(
        folder,
        attn_implementation="eager",
        experts_implementation="eager",
        output_loading_info=True,
    )
    return model.eval(), info


def tokens(batch: int = 2, length: int = 23, vocab: int = 97, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def max_logit_diff(ours: MoETransformer, theirs: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return (ours(x).logits - theirs(x).logits).abs().max().item()


def min_routing_gap(model: MoETransformer, x: torch.Tensor) -> float:
    """The smallest margin, over MoE layers and tokens, between the k-th and (k+1)-th choice (and
    between the last chosen and the first dropped group): float32 noise far below it cannot flip a
    choice, so equal logits test the same routing. Softmax choices are compared by their logits
    (the probabilities of the experts not chosen are tiny, and so are their absolute gaps)."""
    seen: list[tuple[torch.nn.Module, torch.Tensor]] = []
    hooks = [
        layer.register_forward_pre_hook(lambda m, args: seen.append((m, args[0])))
        for layer in model.moe_layers()
    ]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    gaps = []
    for layer, h in seen:
        cfg = layer.cfg
        routing = layer.router(h.reshape(-1, cfg.d_model))
        ranked = routing.logits_TE if cfg.score == "softmax" else routing.selection_TE
        top = ranked.topk(cfg.top_k + 1, dim=-1).values
        gap = top[:, cfg.top_k - 1] - top[:, cfg.top_k]
        gaps.append(gap[torch.isfinite(gap)].min().item() if torch.isfinite(gap).any() else 1.0)
        if cfg.n_groups > 1:
            biased = routing.scores_TE + layer.router.expert_bias
            grouped = biased.view(-1, cfg.n_groups, cfg.n_experts // cfg.n_groups)
            group = grouped.topk(2, dim=-1).values.sum(-1).topk(cfg.topk_groups + 1, -1).values
            gaps.append((group[:, -2] - group[:, -1]).min().item())
    return min(gaps)
