"""Config maps, both ways, between Hugging Face `config.json` and `ModelConfig`.

`from_hf` reads a plain dict (transformers is not needed to load a checkpoint); a key that is
missing takes the default of transformers' config class for that architecture (5.23). RoPE's base
is read from `rope_parameters` (transformers 5), else from the top-level `rope_theta` (4.x), and
its scaling from the older `rope_scaling` when there is one, else from `rope_parameters`.

`to_hf` writes the transformers 5 form. Whether an architecture can express a moekit model at all
is decided by `check_expressible`: the config is mapped to the architecture and back, and every
difference that changes the forward pass is an error naming the field.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from moekit.config import MLAConfig, ModelConfig, MoEConfig, RopeScaling
from moekit.interop.files import CheckpointError

HF = dict[str, Any]

# transformers 5.23's defaults for the keys read below (the config classes' field defaults).
_BASE = {
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "attention_bias": False,
    "num_key_value_heads": None,
    "head_dim": None,
    "max_position_embeddings": 4096,
    "router_aux_loss_coef": 0.001,
}
DEFAULTS: dict[str, HF] = {
    "mixtral": {
        **_BASE,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "num_key_value_heads": 8,
        "sliding_window": None,
        "max_position_embeddings": 131072,
    },
    "qwen2_moe": {
        **_BASE,
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
    "qwen3_moe": {
        **_BASE,
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
    "olmoe": {
        **_BASE,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e4,
        "num_experts": 64,
        "num_experts_per_tok": 8,
        "norm_topk_prob": False,
        "clip_qkv": None,
        "router_aux_loss_coef": 0.01,
    },
    "deepseek_v3": {
        **_BASE,
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
    },
    "gpt_oss": {
        **_BASE,
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
}


# transformers' attribute_map: other names a config.json may use, -> the name read here.
ALIASES: dict[str, dict[str, str]] = {
    "mixtral": {"num_experts": "num_local_experts"},
    "qwen2_moe": {},
    "qwen3_moe": {"num_experts": "num_local_experts"},
    "olmoe": {"num_local_experts": "num_experts"},
    "deepseek_v3": {"num_local_experts": "n_routed_experts"},
    "gpt_oss": {"num_experts": "num_local_experts"},
}


@dataclass(frozen=True)
class ConfigMap:
    """One architecture's config map and names."""

    model_type: str
    class_name: str
    from_hf: Callable[[HF], ModelConfig]
    to_hf: Callable[[ModelConfig], HF]


def with_defaults(hf: HF, model_type: str) -> HF:
    """The config with its aliases renamed and transformers' defaults for the keys it lacks (None
    counts as given)."""
    hf = dict(hf)
    for alias, name in ALIASES[model_type].items():
        if alias in hf and name not in hf:
            hf[name] = hf.pop(alias)
    return {**DEFAULTS[model_type], **hf}


# ---- shared pieces ----


def _rope_parameters(hf: HF) -> HF:
    """The RoPE settings: a 4.x `rope_scaling` wins over `rope_parameters`, as in transformers."""
    params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if any(isinstance(v, dict) for v in params.values()):
        raise CheckpointError(f"per-layer rope_parameters are not supported: {params}")
    return params


def rope_theta(hf: HF) -> float:
    """RoPE's base: rope_parameters["rope_theta"] (transformers 5) or the top-level rope_theta."""
    return float(_rope_parameters(hf).get("rope_theta", hf.get("rope_theta")))


def rope_scaling(hf: HF) -> RopeScaling | None:
    """The YaRN settings of a config, None for plain RoPE; other scalings are refused."""
    params = _rope_parameters(hf)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return None
    if kind != "yarn":
        raise CheckpointError(f"rope_type={kind!r} is not supported (moekit: 'default', 'yarn')")
    original = params.get("original_max_position_embeddings", hf["max_position_embeddings"])
    factor = params.get("factor") or hf["max_position_embeddings"] / original
    return RopeScaling(
        factor=float(factor),
        original_max_seq_len=int(original),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        truncate=bool(params.get("truncate", True)),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"),
    )


