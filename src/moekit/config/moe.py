"""`MoEConfig`: one Mixture-of-Experts feed-forward layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from moekit.config.base import ConfigBase
from moekit.config.rules import NonNegFloat, NonNegInt, invalid


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
    activation: Literal["swiglu", "gelu", "relu", "clamped_swiglu"] = "swiglu"
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    expert_bias: bool = False
    n_shared_experts: NonNegInt = 0
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
    aux_loss_coef: NonNegFloat = 0.0
    aux_loss_scope: Literal["batch", "sequence"] = "batch"
    z_loss_coef: NonNegFloat = 0.0
    importance_loss_coef: NonNegFloat = 0.0
    load_loss_coef: NonNegFloat = 0.0
    bias_update_rate: NonNegFloat = 0.0
    expert_impl: Literal["auto", "grouped_mm", "loop", "reference"] = "auto"

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

    def check(self) -> None:
        if self.top_k > self.n_experts:
            raise invalid("top_k", self.top_k, f"must be <= n_experts ({self.n_experts})")
        for name in ("d_shared", "shared_gate"):
            if getattr(self, name) not in (None, False) and self.n_shared_experts == 0:
                raise invalid(name, getattr(self, name), "needs n_shared_experts >= 1")
        if self.noise == "jitter" and self.noise_eps >= 1:
            raise invalid("noise_eps", self.noise_eps, "jitter needs 0 < noise_eps < 1")
        self._check_groups()
        if self.router != "topk":
            self._check_simple_router()
        load = self.load_loss_coef
        if load > 0 and self.noise != "gaussian":
            raise invalid("load_loss_coef", load, "the load loss needs noise='gaussian'")
        if load > 0 and self.top_k == self.n_experts:
            raise invalid("load_loss_coef", load, "the load loss needs top_k < n_experts")

    def _check_groups(self) -> None:
        if self.n_experts % self.n_groups != 0:
            raise invalid("n_groups", self.n_groups, f"must divide n_experts ({self.n_experts})")
        if self.topk_groups > self.n_groups:
            raise invalid("topk_groups", self.topk_groups, f"must be <= n_groups ({self.n_groups})")
        reachable = self.topk_groups * (self.n_experts // self.n_groups)
        if self.top_k > reachable:
            rule = f"must be <= topk_groups * experts per group ({reachable})"
            raise invalid("top_k", self.top_k, rule)

    def _check_simple_router(self) -> None:
        """Options that only token-choice top-k routing can use."""
        who = f"router={self.router!r}"
        if self.n_groups > 1:
            rule = f"group-limited routing needs router='topk', not {who}"
            raise invalid("n_groups", self.n_groups, rule)
        if self.noise is not None:
            raise invalid("noise", self.noise, f"noise needs router='topk', not {who}")
        if self.bias_update_rate > 0:
            rule = f"needs router='topk'; {who} has no bias"
            raise invalid("bias_update_rate", self.bias_update_rate, rule)
        if self.overflow != "drop":
            raise invalid("overflow", self.overflow, f"needs router='topk', not {who}")
        if self.router == "hash":  # fixed routing: the balance losses are constants, allowed
            return
        if self.capacity_factor is None:
            rule = "router='expert_choice' needs a capacity (e.g. 1.0)"
            raise invalid("capacity_factor", None, rule)
        for name in ("aux_loss_coef", "importance_loss_coef", "load_loss_coef"):
            if getattr(self, name) > 0:
                rule = f"token-balance losses need router='topk', not {who}"
                raise invalid(name, getattr(self, name), rule)
