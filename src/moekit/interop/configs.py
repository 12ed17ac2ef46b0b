"""Pieces the architectures' config maps (`archs/<arch>.py`) are made of, between Hugging Face
`config.json` and `ModelConfig`.

A config map reads a plain dict (transformers is not needed to load a checkpoint); a key that is
missing takes the default of transformers' config class for that architecture (5.23). RoPE's base
is read from `rope_parameters` (transformers 5), else from the top-level `rope_theta` (4.x), and
its scaling from the older `rope_scaling` when there is one, else from `rope_parameters`. Maps
write the transformers 5 form.
"""

from __future__ import annotations

from typing import Any

from moekit.config import ModelConfig, MoEConfig, RopeScaling
from moekit.interop.files import CheckpointError

HF = dict[str, Any]

# transformers 5.23's defaults for the keys every architecture reads (the config classes' field
# defaults); each architecture adds and overrides its own.
BASE_DEFAULTS: HF = {
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "attention_bias": False,
    "num_key_value_heads": None,
    "head_dim": None,
    "max_position_embeddings": 4096,
    "router_aux_loss_coef": 0.001,
}


# ---- RoPE ----


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
        params |= {
            "rope_type": "yarn",
            "factor": s.factor,
            "original_max_position_embeddings": s.original_max_seq_len,
            "beta_fast": s.beta_fast,
            "beta_slow": s.beta_slow,
            "truncate": s.truncate,
        }
        optional = ("mscale", "mscale_all_dim", "attention_factor")
        params |= {k: getattr(s, k) for k in optional if getattr(s, k) is not None}
    return {"rope_parameters": params, "rope_theta": cfg.rope_theta}


# ---- fields every architecture maps the same way ----


# The config.json key each ModelConfig field every architecture reads as it is comes from (and
# MoEConfig's top_k, moe_from_hf's): the readers' table, and the names of a value's error
# (interop.hf.hf_model_config).
HF_KEYS = {
    "vocab_size": "vocab_size",
    "d_model": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "max_seq_len": "max_position_embeddings",
    "norm_eps": "rms_norm_eps",
}
HF_NAMES = {**HF_KEYS, "n_kv_heads": "num_key_value_heads", "top_k": "num_experts_per_tok"}


def derived_head_dim(hf: HF) -> int | None:
    """A config.json's head width where it gives none: hidden_size // num_attention_heads, rounded
    down as transformers computes it (a width not divisible by the heads loads); None where either
    is not a positive count, for the model's rules to name."""
    width, heads = hf["hidden_size"], hf["num_attention_heads"]
    counts = all(type(v) is int and v > 0 for v in (width, heads))
    return width // heads if counts else None


def common_from_hf(hf: HF) -> HF:
    """ModelConfig fields every architecture reads the same way."""
    return dict(
        **{field: hf[key] for field, key in HF_KEYS.items()},
        n_kv_heads=hf["num_key_value_heads"] or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or derived_head_dim(hf),
        rope_theta=rope_theta(hf),
        rope_scaling=rope_scaling(hf),
        tie_embeddings=bool(hf["tie_word_embeddings"]),
    )


def common_to_hf(cfg: ModelConfig) -> HF:
    """config.json entries every architecture writes the same way."""
    return {
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


def moe_from_hf(hf: HF, names: dict[str, str]) -> HF:
    """MoEConfig fields every architecture reads the same way; `names` holds its config.json keys
    for the expert count and width (n_experts, d_expert)."""
    return dict(
        d_model=hf["hidden_size"],
        d_expert=hf[names["d_expert"]],
        n_experts=hf[names["n_experts"]],
        top_k=hf[HF_NAMES["top_k"]],
        aux_loss_coef=float(hf.get("router_aux_loss_coef") or 0.0),
    )


def moe_to_hf(moe: MoEConfig, names: dict[str, str]) -> HF:
    """`moe_from_hf`'s entries, written."""
    return {
        names["d_expert"]: moe.d_expert,
        names["n_experts"]: moe.n_experts,
        HF_NAMES["top_k"]: moe.top_k,
        "router_aux_loss_coef": moe.aux_loss_coef,
    }


def dense_width(cfg: ModelConfig) -> int:
    """The dense FFN width to write (any positive width when no layer is dense)."""
    assert cfg.moe is not None
    return cfg.d_ff if cfg.d_ff is not None else cfg.moe.d_expert


# ---- attention windows ----


def windows(cfg: ModelConfig) -> list[int | None]:
    """Each layer's attention window (None: full attention)."""
    return [cfg.layer_window(i) for i in range(cfg.n_layers)]


def layer_windows_from_hf(hf: HF, types: list[str]) -> HF:
    """ModelConfig's sliding_window and layer_types for HF per-layer attention types (one per
    layer, each "full_attention" or "sliding_attention"; none: no window)."""
    known = ("full_attention", "sliding_attention")
    if types and (len(types) != hf["num_hidden_layers"] or any(t not in known for t in types)):
        raise ValueError(
            f"layer_types={types!r} is invalid: must give each of the num_hidden_layers="
            f"{hf['num_hidden_layers']} layers one of {known}"
        )
    if "sliding_attention" not in types:
        return {"sliding_window": None, "layer_types": None}
    names = tuple("sliding" if t == "sliding_attention" else "full" for t in types)
    return {"sliding_window": hf["sliding_window"], "layer_types": names}


def layer_windows_to_hf(cfg: ModelConfig) -> HF:
    """HF's sliding_window (the first windowed layer's) and per-layer attention types."""
    per_layer = windows(cfg)
    sliding = [w for w in per_layer if w is not None]
    return {
        "sliding_window": sliding[0] if sliding else None,
        "layer_types": ["full_attention" if w is None else "sliding_attention" for w in per_layer],
    }


def one_window(cfg: ModelConfig) -> int | None:
    """The window of an architecture that windows every layer or none (None if mixed: the
    round trip in `Architecture.hf_config` then reports it)."""
    distinct = set(windows(cfg))
    return distinct.pop() if len(distinct) == 1 else None