def rope_to_hf(cfg: ModelConfig) -> HF:
    """rope_parameters in transformers 5's form (and rope_theta at the top, for 4.x readers)."""
    params: HF = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    s = cfg.rope_scaling
    if s is not None:
        params = {
            "rope_type": "yarn",
            "rope_theta": cfg.rope_theta,
            "factor": s.factor,
            "original_max_position_embeddings": s.original_max_seq_len,
            "beta_fast": s.beta_fast,
            "beta_slow": s.beta_slow,
            "truncate": s.truncate,
        }
        for name in ("mscale", "mscale_all_dim", "attention_factor"):
            if getattr(s, name) is not None:
                params[name] = getattr(s, name)
    return {"rope_parameters": params, "rope_theta": cfg.rope_theta}


def _check_act(hf: HF, model_type: str) -> None:
    if hf["hidden_act"] != "silu":
        raise CheckpointError(
            f"{model_type}: hidden_act={hf['hidden_act']!r} is not supported (moekit: 'silu')"
        )


def _common(hf: HF) -> HF:
    """ModelConfig fields every architecture reads the same way."""
    heads = hf["num_attention_heads"]
    return dict(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=hf["num_key_value_heads"] or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        max_seq_len=hf["max_position_embeddings"],
        rope_theta=rope_theta(hf),
        rope_scaling=rope_scaling(hf),
        norm_eps=hf["rms_norm_eps"],
        tie_embeddings=bool(hf["tie_word_embeddings"]),
    )


def _common_to_hf(cfg: ModelConfig, model_type: str, class_name: str) -> HF:
    return {
        "architectures": [class_name],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.d_head,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        **rope_to_hf(cfg),
    }


def _moe_common(hf: HF, n_experts: int, d_expert: int) -> HF:
    return dict(
        d_model=hf["hidden_size"],
        d_expert=d_expert,
        n_experts=n_experts,
        top_k=hf["num_experts_per_tok"],
        aux_loss_coef=float(hf.get("router_aux_loss_coef") or 0.0),
    )


def _qwen_moe_layers(hf: HF) -> tuple[int, ...] | str:
    """Qwen's MoE layers: (i + 1) % decoder_sparse_step == 0 and i not in mlp_only_layers."""
    step, dense = hf["decoder_sparse_step"], set(hf["mlp_only_layers"] or [])
    layers = [i for i in range(hf["num_hidden_layers"]) if (i + 1) % step == 0 and i not in dense]
    return "all" if len(layers) == hf["num_hidden_layers"] else tuple(layers)


def _qwen_moe_layers_to_hf(cfg: ModelConfig) -> HF:
    moe = set(cfg.moe_layer_indices)
    dense = [i for i in range(cfg.n_layers) if i not in moe]
    return {"decoder_sparse_step": 1, "mlp_only_layers": dense, "intermediate_size": _d_ff(cfg)}


def _d_ff(cfg: ModelConfig) -> int:
    """The dense FFN width to write (any positive width when no layer is dense)."""
    assert cfg.moe is not None
    return cfg.d_ff if cfg.d_ff is not None else cfg.moe.d_expert


def _windows(cfg: ModelConfig) -> list[int | None]:
    return [cfg.layer_window(i) for i in range(cfg.n_layers)]


def _layer_windows_from_hf(hf: HF, types: list[str], sliding: bool) -> dict:
    """ModelConfig's sliding_window and layer_types for HF per-layer attention types."""
    if not sliding:
        return {"sliding_window": None, "layer_types": None}
    names = tuple("sliding" if t == "sliding_attention" else "full" for t in types)
    return {"sliding_window": hf["sliding_window"], "layer_types": names}


def _layer_windows_to_hf(cfg: ModelConfig) -> HF:
    """HF's sliding_window (the first windowed layer's) and per-layer attention types."""
    windows = _windows(cfg)
    sliding = [w for w in windows if w is not None]
    return {
        "sliding_window": sliding[0] if sliding else None,
        "layer_types": ["full_attention" if w is None else "sliding_attention" for w in windows],
    }


def _one_window(cfg: ModelConfig) -> int | None:
    """The window of an architecture that windows every layer or none (None if mixed: the
    round trip in `check_expressible` then reports it)."""
    windows = set(_windows(cfg))
    return windows.pop() if len(windows) == 1 else None


# ---- architectures ----


def mixtral_from_hf(hf: HF) -> ModelConfig:
    hf = with_defaults(hf, "mixtral")
    _check_act(hf, "mixtral")
    moe = MoEConfig(**_moe_common(hf, hf["num_local_experts"], hf["intermediate_size"]))
    return ModelConfig(**_common(hf), moe=moe, sliding_window=hf["sliding_window"])


