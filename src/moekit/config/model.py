"""The model's configs: `ModelConfig` with its attention options (`RopeScaling`, `MLAConfig`), and
`dense_twin`, the dense model of an MoE model's compute per token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from moekit.config.base import ConfigBase
from moekit.config.moe import MoEConfig
from moekit.config.rules import NonNegFloat, NonNegInt, invalid

MoELayers = Literal["all"] | int | tuple[NonNegInt, ...]


@dataclass(kw_only=True)
class RopeScaling(ConfigBase):
    """YaRN extension of the rotary embedding to longer contexts (Peng et al. 2023, *YaRN*), as
    transformers' "yarn" rope type computes it (DeepSeek-V3, GPT-OSS).

    factor: how many times longer than `original_max_seq_len` the context is stretched.
    original_max_seq_len: the context length of pre-training.
    beta_fast, beta_slow: the frequency ramp's bounds, in rotations over the original context:
        dimensions turning more than beta_fast times keep their frequency, fewer than beta_slow
        times are interpolated (frequency / factor), and those between blend linearly.
    truncate: round the ramp's bounds outwards to whole dimensions (DeepSeek); GPT-OSS does not.
    mscale, mscale_all_dim: DeepSeek's temperature terms, with m(s) = 0.1 * s * ln(factor) + 1.
    attention_factor: the factor on cos and sin (so on every attention logit, squared); None
        derives it as m(mscale) / m(mscale_all_dim) when both are set and non-zero, else m(1).
    Multi-head latent attention (`mla`) also multiplies its softmax scale by m(mscale_all_dim)^2
    when mscale_all_dim is set, as DeepSeek-V2/V3 do in transformers.
    """

    factor: float
    original_max_seq_len: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    mscale: NonNegFloat | None = None
    mscale_all_dim: NonNegFloat | None = None
    attention_factor: float | None = None


@dataclass(kw_only=True)
class MLAConfig(ConfigBase):
    """Multi-head latent attention (DeepSeek-AI 2024, *DeepSeek-V2*): keys and values are expanded
    per head from one low-rank latent per token, and RoPE is decoupled into extra dimensions
    whose key is shared by all heads. The KV cache keeps only the latent and the rotary key.

    q_lora_rank: rank of the low-rank query (x -> q_a_proj -> RMSNorm -> q_b_proj); None projects
        the queries directly (q_proj).
    kv_lora_rank: width of the key/value latent (kv_a_proj -> RMSNorm -> kv_b_proj).
    qk_nope_head_dim: per-head width of the query and key parts without position.
    qk_rope_head_dim: per-head width of the rotary parts (even).
    v_head_dim: per-head width of the values.
    rope_interleave: the rotary dimensions come in interleaved pairs (x0, x1), (x2, x3) ... as in
        DeepSeek's checkpoints, rather than as two halves.
    latent_norm_eps: epsilon of the two latent RMSNorms (transformers fixes it at 1e-6).
    """

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_interleave: bool = True
    latent_norm_eps: float = 1e-6

    def check(self) -> None:
        if self.qk_rope_head_dim % 2:
            rule = "rotary embeddings need an even width"
            raise invalid("qk_rope_head_dim", self.qk_rope_head_dim, rule)

    @property
    def qk_head_dim(self) -> int:
        """Per-head width of queries and keys: qk_nope_head_dim + qk_rope_head_dim."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(kw_only=True)
