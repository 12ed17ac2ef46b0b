"""Configs: plain, validated, JSON-round-trippable dataclasses.

Every config is `@dataclass(kw_only=True)` data (no tensors, devices or callables) validated in
`__post_init__`; a bad value raises `ValueError` naming the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from moekit.userfiles import read_json

C = TypeVar("C", bound="ConfigBase")
# What to do about a damaged file of a run directory (config.json, written by `moekit train`).
RUN_FILE_REMEDY = "restore it from a copy of the run (`moekit train` or `convert` wrote it)"


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{name}={value!r} is invalid: {allowed}")


def check_choice(name: str, value: Any, choices: tuple) -> None:
    """Raise unless `value` is one of `choices`."""
    if value not in choices:
        _fail(name, value, f"allowed values are {', '.join(repr(c) for c in choices)}")


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    """Raise unless `value` is a finite number > 0 (or >= 0 with `allow_zero`)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        _fail(name, value, "must be >= 0" if allow_zero else "must be > 0")


class ConfigBase:
    """JSON round-trip for nested config dataclasses."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Build from a dict as `to_dict` writes it; unknown and missing keys are an error."""
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__} is a JSON object of its fields, not {data!r}")
        hints = typing.get_type_hints(cls)
        fields = dataclasses.fields(cls)  # type: ignore[arg-type]
        names = {f.name for f in fields}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{cls.__name__} has no field(s) {unknown}; known: {sorted(names)}")
        missing = [f.name for f in fields if f.name not in data and _required(f)]
        if missing:
            raise ValueError(f"{cls.__name__} needs the field(s) {missing}")
        kwargs = {}
        for key, value in data.items():
            try:
                kwargs[key] = _from_json_value(hints[key], value)
            except ValueError as err:  # a nested config's error names the path to its field
                raise ValueError(_with_path(key, str(err))) from None
        return cls(**kwargs)

    @classmethod
    def from_json(cls: type[C], text: str) -> C:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_file(cls: type[C], path: str | Path, remedy: str) -> C:
        """Read a config JSON file a user handed us: a file that is not JSON, or a config whose
        fields are wrong, is one `ValueError` naming the file (and the position or the field);
        `remedy` says what to do about a file that is not JSON."""
        return config_from_data(cls, read_json(path, remedy), path)

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def config_from_data(cls: type[C], data: Any, path: str | Path) -> C:
    """`cls.from_dict(data)` of the JSON read from `path`; its errors name the file."""
    try:
        return cls.from_dict(data)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _with_path(key: str, message: str) -> str:
    """`top_k=9 is invalid...` raised inside field `moe` -> `moe.top_k=9 is invalid...`."""
    if re.match(r"[A-Za-z_][\w.]*(=|: )", message):
        return f"{key}.{message}"
    return f"{key}: {message}"


def _from_json_value(hint: Any, value: Any) -> Any:
    """Turn a JSON value back into what the field's type hint expects (nested configs, tuples)."""
    if value is None:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if isinstance(arg, type) and issubclass(arg, ConfigBase) and isinstance(value, dict):
                return arg.from_dict(value)
            if typing.get_origin(arg) is tuple and isinstance(value, list):
                return tuple(value)
        return value
    if isinstance(hint, type) and issubclass(hint, ConfigBase):
        return hint.from_dict(value)
    if origin is tuple:
        return tuple(value)
    return value


Activation = Literal["swiglu", "gelu", "relu", "clamped_swiglu"]
ACTIVATIONS = ("swiglu", "gelu", "relu", "clamped_swiglu")