def mixtral_to_hf(cfg: ModelConfig) -> HF:
    moe = _need_moe(cfg, "mixtral")
    return {
        **_common_to_hf(cfg, "mixtral", "MixtralForCausalLM"),
        "intermediate_size": moe.d_expert,
        "num_local_experts": moe.n_experts,
        "num_experts_per_tok": moe.top_k,
        "sliding_window": _one_window(cfg),
        "router_aux_loss_coef": moe.aux_loss_coef,
    }


def qwen2_moe_from_hf(hf: HF) -> ModelConfig:
    hf = with_defaults(hf, "qwen2_moe")
    _check_act(hf, "qwen2_moe")
    n = hf["num_hidden_layers"]
    moe = None
    if hf["num_experts"] > 0:
        moe = MoEConfig(
            **_moe_common(hf, hf["num_experts"], hf["moe_intermediate_size"]),
            normalize=bool(hf["norm_topk_prob"]),
            n_shared_experts=1,
            d_shared=hf["shared_expert_intermediate_size"],
            shared_gate=True,
        )
    types = hf.get("layer_types") or [
        "sliding_attention"
        if (i + 1) % 2 and i < hf["max_window_layers"] and hf["use_sliding_window"]
        else "full_attention"
        for i in range(n)
    ]
    sliding = hf["use_sliding_window"] and "sliding_attention" in types
    return ModelConfig(
        **_common(hf),
        d_ff=hf["intermediate_size"],
        moe=moe,
        moe_layers=_qwen_moe_layers(hf),
        attn_bias="qkv" if hf["qkv_bias"] else False,
        **_layer_windows_from_hf(hf, types, sliding),
    )


def qwen2_moe_to_hf(cfg: ModelConfig) -> HF:
    moe = _need_moe(cfg, "qwen2_moe")
    layer_windows = _layer_windows_to_hf(cfg)
    return {
        **_common_to_hf(cfg, "qwen2_moe", "Qwen2MoeForCausalLM"),
        **_qwen_moe_layers_to_hf(cfg),
        "moe_intermediate_size": moe.d_expert,
        "num_experts": moe.n_experts,
        "num_experts_per_tok": moe.top_k,
        "norm_topk_prob": moe.normalize,
        "shared_expert_intermediate_size": moe.shared_width,
        "qkv_bias": cfg.attn_bias == "qkv",
        "use_sliding_window": layer_windows["sliding_window"] is not None,
        **layer_windows,
        "max_window_layers": cfg.n_layers,
        "router_aux_loss_coef": moe.aux_loss_coef,
    }


def qwen3_moe_from_hf(hf: HF) -> ModelConfig:
    hf = with_defaults(hf, "qwen3_moe")
    _check_act(hf, "qwen3_moe")
    moe = MoEConfig(
        **_moe_common(hf, hf["num_local_experts"], hf["moe_intermediate_size"]),
        normalize=bool(hf["norm_topk_prob"]),
    )
    return ModelConfig(
        **_common(hf),
        d_ff=hf["intermediate_size"],
        moe=moe,
        moe_layers=_qwen_moe_layers(hf),
        attn_bias=bool(hf["attention_bias"]),
        qk_norm="head",
        sliding_window=hf["sliding_window"] if hf["use_sliding_window"] else None,
    )


def qwen3_moe_to_hf(cfg: ModelConfig) -> HF:
    moe = _need_moe(cfg, "qwen3_moe")
    window = _one_window(cfg)
    return {
        **_common_to_hf(cfg, "qwen3_moe", "Qwen3MoeForCausalLM"),
        **_qwen_moe_layers_to_hf(cfg),
        "moe_intermediate_size": moe.d_expert,
        "num_experts": moe.n_experts,
        "num_experts_per_tok": moe.top_k,
        "norm_topk_prob": moe.normalize,
        "attention_bias": cfg.attn_bias is True,
        "use_sliding_window": window is not None,
        "sliding_window": window,
        "router_aux_loss_coef": moe.aux_loss_coef,
    }


def olmoe_from_hf(hf: HF) -> ModelConfig:
    hf = with_defaults(hf, "olmoe")
    _check_act(hf, "olmoe")
    moe = MoEConfig(
        **_moe_common(hf, hf["num_experts"], hf["intermediate_size"]),
        normalize=bool(hf["norm_topk_prob"]),
    )
    common = _common(hf)
    common["head_dim"] = hf["hidden_size"] // hf["num_attention_heads"]  # OLMoE has no head_dim
    return ModelConfig(
        **common,
        moe=moe,
        attn_bias=bool(hf["attention_bias"]),
        qk_norm="full",
        clip_qkv=hf["clip_qkv"],
    )