class ModelConfig(ConfigBase):
    """A decoder-only language model: pre-RMSNorm blocks of attention and a dense or MoE FFN.

    Sizes
        vocab_size: number of token ids.
        d_model: width of the residual stream.
        n_layers: number of blocks.
        n_heads: query heads per attention layer.
        n_kv_heads: key/value heads (grouped-query attention, Ainslie et al. 2023); must divide
            n_heads. None means n_heads (plain multi-head attention).
        head_dim: width of each head; None means d_model // n_heads.
        d_ff: hidden width of the dense SwiGLU FFN of the non-MoE layers; required when some layer
            is dense, ignored otherwise.

    Mixture of experts
        moe: the MoE FFN of the MoE layers (its d_model must equal the model's); None makes every
            layer dense.
        moe_layers: which layers are MoE: "all"; an int n for every n-th layer (layers n-1, 2n-1,
            ... counting from 0, as Qwen2-MoE's decoder_sparse_step); or an explicit tuple of layer
            indices.
        first_dense: the first k layers are dense whatever moe_layers says (DeepSeek's
            first_k_dense_replace).

    Attention
        max_seq_len: longest sequence (prompt plus generated tokens) the model accepts.
        rope_theta: base of the rotary position embedding frequencies (Su et al. 2021).
        sliding_window: None for full causal attention, or W: each token attends to itself and the
            W - 1 tokens before it (Mistral/Mixtral).
        layer_types: None (every layer windowed when sliding_window is set), or one of "full" /
            "sliding" per layer: only the "sliding" layers use the window (GPT-OSS alternates them;
            Qwen2-MoE's max_window_layers).
        attn_bias: add biases to the q, k, v and output projections; "qkv" to q, k and v only
            (Qwen2-MoE). Multi-head latent attention puts them on q_a_proj, kv_a_proj and o_proj.
        attn_sinks: a learned logit per head joins each softmax's denominator and takes no value,
            so a head may attend to nothing (GPT-OSS; Xiao et al. 2023, *Attention Sinks*).
        qk_norm: None; "head" (RMSNorm over each head of q and k, one weight of head_dim shared by
            the heads; Qwen3); or "full" (RMSNorm over the whole q and k projections; OLMoE).
        clip_qkv: None, or c: q, k and v are clamped to [-c, c] after projection (and the "full"
            q/k norm), as OLMoE's clip_qkv.
        rope_scaling: None, or the `RopeScaling` (YaRN) of the rotary embedding.
        mla: None, or the `MLAConfig` that replaces grouped-query attention by multi-head latent
            attention (DeepSeek-V2/V3); n_kv_heads, head_dim and qk_norm then do not apply.

    Multi-token prediction (DeepSeek-V3 paper, arXiv 2412.19437, section 2.2)
        mtp_depth: number D of extra prediction depths; 0 turns it off. Depth k predicts the
            token k + 1 positions ahead with one more block (`moekit.model.mtp`).
        mtp_loss_weight: lambda: the loss adds (lambda / D) * the sum of the depths' losses
            (DeepSeek-V3 used 0.3, then 0.1).
        mtp_target: what depth k learns at position t. "tokens": the token k + 1 ahead, by
            cross-entropy (the paper's). "model": the main model's own prediction of that token
            (its logits at t + k, detached), by KL(main || depth): self-distillation, for a head
            added to a trained model (`--train.freeze=...,mtp`) to draft for speculative
            decoding, whose acceptance is 1 - TV(main, draft) a token (<= sqrt(KL / 2) lost).
            The target is the main model's training-mode output: a router's training noise or
            jitter, if configured, shapes it too.

    Other
        norm_eps: epsilon of every RMSNorm.
        tie_embeddings: the LM head reuses the token embedding matrix.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None
    head_dim: int | None = None
    d_ff: int | None = None
    moe: MoEConfig | None = None
    moe_layers: MoELayers = "all"
    first_dense: NonNegInt = 0
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    sliding_window: int | None = None
    layer_types: tuple[Literal["full", "sliding"], ...] | None = None
    attn_bias: bool | Literal["qkv"] = False
    attn_sinks: bool = False
    qk_norm: Literal["head", "full"] | None = None
    clip_qkv: float | None = None
    rope_scaling: RopeScaling | None = None
    mla: MLAConfig | None = None
    mtp_depth: NonNegInt = 0
    mtp_loss_weight: NonNegFloat = 0.3
    mtp_target: Literal["tokens", "model"] = "tokens"
    norm_eps: float = 1e-5
    tie_embeddings: bool = False

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads (n_kv_heads, or n_heads when that is None)."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def d_head(self) -> int:
        """Width of one attention head (head_dim, or d_model // n_heads when that is None)."""
        return self.d_model // self.n_heads if self.head_dim is None else self.head_dim

    @property
    def rope_dim(self) -> int:
        """Width of the rotary part of each head (d_head; qk_rope_head_dim under MLA)."""
        return self.d_head if self.mla is None else self.mla.qk_rope_head_dim

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of layer `layer` (None: full causal attention)."""
        if self.layer_types is not None and self.layer_types[layer] == "full":
            return None
        return self.sliding_window

    @property
    def moe_layer_indices(self) -> list[int]:
        """Indices of the MoE layers, ascending (empty when moe is None)."""
        if self.moe is None:
            return []
        if self.moe_layers == "all":
            chosen = range(self.n_layers)
        elif isinstance(self.moe_layers, int):
            chosen = range(self.moe_layers - 1, self.n_layers, self.moe_layers)
        else:
            chosen = sorted(self.moe_layers)
        return [i for i in chosen if i >= self.first_dense]

    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        """The named preset; see `MODEL_PRESETS` for the names."""
        from moekit.config.presets import MODEL_PRESETS  # the presets are built of this class

        if name not in MODEL_PRESETS:
            raise invalid("preset", name, f"known model presets are {', '.join(MODEL_PRESETS)}")
        return MODEL_PRESETS[name]()

    def check(self) -> None:
        self._check_attention()
        self._check_layers()
        if self.mtp_depth >= self.max_seq_len - 1:
            rule = f"must be < max_seq_len - 1 ({self.max_seq_len - 1}): no position has a target"
            raise invalid("mtp_depth", self.mtp_depth, rule)

    def _check_attention(self) -> None:
        if self.layer_types is not None:
            if len(self.layer_types) != self.n_layers:
                allowed = f'a tuple of {self.n_layers} (n_layers) of "full" or "sliding"'
                raise invalid("layer_types", self.layer_types, allowed)
            if "sliding" in self.layer_types and self.sliding_window is None:
                rule = '"sliding" layers need a sliding_window'
                raise invalid("layer_types", self.layer_types, rule)
        if self.mla is not None:
            for name in ("qk_norm", "clip_qkv", "attn_sinks"):
                if getattr(self, name) not in (None, False):
                    rule = "is not supported with mla (use None/False)"
                    raise invalid(name, getattr(self, name), rule)
            if self.attn_bias == "qkv":
                raise invalid("attn_bias", "qkv", "mla takes True or False")
            return
        if self.n_heads % self.kv_heads != 0:
            raise invalid("n_kv_heads", self.n_kv_heads, f"must divide n_heads ({self.n_heads})")
        if self.head_dim is None and self.d_model % self.n_heads != 0:
            rule = f"None needs d_model ({self.d_model}) divisible by n_heads ({self.n_heads})"
            raise invalid("head_dim", None, rule)
        if self.d_head % 2 != 0:
            raise invalid("head_dim", self.d_head, "rotary embeddings need an even head width")

    def _check_layers(self) -> None:
        if self.moe is not None and self.moe.d_model != self.d_model:
            raise invalid("moe.d_model", self.moe.d_model, f"must equal d_model ({self.d_model})")
        if self.first_dense > self.n_layers:
            rule = f"must be <= n_layers ({self.n_layers})"
            raise invalid("first_dense", self.first_dense, rule)
        layers = self.moe_layers
        if isinstance(layers, tuple) and (
            any(i >= self.n_layers for i in layers) or len(set(layers)) != len(layers)
        ):
            rule = f"indices must be distinct integers in [0, {self.n_layers})"
            raise invalid("moe_layers", layers, rule)
        if self.moe is not None and not self.moe_layer_indices:
            rule = f"selects no MoE layer (first_dense={self.first_dense})"
            raise invalid("moe_layers", self.moe_layers, rule)
        if len(self.moe_layer_indices) < self.n_layers and self.d_ff is None:
            raise invalid("d_ff", None, "dense layers need a dense FFN width (an integer >= 1)")


def dense_twin(model: ModelConfig) -> ModelConfig:
    """The dense model of the same compute per token: every MoE layer's FFN becomes a dense
    SwiGLU FFN of its active width (top_k * d_expert + shared), so only the routers' parameters
    differ. Refuses an MoE for which that is not the same compute: experts that are not SwiGLU,
    routing whose experts per token vary (expert choice, capacity limits), or dense layers of
    another width."""
    moe = model.moe
    if moe is None:
        raise ValueError("a dense twin needs an MoE model (model.moe is not set)")
    if moe.activation != "swiglu" or moe.expert_bias:
        raise ValueError(
            f"a dense twin is a SwiGLU FFN without biases: experts with activation="
            f"{moe.activation!r}, expert_bias={moe.expert_bias} would not compute the same"
        )
    if moe.router == "expert_choice" or moe.capacity_factor is not None:
        raise ValueError(
            "a dense twin needs exactly top_k experts per token: not router='expert_choice' "
            f"or capacity_factor={moe.capacity_factor}"
        )
    has_dense = len(model.moe_layer_indices) < model.n_layers
    if has_dense and model.d_ff != moe.active_width:
        raise ValueError(
            f"the model's dense layers have d_ff={model.d_ff}, its MoE layers an active width of "
            f"{moe.active_width}: a dense twin gives every layer one width, so they must match"
        )
    return model.replace(moe=None, d_ff=moe.active_width)
