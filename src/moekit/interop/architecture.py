"""`Architecture`: what one Hugging Face architecture file (`archs/<arch>.py`) provides, and the
check that it can express a given moekit model.

Whether an architecture can express a model is decided by a round trip: the config is mapped to
the architecture and back, and every difference that changes the forward pass is an error naming
the field.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from moekit.config import ModelConfig, MoEConfig
from moekit.interop.configs import BASE_DEFAULTS, HF, windows
from moekit.interop.files import CheckpointError
from moekit.interop.keymaps import KeyMap

SILU = ("silu", "swish")  # transformers' ACT2FN: both are nn.SiLU


@dataclass(frozen=True)
class Architecture:
    """One Hugging Face architecture: its names, config map and key map.

    model_type, class_name: config.json's "model_type" and its "architectures" entry.
    defaults: transformers' defaults for the keys `from_hf` reads (over `BASE_DEFAULTS`), taken
        by a config.json that lacks them (None counts as given).
    aliases: other names a config.json may use (transformers' attribute_map) -> the name read.
    from_hf: the ModelConfig of a config dict whose defaults are filled in.
    to_hf: the config.json entries of a model, given its MoE settings (model_type and
        architectures are added by `hf_config`).
    keys: where each moekit tensor lives in the checkpoint (see `keymaps`).
    reads_hidden_act: whether config.json's hidden_act is what the experts compute (then it must
        be "silu").
    copies: {checkpoint key: checkpoint key it copies} for a model of this config: tensors the
        format stores twice and moekit once (DeepSeek-V3's MTP layer keeps its own embedding and
        head); load checks each copy equals its original, save writes it.
    names: moekit's field -> this architecture's config.json key, for the fields it names its
        own way (n_experts: num_local_experts, n_routed_experts ...): errors name the key.
    """

    model_type: str
    class_name: str
    defaults: HF
    aliases: dict[str, str]
    from_hf: Callable[[HF], ModelConfig]
    to_hf: Callable[[ModelConfig, MoEConfig], HF]
    keys: KeyMap
    reads_hidden_act: bool = True
    copies: Callable[[ModelConfig], dict[str, str]] = lambda cfg: {}
    names: dict[str, str] = field(default_factory=dict)

    def model_config(self, hf: HF) -> ModelConfig:
        """The `ModelConfig` of a config.json of this architecture: its aliases renamed, and
        transformers' defaults for the keys it lacks."""
        hf = dict(hf)
        for alias, name in self.aliases.items():
            if alias in hf and name not in hf:
                hf[name] = hf.pop(alias)
        hf = {**BASE_DEFAULTS, **self.defaults, **hf}
        if self.reads_hidden_act and hf["hidden_act"] not in SILU:
            raise CheckpointError(
                f"{self.model_type}: hidden_act={hf['hidden_act']!r} is not supported "
                "(moekit: 'silu')"
            )
        return self.from_hf(hf)

    def hf_config(self, cfg: ModelConfig) -> HF:
        """The config.json of `cfg`, or a ValueError naming each field this architecture cannot
        express."""
        if cfg.moe is None:
            raise ValueError(
                f"{self.model_type} is a mixture-of-experts architecture; this model has no MoE"
            )
        hf = {
            "architectures": [self.class_name],
            "model_type": self.model_type,
            **self.to_hf(cfg, cfg.moe),
        }
        try:
            back = self.model_config(hf)
        except (ValueError, CheckpointError) as err:
            raise ValueError(f"{self.model_type} cannot express this model: {err}") from err
        ours, theirs = forward_signature(cfg), forward_signature(back)
        diffs = [
            f"{k}={ours.get(k)!r} ({self.model_type} gives {theirs.get(k)!r})"
            for k in sorted(set(ours) | set(theirs))
            if ours.get(k) != theirs.get(k)
        ]
        if diffs:
            raise ValueError(f"{self.model_type} cannot express this model: " + "; ".join(diffs))
        return hf


# MoEConfig fields that change training, not the forward pass of a trained model
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
        for name in (
            "vocab_size",
            "d_model",
            "n_layers",
            "n_heads",
            "norm_eps",
            "tie_embeddings",
            "mtp_depth",
            "rope_theta",
            "attn_bias",
            "attn_sinks",
            "qk_norm",
            "clip_qkv",
        )
    }
    sig |= {
        "rope_scaling": None if cfg.rope_scaling is None else cfg.rope_scaling.to_dict(),
        "windows": windows(cfg),
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