def olmoe_to_hf(cfg: ModelConfig) -> HF:
    moe = _need_moe(cfg, "olmoe")
    out = _common_to_hf(cfg, "olmoe", "OlmoeForCausalLM")
    del out["head_dim"]
    return {
        **out,
        "intermediate_size": moe.d_expert,
        "num_experts": moe.n_experts,
        "num_experts_per_tok": moe.top_k,
        "norm_topk_prob": moe.normalize,
        "attention_bias": cfg.attn_bias is True,
        "clip_qkv": cfg.clip_qkv,
        "router_aux_loss_coef": moe.aux_loss_coef,
    }


def deepseek_v3_from_hf(hf: HF) -> ModelConfig:
    hf = with_defaults(hf, "deepseek_v3")
    _check_act(hf, "deepseek_v3")
    routed = _moe_common(hf, hf["n_routed_experts"], hf["moe_intermediate_size"])
    routed["aux_loss_coef"] = 0.0  # auxiliary-loss-free: the correction bias balances instead
    moe = MoEConfig(
        **routed,
        score="sigmoid",
        normalize=bool(hf["norm_topk_prob"]),
        routed_scaling=float(hf["routed_scaling_factor"]),
        n_groups=hf["n_group"] or 1,
        topk_groups=hf["topk_group"] or 1,
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
    common = _common(hf)
    common.update(n_kv_heads=None, head_dim=None)  # latent attention has neither
    return ModelConfig(
        **common,
        d_ff=hf["intermediate_size"],
        moe=moe,
        first_dense=hf["first_k_dense_replace"] or 0,
        attn_bias=bool(hf["attention_bias"]),
        mla=mla,
    )


def deepseek_v3_to_hf(cfg: ModelConfig) -> HF:
    moe = _need_moe(cfg, "deepseek_v3")
    if cfg.mla is None:
        raise ValueError("deepseek_v3 needs multi-head latent attention: set ModelConfig.mla")
    m = cfg.mla
    out = _common_to_hf(cfg, "deepseek_v3", "DeepseekV3ForCausalLM")
    out.update(num_key_value_heads=cfg.n_heads, head_dim=m.qk_rope_head_dim)
    dense = [i for i in range(cfg.n_layers) if i not in set(cfg.moe_layer_indices)]
    return {
        **out,
        "intermediate_size": _d_ff(cfg),
        "moe_intermediate_size": moe.d_expert,
        "n_routed_experts": moe.n_experts,
        "num_experts_per_tok": moe.top_k,
        "n_shared_experts": moe.n_shared_experts,
        "routed_scaling_factor": moe.routed_scaling,
        "n_group": moe.n_groups,
        "topk_group": moe.topk_groups,
        "norm_topk_prob": moe.normalize,
        "first_k_dense_replace": len(dense),
        "q_lora_rank": m.q_lora_rank,
        "kv_lora_rank": m.kv_lora_rank,
        "qk_nope_head_dim": m.qk_nope_head_dim,
        "qk_rope_head_dim": m.qk_rope_head_dim,
        "v_head_dim": m.v_head_dim,
        "rope_interleave": m.rope_interleave,
        "attention_bias": cfg.attn_bias is True,
        "num_nextn_predict_layers": 0,
    }


def gpt_oss_from_hf(hf: HF) -> ModelConfig:
    hf = with_defaults(hf, "gpt_oss")
    n = hf["num_hidden_layers"]
    types = hf["layer_types"] or [
        "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)
    ]
    moe = MoEConfig(
        **_moe_common(hf, hf["num_local_experts"], hf["intermediate_size"]),
        activation="clamped_swiglu",
        swiglu_alpha=float(hf["swiglu_alpha"]),
        swiglu_limit=float(hf["swiglu_limit"]),
        expert_bias=True,
        router_bias=True,
    )
    sliding = "sliding_attention" in types
    return ModelConfig(
        **_common(hf),
        moe=moe,
        attn_bias=bool(hf["attention_bias"]),
        attn_sinks=True,
        **_layer_windows_from_hf(hf, types, sliding),
    )


def gpt_oss_to_hf(cfg: ModelConfig) -> HF:
    moe = _need_moe(cfg, "gpt_oss")
    return {
        **_common_to_hf(cfg, "gpt_oss", "GptOssForCausalLM"),
        "intermediate_size": moe.d_expert,
        "num_local_experts": moe.n_experts,
        "num_experts_per_tok": moe.top_k,
        "swiglu_alpha": moe.swiglu_alpha,
        "swiglu_limit": moe.swiglu_limit,
        "attention_bias": cfg.attn_bias is True,
        **_layer_windows_to_hf(cfg),
        "router_aux_loss_coef": moe.aux_loss_coef,
    }


def _need_moe(cfg: ModelConfig, arch: str) -> MoEConfig:
    if cfg.moe is None:
        raise ValueError(f"{arch} is a mixture-of-experts architecture; this model has no MoE")
    return cfg.moe


CONFIG_MAPS: dict[str, ConfigMap] = {
    "mixtral": ConfigMap("mixtral", "MixtralForCausalLM", mixtral_from_hf, mixtral_to_hf),
    "qwen2_moe": ConfigMap("qwen2_moe", "Qwen2MoeForCausalLM", qwen2_moe_from_hf, qwen2_moe_to_hf),
    "qwen3_moe": ConfigMap("qwen3_moe", "Qwen3MoeForCausalLM", qwen3_moe_from_hf, qwen3_moe_to_hf),
    "olmoe": ConfigMap("olmoe", "OlmoeForCausalLM", olmoe_from_hf, olmoe_to_hf),
    "deepseek_v3": ConfigMap(
        "deepseek_v3", "DeepseekV3ForCausalLM", deepseek_v3_from_hf, deepseek_v3_to_hf
    ),
    "gpt_oss": ConfigMap("gpt_oss", "GptOssForCausalLM", gpt_oss_from_hf, gpt_oss_to_hf),
}


# ---- can an architecture express a model? ----

_TRAINING_ONLY = (
    "aux_loss_coef",
    "aux_loss_scope",
    "z_loss_coef",
    "importance_loss_coef",
    "load_loss_coef",
    "bias_update_rate",
    "noise",
    "noise_eps",
    "expert_impl",
    "drop_policy",
    "overflow",
)


def forward_signature(cfg: ModelConfig) -> HF:
    """What decides a model's forward pass, written canonically: two configs with the same
    signature compute the same function of the same weights."""
    sig: HF = {
        name: getattr(cfg, name)
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "norm_eps", "tie_embeddings")
    }
    sig |= {
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None if cfg.rope_scaling is None else cfg.rope_scaling.to_dict(),
        "attn_bias": cfg.attn_bias,
        "attn_sinks": cfg.attn_sinks,
        "qk_norm": cfg.qk_norm,
        "clip_qkv": cfg.clip_qkv,
        "windows": _windows(cfg),
        "moe_layers": cfg.moe_layer_indices,
        "d_ff": cfg.d_ff if len(cfg.moe_layer_indices) < cfg.n_layers else None,
    }
    if cfg.mla is not None:
        sig["mla"] = cfg.mla.to_dict()
    else:
        sig |= {"n_kv_heads": cfg.kv_heads, "head_dim": cfg.d_head}
    if cfg.moe is not None:
        moe = {k: v for k, v in cfg.moe.to_dict().items() if k not in _TRAINING_ONLY}
        moe["d_shared"] = cfg.moe.shared_width
        if cfg.moe.activation != "clamped_swiglu":
            del moe["swiglu_alpha"], moe["swiglu_limit"]
        if not cfg.moe.n_shared_experts:
            moe["shared_gate"] = False
        sig |= {f"moe.{k}": v for k, v in moe.items()}
    return sig


def check_expressible(cfg: ModelConfig, arch: str) -> HF:
    """The architecture's config for `cfg`, or a ValueError naming each field it cannot express."""
    mapping = CONFIG_MAPS[arch]
    hf = mapping.to_hf(cfg)
    try:
        back = mapping.from_hf(hf)
    except (ValueError, CheckpointError) as err:
        raise ValueError(f"{arch} cannot express this model: {err}") from err
    ours, theirs = forward_signature(cfg), forward_signature(back)
    diffs = [
        f"{k}={ours.get(k)!r} ({arch} gives {theirs.get(k)!r})"
        for k in sorted(set(ours) | set(theirs))
        if ours.get(k) != theirs.get(k)
    ]
    if diffs:
        raise ValueError(f"{arch} cannot express this model: " + "; ".join(diffs))
    return hf