@dataclass(kw_only=True)
class MoEConfig(ConfigBase):
    """One Mixture-of-Experts feed-forward layer.

    Sizes
        d_model: width of the token vectors the layer reads and writes.
        d_expert: hidden width F of each routed expert.
        n_experts: number of routed experts E.
        top_k: experts per token k (token choice); for expert choice, the average experts per token
            that sets each expert's capacity.

    Experts
        activation: "swiglu" (gated, silu(x W_gate) * x W_up; default), "gelu" or "relu" (ungated),
            or "clamped_swiglu" (GPT-OSS; gated): with g = min(x W_gate, limit) and
            u = clamp(x W_up, -limit, limit), g * sigmoid(alpha * g) * (u + 1).
        swiglu_alpha, swiglu_limit: the alpha (1.702) and limit (7.0) of "clamped_swiglu".
        expert_bias: add bias terms to the expert projections.
        n_shared_experts: always-on experts applied to every token (DeepSeekMoE, Qwen2-MoE); they
            are fused into one dense FFN of width `d_shared`.
        d_shared: hidden width of the fused shared FFN; default `n_shared_experts * d_expert`.
        shared_gate: scale the shared output by `sigmoid(x @ w_shared_gate)` (Qwen2-MoE).

    Routing
        router: "topk" (token choice: each token picks k experts) or "expert_choice" (each expert
            picks its C tokens, Zhou et al. 2022; NOT causal: a token's routing depends on later
            tokens of the same call, so it is unfit for autoregressive decoding), or "hash" (a fixed
            balanced map from token id to expert, Roller et al. 2021; no learned router; the
            layer needs the token ids: `layer(x, token_ids)`; weights 1/top_k).
        score: "softmax" (probabilities over all experts) or "sigmoid" (independent gates,
            DeepSeek-V3).
        normalize: divide the selected weights of a token by their sum (Mixtral, DeepSeek-V3).
            With top_k=1 and normalize=False, softmax routing is Switch. Softmax with normalize
            is also GPT-OSS's "top-k, then softmax over the selected logits": softmax is
            monotonic, so the same experts win, and renormalising cancels the partition function.
        router_bias: add a learned bias to the router logits (GPT-OSS). Unlike the router's
            `expert_bias` buffer (aux-loss-free balancing), it is a trained parameter and it
            changes the weights, not only the selection.
        routed_scaling: multiplies the routed weights (DeepSeek-V3 uses 2.5).
        n_groups, topk_groups: group-limited routing (DeepSeek-V3): experts are split into n_groups
            groups, each group scores the sum of its two best biased scores, and only the experts of
            the best topk_groups groups may be selected: the others are excluded outright (-inf),
            as DeepSeek-V3's inference code and transformers 5 do (the first Hugging Face remote
            code filled them with 0.0, which let a masked expert win over negative biased scores).
        noise: None; "jitter" (Switch: the router input is multiplied by U(1-eps, 1+eps) during
            training); "gaussian" (Shazeer et al. 2017 noisy top-k: logits get N(0,1) noise with
            learned std softplus(x @ W_noise), training only).
        noise_eps: the jitter's eps.

    Capacity
        capacity_factor: None is dropless; otherwise each expert takes at most
            C = ceil(capacity_factor * T * top_k / n_experts) of the T tokens of a call.
        drop_policy: which assignments win a full expert: "position" (every first choice before any
            second choice, then token order; GShard/Switch) or "probability" (highest routing weight
            first; batch-prioritised routing).
        overflow: "drop" (a dropped assignment contributes zero; the token's other weights are not
            renormalised) or "next_best" (it moves to the token's next expert by score that has room
            and is not already chosen by the token, weighted by that expert's score under the same
            normaliser; in rounds: each round every homeless assignment asks its best remaining
            expert, and experts accept by priority up to their free room).

    Balance (each loss is returned unweighted in `aux`, and weighted in `aux.loss`)
        aux_loss_coef: Switch balance loss E * sum_i f_i P_i (1 under uniform routing).
        aux_loss_scope: "batch" (over all tokens of the call) or "sequence" (per sequence, averaged;
            DeepSeek-V3's sequence-wise loss).
        z_loss_coef: router z-loss mean(logsumexp(logits)^2) (ST-MoE).
        importance_loss_coef, load_loss_coef: Shazeer et al. 2017 CV^2 losses; the load loss needs
            noise="gaussian".
        bias_update_rate: auxiliary-loss-free balancing (Wang et al. 2024): after each optimizer
            step `update_expert_bias()` moves each expert's selection bias by
            rate * sign(mean - load). 0 disables it.

    Compute
        expert_impl: "auto" (grouped GEMM where the platform supports it, else "loop"),
            "grouped_mm" (torch._grouped_mm), "loop" (one GEMM per expert that received tokens) or
            "reference" (one token at a time; slow and obviously correct, for tests).
    """

    d_model: int
    d_expert: int
    n_experts: int
    top_k: int = 2
    activation: Activation = "swiglu"
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    expert_bias: bool = False
    n_shared_experts: int = 0
    d_shared: int | None = None
    shared_gate: bool = False
    router: Literal["topk", "expert_choice", "hash"] = "topk"
    score: Literal["softmax", "sigmoid"] = "softmax"
    normalize: bool = True
    router_bias: bool = False
    routed_scaling: float = 1.0
    n_groups: int = 1
    topk_groups: int = 1
    noise: Literal["jitter", "gaussian"] | None = None
    noise_eps: float = 1e-2
    capacity_factor: float | None = None
    drop_policy: Literal["position", "probability"] = "position"
    overflow: Literal["drop", "next_best"] = "drop"
    aux_loss_coef: float = 0.0
    aux_loss_scope: Literal["batch", "sequence"] = "batch"
    z_loss_coef: float = 0.0
    importance_loss_coef: float = 0.0
    load_loss_coef: float = 0.0
    bias_update_rate: float = 0.0
    expert_impl: Literal["auto", "grouped_mm", "loop", "reference"] = "auto"

    def __post_init__(self) -> None:
        self._check_sizes()
        self._check_routing()
        self._check_capacity_and_losses()

    @property
    def shared_width(self) -> int:
        """Hidden width of the fused shared-expert FFN (0 without shared experts)."""
        if self.n_shared_experts == 0:
            return 0
        return self.d_shared if self.d_shared is not None else self.n_shared_experts * self.d_expert

    @property
    def active_width(self) -> int:
        """The expert width one token runs through: top_k routed experts and the shared ones
        (for SwiGLU experts with token-choice routing, the d_ff of a dense FFN of the same
        compute per token: `dense_twin`)."""
        return self.top_k * self.d_expert + self.shared_width

    @property
    def gated(self) -> bool:
        """True for the gated activations, whose experts project to [gate | up] (2 * d_expert)."""
        return self.activation in ("swiglu", "clamped_swiglu")

    @property
    def token_choice(self) -> bool:
        """True for routers where each token picks its experts (ids and weights per token)."""
        return self.router != "expert_choice"

    def _check_sizes(self) -> None:
        for name in ("d_model", "d_expert", "n_experts", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                _fail(name, value, "must be an integer >= 1")
        if self.top_k > self.n_experts:
            _fail("top_k", self.top_k, f"must be <= n_experts ({self.n_experts})")
        check_choice("activation", self.activation, ACTIVATIONS)
        check_positive("swiglu_alpha", self.swiglu_alpha)
        check_positive("swiglu_limit", self.swiglu_limit)
        for name in ("expert_bias", "router_bias", "shared_gate", "normalize"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "must be True or False")
        if not isinstance(self.n_shared_experts, int) or self.n_shared_experts < 0:
            _fail("n_shared_experts", self.n_shared_experts, "must be an integer >= 0")
        if self.d_shared is not None:
            if self.n_shared_experts == 0:
                _fail("d_shared", self.d_shared, "needs n_shared_experts >= 1")
            if not isinstance(self.d_shared, int) or self.d_shared < 1:
                _fail("d_shared", self.d_shared, "must be an integer >= 1 or None")
        if self.shared_gate and self.n_shared_experts == 0:
            _fail("shared_gate", self.shared_gate, "needs n_shared_experts >= 1")

    def _check_routing(self) -> None:
        check_choice("router", self.router, ("topk", "expert_choice", "hash"))
        check_choice("score", self.score, ("softmax", "sigmoid"))
        check_choice("noise", self.noise, (None, "jitter", "gaussian"))
        check_positive("routed_scaling", self.routed_scaling)
        check_positive("noise_eps", self.noise_eps)
        if self.noise == "jitter" and self.noise_eps >= 1:
            _fail("noise_eps", self.noise_eps, "jitter needs 0 < noise_eps < 1")
        for name in ("n_groups", "topk_groups"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                _fail(name, value, "must be an integer >= 1")
        if self.n_experts % self.n_groups != 0:
            _fail("n_groups", self.n_groups, f"must divide n_experts ({self.n_experts})")
        if self.topk_groups > self.n_groups:
            _fail("topk_groups", self.topk_groups, f"must be <= n_groups ({self.n_groups})")
        reachable = self.topk_groups * (self.n_experts // self.n_groups)
        if self.top_k > reachable:
            _fail("top_k", self.top_k, f"must be <= topk_groups * experts per group ({reachable})")
        if self.router != "topk":
            self._check_simple_router()

    def _check_simple_router(self) -> None:
        """Options that only token-choice top-k routing can use."""
        who = f"router={self.router!r}"
        if self.n_groups > 1:
            _fail(
                "n_groups", self.n_groups, f"group-limited routing needs router='topk', not {who}"
            )
        if self.noise is not None:
            _fail("noise", self.noise, f"noise needs router='topk', not {who}")
        if self.bias_update_rate > 0:
            _fail(
                "bias_update_rate", self.bias_update_rate, f"needs router='topk'; {who} has no bias"
            )
        if self.overflow != "drop":
            _fail("overflow", self.overflow, f"needs router='topk', not {who}")
        if self.router == "hash":  # fixed routing: the balance losses are constants, allowed
            return
        if self.capacity_factor is None:
            _fail("capacity_factor", None, "router='expert_choice' needs a capacity (e.g. 1.0)")
        for name in ("aux_loss_coef", "importance_loss_coef", "load_loss_coef"):
            if getattr(self, name) > 0:
                _fail(
                    name, getattr(self, name), f"token-balance losses need router='topk', not {who}"
                )

    def _check_capacity_and_losses(self) -> None:
        if self.capacity_factor is not None:
            check_positive("capacity_factor", self.capacity_factor)
        check_choice("drop_policy", self.drop_policy, ("position", "probability"))
        check_choice("overflow", self.overflow, ("drop", "next_best"))
        check_choice("aux_loss_scope", self.aux_loss_scope, ("batch", "sequence"))
        check_choice("expert_impl", self.expert_impl, ("auto", "grouped_mm", "loop", "reference"))
        for name in (
            "aux_loss_coef",
            "z_loss_coef",
            "importance_loss_coef",
            "load_loss_coef",
            "bias_update_rate",
        ):
            check_positive(name, getattr(self, name), allow_zero=True)
        if self.load_loss_coef > 0 and self.noise != "gaussian":
            _fail("load_loss_coef", self.load_loss_coef, "the load loss needs noise='gaussian'")
        if self.load_loss_coef > 0 and self.top_k == self.n_experts:
            _fail("load_loss_coef", self.load_loss_coef, "the load loss needs top_k < n_experts")


MoELayers = Literal["all"] | int | tuple[int, ...]


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
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None

    def __post_init__(self) -> None:
        check_positive("factor", self.factor)
        _check_int("original_max_seq_len", self.original_max_seq_len, 1)
        check_positive("beta_fast", self.beta_fast)
        check_positive("beta_slow", self.beta_slow)
        if not isinstance(self.truncate, bool):
            _fail("truncate", self.truncate, "must be True or False")
        for name in ("mscale", "mscale_all_dim", "attention_factor"):
            if getattr(self, name) is not None:
                check_positive(name, getattr(self, name), allow_zero=name != "attention_factor")


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

    def __post_init__(self) -> None:
        if self.q_lora_rank is not None:
            _check_int("q_lora_rank", self.q_lora_rank, 1)
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            _check_int(name, getattr(self, name), 1)
        if self.qk_rope_head_dim % 2:
            _fail("qk_rope_head_dim", self.qk_rope_head_dim, "rotary embeddings need an even width")
        if not isinstance(self.rope_interleave, bool):
            _fail("rope_interleave", self.rope_interleave, "must be True or False")
        check_positive("latent_norm_eps", self.latent_norm_eps)

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
    first_dense: int = 0
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
    norm_eps: float = 1e-5
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.moe_layers, list):
            self.moe_layers = tuple(self.moe_layers)
        if isinstance(self.layer_types, list):
            self.layer_types = tuple(self.layer_types)
        self._check_sizes()
        self._check_attention()
        self._check_layers()

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
        if name not in MODEL_PRESETS:
            _fail("preset", name, f"known model presets are {', '.join(MODEL_PRESETS)}")
        return MODEL_PRESETS[name]()

    def _check_sizes(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            _check_int(name, getattr(self, name), 1)
        for name in ("n_kv_heads", "head_dim", "d_ff"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        check_positive("rope_theta", self.rope_theta)
        check_positive("norm_eps", self.norm_eps)
        for name in ("attn_sinks", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "must be True or False")
        check_choice("attn_bias", self.attn_bias, (False, True, "qkv"))

    def _check_attention(self) -> None:
        self._check_attention_options()
        if self.mla is not None:
            return
        if self.n_heads % self.kv_heads != 0:
            _fail("n_kv_heads", self.n_kv_heads, f"must divide n_heads ({self.n_heads})")
        if self.head_dim is None and self.d_model % self.n_heads != 0:
            _fail(
                "head_dim",
                None,
                f"None needs d_model ({self.d_model}) divisible by n_heads ({self.n_heads})",
            )
        if self.d_head % 2 != 0:
            _fail("head_dim", self.d_head, "rotary embeddings need an even head width")

    def _check_attention_options(self) -> None:
        if self.sliding_window is not None:
            _check_int("sliding_window", self.sliding_window, 1)
        check_choice("qk_norm", self.qk_norm, (None, "head", "full"))
        if self.clip_qkv is not None:
            check_positive("clip_qkv", self.clip_qkv)
        for name, kind in (("rope_scaling", RopeScaling), ("mla", MLAConfig)):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), kind):
                _fail(name, getattr(self, name), f"must be a {kind.__name__} or None")
        if self.layer_types is not None:
            ok = isinstance(self.layer_types, tuple) and len(self.layer_types) == self.n_layers
            if not ok or not set(self.layer_types) <= {"full", "sliding"}:
                allowed = f'a tuple of {self.n_layers} (n_layers) of "full" or "sliding"'
                _fail("layer_types", self.layer_types, allowed)
            if "sliding" in self.layer_types and self.sliding_window is None:
                _fail("layer_types", self.layer_types, '"sliding" layers need a sliding_window')
        if self.mla is not None:
            for name in ("qk_norm", "clip_qkv", "attn_sinks"):
                if getattr(self, name) not in (None, False):
                    _fail(name, getattr(self, name), "is not supported with mla (use None/False)")
            if self.attn_bias == "qkv":
                _fail("attn_bias", "qkv", "mla takes True or False")

    def _check_layers(self) -> None:
        if self.moe is not None and not isinstance(self.moe, MoEConfig):
            _fail("moe", self.moe, "must be a MoEConfig or None")
        if self.moe is not None and self.moe.d_model != self.d_model:
            _fail("moe.d_model", self.moe.d_model, f"must equal d_model ({self.d_model})")
        _check_int("first_dense", self.first_dense, 0)
        if self.first_dense > self.n_layers:
            _fail("first_dense", self.first_dense, f"must be <= n_layers ({self.n_layers})")
        self._check_moe_layers()
        if self.moe is not None and not self.moe_layer_indices:
            _fail(
                "moe_layers",
                self.moe_layers,
                f"selects no MoE layer (first_dense={self.first_dense})",
            )
        if len(self.moe_layer_indices) < self.n_layers and self.d_ff is None:
            _fail("d_ff", None, "dense layers need a dense FFN width (an integer >= 1)")

    def _check_moe_layers(self) -> None:
        layers = self.moe_layers
        if layers == "all":
            return
        if isinstance(layers, int) and not isinstance(layers, bool):
            _check_int("moe_layers", layers, 1)
            return
        allowed = '"all", an integer n >= 1 (every n-th layer) or a tuple of layer indices'
        if not isinstance(layers, tuple):
            _fail("moe_layers", layers, allowed)
        bad = [i for i in layers if not isinstance(i, int) or not 0 <= i < self.n_layers]
        if bad or len(set(layers)) != len(layers):
            _fail(
                "moe_layers", layers, f"indices must be distinct integers in [0, {self.n_layers})"
            )


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        _fail(name, value, f"must be an integer >= {minimum}")


def tiny_model() -> ModelConfig:
    """For tests: 2 layers, d_model 64, GQA (4 heads, 2 kv heads), 8 experts top-2."""
    return ModelConfig(
        vocab_size=256,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=128,
        moe=MoEConfig(d_model=64, d_expert=64, n_experts=8, top_k=2, aux_loss_coef=0.01),
        max_seq_len=128,
    )


def small_model() -> ModelConfig:
    """The demo model: trains on 2 CPU cores in minutes. 8 experts top-2, tied embeddings."""
    return ModelConfig(
        vocab_size=4096,
        d_model=256,
        n_layers=4,
        n_heads=4,
        moe=MoEConfig(
            d_model=256, d_expert=512, n_experts=8, top_k=2, aux_loss_coef=0.01, z_loss_coef=1e-3
        ),
        max_seq_len=256,
        tie_embeddings=True,
    )


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


def dense_small_model() -> ModelConfig:
    """`small` with a dense FFN of width top_k * d_expert: the same active parameters but the
    routers'."""
    return dense_twin(small_model())


def mixtral_8x7b() -> ModelConfig:
    """Mixtral-8x7B (Jiang et al. 2024; mistralai/Mixtral-8x7B-v0.1): 46.7B total, 12.9B active."""
    return ModelConfig(
        vocab_size=32000,
        d_model=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        head_dim=128,
        d_ff=14336,
        moe=MoEConfig(d_model=4096, d_expert=14336, n_experts=8, top_k=2, aux_loss_coef=0.02),
        max_seq_len=32768,
        rope_theta=1e6,
    )


def mixtral_8x22b() -> ModelConfig:
    """Mixtral-8x22B (mistralai/Mixtral-8x22B-v0.1): 141B total, 39B active."""
    return ModelConfig(
        vocab_size=32768,
        d_model=6144,
        n_layers=56,
        n_heads=48,
        n_kv_heads=8,
        head_dim=128,
        d_ff=16384,
        moe=MoEConfig(d_model=6144, d_expert=16384, n_experts=8, top_k=2, aux_loss_coef=0.001),
        max_seq_len=65536,
        rope_theta=1e6,
    )


def qwen3_30b_a3b() -> ModelConfig:
    """Qwen3-30B-A3B (Qwen/Qwen3-30B-A3B): 30.5B total, 3.3B active; per-head q/k norm."""
    return ModelConfig(
        vocab_size=151936,
        d_model=2048,
        n_layers=48,
        n_heads=32,
        n_kv_heads=4,
        head_dim=128,
        d_ff=6144,
        moe=MoEConfig(d_model=2048, d_expert=768, n_experts=128, top_k=8, aux_loss_coef=0.001),
        max_seq_len=40960,
        rope_theta=1e6,
        qk_norm="head",
        norm_eps=1e-6,
    )


def olmoe_1b_7b() -> ModelConfig:
    """OLMoE-1B-7B (Muennighoff et al. 2024; allenai/OLMoE-1B-7B-0924): 6.9B total, 1.3B active;
    q/k norm over the full projections, unnormalised top-8 weights."""
    moe = MoEConfig(
        d_model=2048,
        d_expert=1024,
        n_experts=64,
        top_k=8,
        normalize=False,
        aux_loss_coef=0.01,
        z_loss_coef=0.001,
    )
    return ModelConfig(
        vocab_size=50304,
        d_model=2048,
        n_layers=16,
        n_heads=16,
        moe=moe,
        max_seq_len=4096,
        qk_norm="full",
    )


def deepseek_v3() -> ModelConfig:
    """DeepSeek-V3 (DeepSeek-AI 2024; deepseek-ai/DeepSeek-V3): 671B total, 37B active, without
    its multi-token-prediction module. Latent attention with YaRN (factor 40), 3 dense layers,
    then 256 routed experts (8 per token, 4 of 8 groups, sigmoid, scaling 2.5) and one shared;
    the paper's bias update speed 0.001 and sequence-wise balance loss 0.0001."""
    moe = MoEConfig(
        d_model=7168,
        d_expert=2048,
        n_experts=256,
        top_k=8,
        score="sigmoid",
        routed_scaling=2.5,
        n_groups=8,
        topk_groups=4,
        n_shared_experts=1,
        bias_update_rate=0.001,
        aux_loss_coef=0.0001,
        aux_loss_scope="sequence",
    )
    mla = MLAConfig(
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
    )
    yarn = RopeScaling(
        factor=40.0, original_max_seq_len=4096, mscale=1.0, mscale_all_dim=1.0, truncate=True
    )
    return ModelConfig(
        vocab_size=129280,
        d_model=7168,
        n_layers=61,
        n_heads=128,
        d_ff=18432,
        moe=moe,
        first_dense=3,
        max_seq_len=163840,
        rope_scaling=yarn,
        mla=mla,
        norm_eps=1e-6,
    )


def gpt_oss_20b() -> ModelConfig:
    """GPT-OSS-20B (OpenAI 2025; openai/gpt-oss-20b): 20.9B total, 3.6B active. Alternating
    128-token sliding-window and full attention with sinks, 32 experts top-4 with router and
    expert biases, clamped SwiGLU, YaRN (factor 32, untruncated ramp)."""
    moe = MoEConfig(
        d_model=2880,
        d_expert=2880,
        n_experts=32,
        top_k=4,
        activation="clamped_swiglu",
        expert_bias=True,
        router_bias=True,
    )
    return ModelConfig(
        vocab_size=201088,
        d_model=2880,
        n_layers=24,
        n_heads=64,
        n_kv_heads=8,
        head_dim=64,
        moe=moe,
        max_seq_len=131072,
        rope_theta=150000.0,
        rope_scaling=RopeScaling(factor=32.0, original_max_seq_len=4096, truncate=False),
        sliding_window=128,
        layer_types=("sliding", "full") * 12,
        attn_bias=True,
        attn_sinks=True,
    )


MODEL_PRESETS: dict[str, typing.Callable[[], ModelConfig]] = {
    "tiny": tiny_model,
    "small": small_model,
    "dense-small": dense_small_model,
    "mixtral-8x7b": mixtral_8x7b,
    "mixtral-8x22b": mixtral_8x22b,
    "qwen3-30b-a3b": qwen3_30b_a3b,
    "olmoe-1b-7b": olmoe_1b_7b,
    "deepseek-v3": deepseek_v3,
    "gpt-oss-20b": gpt_oss_20b,
}


__all__ = [
    "MODEL_PRESETS",
    "ConfigBase",
    "MLAConfig",
    "MoEConfig",
    "ModelConfig",
    "RopeScaling",
    "check_choice",
    "check_positive",
    "field",
]


# Training runs (issue 3): data, optimisation, evaluation and checkpoints; `moekit train` saves a
# RunConfig as config.json in the run directory.

DEVICE_PATTERN = r"auto|cpu|mps|cuda(:\d+)?"


@dataclass(kw_only=True)
class DataConfig(ConfigBase):
    """Where the training text comes from and how it becomes tokens.

    source: "stdlib" (the .py files of the running Python's standard library, without its test
        suites), a text file, a folder of text files, or a glob such as "docs/**/*.md". Files are
        split into train and validation by a hash of their path; a single file by lines.
    tokenizer: "bpe" (byte-level BPE trained with `tokenizers` on the training split, cached),
        "bytes" (one token per UTF-8 byte plus end-of-text: 257 ids) or "run" (the run
        directory's own tokenizer.json, as `moekit convert --from-hf` writes it; checked against
        the model's vocabulary when the data is prepared).
    vocab_size: BPE vocabulary size, end-of-text included; None means the model's vocab_size.
    val_fraction: share of the files held out for validation (about; at least one file).
    max_files: read only the first N files of the source (sorted by path); None reads all.
    cache_dir: where trained tokenizers and tokenised splits are cached; None means
        $MOEKIT_CACHE, else ~/.cache/moekit.
    """

    source: str = "stdlib"
    tokenizer: Literal["bpe", "bytes", "run"] = "bpe"
    vocab_size: int | None = None
    val_fraction: float = 0.05
    max_files: int | None = None
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source:
            _fail("source", self.source, "must be 'stdlib', a file, a folder or a glob")
        check_choice("tokenizer", self.tokenizer, ("bpe", "bytes", "run"))
        if self.vocab_size is not None:
            if self.tokenizer != "bpe":
                _fail("vocab_size", self.vocab_size, "sizes a BPE: must be None unless 'bpe'")
            _check_int("vocab_size", self.vocab_size, 258)
        check_positive("val_fraction", self.val_fraction)
        if self.val_fraction >= 1:
            _fail("val_fraction", self.val_fraction, "must be between 0 and 1 (exclusive)")
        if self.max_files is not None:
            _check_int("max_files", self.max_files, 1)


@dataclass(kw_only=True)
class EvalConfig(ConfigBase):
    """Evaluation on the validation split: loss and bits per byte.

    every: evaluate every N optimizer steps (and always after the last); 0 only after the last.
    batches: number of batches per evaluation; the same windows every time, so losses compare.
    batch_size: sequences per evaluation batch; None means the training batch_size.
    """

    every: int = 50
    batches: int = 6
    batch_size: int | None = None

    def __post_init__(self) -> None:
        _check_int("every", self.every, 0)
        _check_int("batches", self.batches, 1)
        if self.batch_size is not None:
            _check_int("batch_size", self.batch_size, 1)


@dataclass(kw_only=True)
class CheckpointConfig(ConfigBase):
    """Checkpoints in RUN_DIR/checkpoints/step-NNNNNN (weights, optimizer, schedule, RNG, data).

    every: save every N optimizer steps (and always after the last, and on Ctrl-C); 0 only then.
    keep: how many of the most recent checkpoints to keep.
    """

    every: int = 100
    keep: int = 2

    def __post_init__(self) -> None:
        _check_int("every", self.every, 0)
        _check_int("keep", self.keep, 1)


FREEZE_PARTS = ("experts", "router", "attention")


@dataclass(kw_only=True)
class TrainConfig(ConfigBase):
    """How to train: batches, AdamW, learning-rate schedule, precision, logging.

    Batches
        steps: optimizer steps.
        batch_size: sequences per micro-batch; one step sees batch_size * grad_accum sequences.
        seq_len: tokens per sequence (at most the model's max_seq_len).
        grad_accum: micro-batches whose gradients are summed before each optimizer step.
        seed: seeds the initial weights, the batch sampler and the global torch RNG.

    Optimizer (AdamW; no weight decay on norms, biases, embeddings and routers)
        lr: peak learning rate, reached after warmup_steps of linear warmup, then cosine decay to
            lr * min_lr_ratio at the last step.
        weight_decay, betas, eps: AdamW's.
        grad_clip: clip the gradients' global norm to this; None does not clip.

    Execution
        device: "auto" (cuda when available, else cpu), "cpu", "cuda", "cuda:N" or "mps".
        bf16: run the forward pass under bfloat16 autocast (weights and optimizer stay float32).
        compile: wrap the model in torch.compile.
        threads: CPU threads for torch; None leaves torch's default.
        freeze: parts left untrained (fine-tuning): "experts" (routed and shared), "router",
            "attention", or several comma-separated; None trains everything.

    Logging
        log_every: write train metrics (loss averaged over the interval, expert counts summed over
            it) to metrics.jsonl every N steps.
        progress: show a progress bar.
        tensorboard: also write TensorBoard events when the tensorboard package is installed.
    """

    steps: int = 400
    batch_size: int = 8
    seq_len: int = 256
    grad_accum: int = 1
    seed: int = 0
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float | None = 1.0
    device: str = "auto"
    bf16: bool = False
    compile: bool = False
    threads: int | None = None
    freeze: str | None = None
    log_every: int = 10
    progress: bool = True
    tensorboard: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        for name, minimum in (("steps", 1), ("batch_size", 1), ("seq_len", 2), ("grad_accum", 1)):
            _check_int(name, getattr(self, name), minimum)
        for name, minimum in (("seed", 0), ("warmup_steps", 0), ("log_every", 1)):
            _check_int(name, getattr(self, name), minimum)
        self._check_optimizer()
        if not re.fullmatch(DEVICE_PATTERN, str(self.device)):
            _fail("device", self.device, "use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
        for name in ("bf16", "compile", "progress", "tensorboard"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "must be True or False")
        if self.threads is not None:
            _check_int("threads", self.threads, 1)
        parts = str(self.freeze).split(",") if self.freeze else []
        if not all(p.strip() in FREEZE_PARTS for p in parts):
            _fail(
                "freeze",
                self.freeze,
                f"use one or more of {', '.join(FREEZE_PARTS)}, comma-separated",
            )

    def _check_optimizer(self) -> None:
        check_positive("lr", self.lr)
        check_positive("eps", self.eps)
        check_positive("weight_decay", self.weight_decay, allow_zero=True)
        check_positive("min_lr_ratio", self.min_lr_ratio, allow_zero=True)
        if self.min_lr_ratio > 1:
            _fail("min_lr_ratio", self.min_lr_ratio, "must be between 0 and 1")
        ok = len(self.betas) == 2 and all(isinstance(b, (int, float)) for b in self.betas)
        if not ok or not all(0 <= b < 1 for b in self.betas):
            _fail("betas", self.betas, "must be two numbers in [0, 1)")
        if self.grad_clip is not None:
            check_positive("grad_clip", self.grad_clip)


@dataclass(kw_only=True)
class ParallelConfig(ConfigBase):
    """How a run spreads over the processes `torchrun` starts (moekit.distributed).

    The processes form a (dp, ep) grid. Each MoE layer's routed experts are split over the ep
    processes of a row (expert parallelism: tokens travel to their experts and back by
    all-to-all); the dp rows are copies of one another's expert shards. Everything that is not a
    routed expert (attention, routers, shared experts, embeddings) is replicated on every process
    and its gradients are averaged over all of them (DDP). `train.batch_size` stays the global
    batch: each process takes batch_size / world_size of its sequences.

    ep: expert-parallel size; must divide every MoE layer's n_experts.
    dp: data-parallel size (copies of each expert shard); None means world_size // ep.
        world_size must equal ep * dp.
    scope: what the statistics that couple tokens are computed over. "global": every process's
        tokens of the micro-batch, as one process would see the whole global batch: the balance
        losses, the metrics in `aux` (counts, MaxVio, dropped fraction, entropy) and the capacity
        C = ceil(capacity_factor * T_global * top_k / E) with its drop order; results do not
        depend on the layout. "local": each process's own tokens (GShard's per-group capacity,
        per-device balance losses); less communication, results change with the layout.
        The aux-loss-free bias counts are summed over all processes in both scopes, so every
        process keeps identical biases.
    timeout_s: a collective operation that waits longer than this fails with an error naming the
        failure (a dead or hung process); it must exceed the longest time one process works
        while the others wait: rank 0 preparing the data on a first run, writing a checkpoint.
    backend: "auto" (nccl on CUDA, else gloo), "gloo" or "nccl".
    """

    ep: int = 1
    dp: int | None = None
    scope: Literal["global", "local"] = "global"
    timeout_s: float = 600.0
    backend: Literal["auto", "gloo", "nccl"] = "auto"

    def __post_init__(self) -> None:
        _check_int("ep", self.ep, 1)
        if self.dp is not None:
            _check_int("dp", self.dp, 1)
        check_choice("scope", self.scope, ("global", "local"))
        check_positive("timeout_s", self.timeout_s)
        check_choice("backend", self.backend, ("auto", "gloo", "nccl"))

    def check_model(self, model: ModelConfig) -> None:
        """Raise unless the model's MoE layers can be split over `ep` processes."""
        if self.ep == 1 or model.moe is None:
            return
        if model.moe.n_experts % self.ep:
            _fail(
                "parallel.ep", self.ep, f"must divide model.moe.n_experts ({model.moe.n_experts})"
            )
        if not model.moe.token_choice:
            _fail("parallel.ep", self.ep, "expert parallelism needs a token-choice router")


@dataclass(kw_only=True)
class RunConfig(ConfigBase):
    """A training run: the model and how to train it.

    `RunConfig.preset(name)` pairs `ModelConfig.preset(name)` with the training settings tuned for
    it; "tiny" (for tests and smoke runs) widens the tiny model's vocabulary to 512 so that a BPE
    fits, and trains 30 steps on 40 files; "experiment" is the base run of `moekit experiment`.
    """

    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        self.parallel.check_model(self.model)
        if self.train.seq_len > self.model.max_seq_len:
            _fail(
                "train.seq_len",
                self.train.seq_len,
                f"must be <= model.max_seq_len ({self.model.max_seq_len})",
            )
        data = self.train.data
        if data.tokenizer == "bytes" and self.model.vocab_size < 257:
            _fail("model.vocab_size", self.model.vocab_size, "tokenizer='bytes' needs >= 257")
        if data.tokenizer == "bpe" and data.vocab_size is None and self.model.vocab_size < 258:
            _fail("model.vocab_size", self.model.vocab_size, "a BPE vocabulary needs >= 258")
        if data.vocab_size is not None and data.vocab_size > self.model.vocab_size:
            _fail(
                "train.data.vocab_size",
                data.vocab_size,
                f"must be <= model.vocab_size ({self.model.vocab_size})",
            )

    @property
    def token_vocab_size(self) -> int:
        """Size of the tokenizer's vocabulary (at most model.vocab_size)."""
        data = self.train.data
        if data.tokenizer == "bytes":
            return 257
        return data.vocab_size if data.vocab_size is not None else self.model.vocab_size

    @classmethod
    def preset(cls, name: str) -> RunConfig:
        """The model preset `name` with its training settings."""
        if name in RUN_PRESETS:
            return RUN_PRESETS[name]()
        return cls(model=ModelConfig.preset(name))


def tiny_run() -> RunConfig:
    """A run of seconds: the tiny model (vocabulary 512) on 40 standard-library files."""
    train = TrainConfig(
        steps=30,
        batch_size=8,
        seq_len=64,
        lr=3e-3,
        warmup_steps=5,
        log_every=5,
        data=DataConfig(max_files=40),
        eval=EvalConfig(every=10, batches=2),
        checkpoint=CheckpointConfig(every=10),
    )
    return RunConfig(model=ModelConfig.preset("tiny").replace(vocab_size=512), train=train)


def experiment_run() -> RunConfig:
    """The base run of `moekit experiment`, sized by tokens per parameter rather than by
    parameters (issue 14): 2 layers of width 64 with 2 heads, 8 experts of 128 top-2 (active
    width 256; 263K active parameters with the 2048-token BPE's tied embeddings), 16 x 128 tokens
    a step. Each experiment sets its own train.steps (2,600 steps: 20 tokens per active
    parameter, where a model is held back by its capacity and not only by optimisation). One
    final checkpoint per arm: the report measures its router logits."""
    moe = MoEConfig(d_model=64, d_expert=128, n_experts=8, top_k=2, aux_loss_coef=0.01)
    model = ModelConfig(vocab_size=2048, d_model=64, n_layers=2, n_heads=2, d_ff=256, moe=moe,
                        max_seq_len=128, tie_embeddings=True)  # fmt: skip
    train = TrainConfig(
        steps=2600,
        batch_size=16,
        seq_len=128,
        warmup_steps=30,
        log_every=50,
        tensorboard=False,
        eval=EvalConfig(every=200, batches=4),
        checkpoint=CheckpointConfig(every=0, keep=1),
    )
    return RunConfig(model=model, train=train)


def demo_run() -> RunConfig:
    """The run `moekit demo` trains beside its dense twin, sized for the compute 2 CPU cores give
    in minutes rather than for its parameters: the `experiment` run with 32 experts of 128 top-2
    (active width 256; 1.74M parameters, 267K active with the embeddings), for 4,000 steps of
    16 x 128 tokens: 31 tokens per active parameter, where a model is held back by its capacity,
    which is what experts add."""
    base = experiment_run()
    assert base.model.moe is not None
    model = base.model.replace(d_ff=None, moe=base.model.moe.replace(n_experts=32))
    return RunConfig(model=model, train=base.train.replace(steps=4000))


RUN_PRESETS: dict[str, typing.Callable[[], RunConfig]] = {
    "tiny": tiny_run,
    "experiment": experiment_run,
    "demo": demo_run,
}


__all__ += ["CheckpointConfig", "DataConfig", "EvalConfig", "RunConfig", "TrainConfig"]
__all__ += ["RUN_PRESETS", "ParallelConfig", "dense_twin"]
