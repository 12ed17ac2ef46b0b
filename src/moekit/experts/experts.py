"""Stacked expert weights and their grouped feed-forward compute."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from moekit import moe_kernels
from moekit.config import MoEConfig
from moekit.experts.grouped import grouped_matmul


def activate(h_RH: Tensor, activation: str, alpha: float = 1.702, limit: float = 7.0) -> Tensor:
    """Hidden activation. For "swiglu" h is [gate | up] (R, 2F) -> silu(gate) * up (R, F).

    "clamped_swiglu" (GPT-OSS; OpenAI 2025, gpt-oss model card) clamps gate above at `limit` and
    up to [-limit, limit], then gate * sigmoid(alpha * gate) * (up + 1).
    The readable definition; `Experts` runs swiglu through the fused `swiglu` below."""
    if activation == "swiglu":
        gate, up = h_RH.chunk(2, dim=-1)
        return F.silu(gate) * up
    if activation == "clamped_swiglu":
        gate, up = h_RH.chunk(2, dim=-1)
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
        return gate * torch.sigmoid(gate * alpha) * (up + 1)
    if activation == "gelu":
        return F.gelu(h_RH)
    return F.relu(h_RH)


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up saving only h = [gate | up] for the backward (silu(gate) is recomputed
    there), which writes d[gate | up] straight into one (R, 2F) tensor: no concatenation of the
    halves' gradients. On CPU float32 each pass is one C kernel call (`moekit.moe_kernels`); these
    torch operators are its reference and run everywhere else."""

    @staticmethod
    def forward(ctx, h_RH: Tensor) -> Tensor:
        ctx.save_for_backward(h_RH)
        return _swiglu_values(h_RH)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_RF: Tensor) -> Tensor:
        (h_RH,) = ctx.saved_tensors
        grad_RF = grad_RF.contiguous()
        if moe_kernels.usable(h_RH, grad_RF):
            return moe_kernels.swiglu_backward(h_RH, grad_RF)
        gate, up = h_RH.chunk(2, dim=-1)
        grad_h = torch.empty_like(h_RH)
        grad_gate, grad_up = grad_h.chunk(2, dim=-1)
        torch.mul(F.silu(gate), grad_RF, out=grad_up)
        torch.ops.aten.silu_backward.grad_input(grad_RF * up, gate, grad_input=grad_gate)
        return grad_h


def swiglu(h_RH: Tensor) -> Tensor:
    """Fused silu(gate) * up for h = [gate | up] (R, 2F) -> (R, F); twin of `activate`. Without
    a gradient to record (generation) no autograd Function is built: ~8 us less a call. While
    torch.compile traces, the plain formula, which it fuses itself (the Function's backward
    writes into halves of one tensor, which Dynamo cannot trace: the forward ran eagerly)."""
    if torch.compiler.is_compiling():
        return activate(h_RH, "swiglu")
    if torch.is_grad_enabled() and h_RH.requires_grad:
        return _SwiGLU.apply(h_RH)
    return _swiglu_values(h_RH)


def _swiglu_values(h_RH: Tensor) -> Tensor:
    if moe_kernels.usable(h_RH):
        return moe_kernels.swiglu_forward(h_RH)
    gate, up = h_RH.chunk(2, dim=-1)
    return F.silu(gate) * up


def activate_fast(h_RH: Tensor, activation: str, alpha: float = 1.702, limit: float = 7.0):
    """`activate`, with swiglu run by the fused `swiglu` (one C call per pass on CPU float32)."""
    if activation == "swiglu":
        return swiglu(h_RH)
    return activate(h_RH, activation, alpha, limit)


def expert_ffn(
    x_ND: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    b_in: Tensor | None,
    b_out: Tensor | None,
    cfg: MoEConfig,
    linear: Callable[..., Tensor] = F.linear,
    activation: Callable[..., Tensor] = activate,
) -> Tensor:
    """One expert on N rows: x (N, D), w_in (2F|F, D), w_out (D, F) in nn.Linear layout -> (N, D).
    The decode path's expert (`Experts.expert_ffn`), in the resident and the offloaded experts;
    `linear` runs its two products and `activation` (`activate`'s arguments) its activation (the
    decode kernels pass theirs)."""
    h_NH = linear(x_ND, w_in, b_in)
    act_NF = activation(h_NH, cfg.activation, cfg.swiglu_alpha, cfg.swiglu_limit)
    return linear(act_NF, w_out, b_out)


def grouped_experts_forward(
    x_RD: Tensor,
    counts_E: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    b_in: Tensor | None,
    b_out: Tensor | None,
    cfg: MoEConfig,
) -> Tensor:
    """E experts over expert-sorted rows, their weights given: x_RD (R, D), counts_E (E,) rows
    per expert, w_in (E, 2F|F, D), w_out (E, D, F), b_in (E, 2F|F), b_out (E, D) -> y_RD (R, D).
    `Experts.forward` on its own weights; `OffloadedExperts` on the weights of each group of
    experts it fetched (E is then the group's size)."""
    matmul = grouped_matmul(cfg.expert_impl, x_RD, w_out)
    h = matmul(x_RD, w_in, counts_E)
    if b_in is not None:
        h = h + torch.repeat_interleave(b_in, counts_E, dim=0, output_size=x_RD.shape[0])
    act = activate_fast(h, cfg.activation, cfg.swiglu_alpha, cfg.swiglu_limit)
    y = matmul(act, w_out, counts_E)
    if b_out is not None:
        y = y + torch.repeat_interleave(b_out, counts_E, dim=0, output_size=x_RD.shape[0])
    return y


def selected_experts_forward(
    x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor, expert: Callable[[int, Tensor], Tensor]
) -> Tensor:
    """The decode path: y_TD[t] = sum_k weights_TK[t, k] * expert(ids_TK[t, k], x_TD[t]).

    Each expert some token chose runs once, on the rows that chose it (all T rows need no
    gather); no other expert's weights are read. Like transformers' eager MoE, and unlike the
    sorted dispatch that large batches need, there is no sort, no per-expert count and no grouped
    GEMM over all E groups. Products and sums are those of `combine`, in its order (increasing
    expert), accumulated in float32. x_TD (T, D), ids_TK and weights_TK (T, K) -> (T, D).
    """
    T = x_TD.shape[0]
    acc = torch.promote_types(x_TD.dtype, weights_TK.dtype)
    if T == 1:
        # One token (batch-1 decoding): every chosen expert runs on the only row, so there is
        # nothing to gather, scatter or index; the same products summed in the same order
        # (increasing expert, from zero) as below. Tested against it (test_decode_fast_paths).
        ids_K = ids_TK[0].tolist()  # the one host sync
        order = sorted(range(len(ids_K)), key=ids_K.__getitem__)
        y_TD = expert(ids_K[order[0]], x_TD) * weights_TK[:, order[0], None]  # = 0 + it
        for k in order[1:]:
            y_TD += expert(ids_K[k], x_TD) * weights_TK[:, k, None]
        return y_TD.to(x_TD.dtype)
    rows: dict[int, list[int]] = {}
    for t, row in enumerate(ids_TK.tolist()):  # the one host sync: which experts run
        for e in row:
            rows.setdefault(e, []).append(t)
    w_TE = weights_TK.new_zeros(T, max(rows) + 1).scatter_(1, ids_TK, weights_TK)
    grad = torch.is_grad_enabled() and (x_TD.requires_grad or weights_TK.requires_grad)
    if not grad and moe_kernels.rows_usable(ids_TK, x_TD, weights_TK):
        return _combine_selected_in_c(x_TD, rows, w_TE, expert)
    y_TD = x_TD.new_zeros(x_TD.shape, dtype=acc)
    for e in sorted(rows):
        if len(rows[e]) == T:
            y_TD += expert(e, x_TD) * w_TE[:, e, None]
        else:
            t_N = torch.tensor(rows[e], device=x_TD.device)
            y_ND = expert(e, x_TD.index_select(0, t_N))
            y_TD.index_add_(0, t_N, y_ND * w_TE.index_select(0, t_N)[:, e, None])
    return y_TD.to(x_TD.dtype)


def _combine_selected_in_c(
    x_TD: Tensor, rows: dict[int, list[int]], w_TE: Tensor, expert: Callable[[int, Tensor], Tensor]
) -> Tensor:
    """`selected_experts_forward`'s loop on CPU float32 without gradients: each expert's rows,
    expert after expert, then one C combine (each token's rows weighted and summed in increasing
    expert order from zero: the loop's numbers), where an `index_add_` per expert opened an
    OpenMP region each (~8 us, ~50 under OMP_WAIT_POLICY=PASSIVE)."""
    T, order = x_TD.shape[0], sorted(rows)
    t_R = torch.tensor([t for e in order for t in rows[e]])
    e_R = torch.tensor([e for e in order for _ in rows[e]])
    ys, start = [], 0
    for e in order:
        n = len(rows[e])
        ys.append(expert(e, x_TD if n == T else x_TD.index_select(0, t_R[start : start + n])))
        start += n
    y_RD, w_R = torch.cat(ys), w_TE[t_R, e_R].contiguous()
    if moe_kernels.rows_usable(t_R, y_RD, w_R):
        return moe_kernels.scatter_rows(y_RD, w_R, t_R, T)
    y_TD = x_TD.new_zeros(x_TD.shape, dtype=torch.promote_types(y_RD.dtype, w_R.dtype))
    return y_TD.index_add_(0, t_R, y_RD * w_R[:, None]).to(x_TD.dtype)  # experts not in float32


class Experts(nn.Module):
    """E feed-forward experts with stacked weights, computed over expert-sorted rows.

    w_in: (E, 2F, D) for swiglu ([w_gate; w_up] stacked on the output axis) or (E, F, D);
    w_out: (E, D, F). Both in nn.Linear (out, in) layout (as transformers' gate_up_proj and
    down_proj). Optional biases b_in (E, 2F|F), b_out (E, D).
    """

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        E, F_, D = cfg.n_experts, cfg.d_expert, cfg.d_model
        n_in = 2 if cfg.gated else 1
        self.w_in = nn.Parameter(torch.empty(E, n_in * F_, D))
        self.w_out = nn.Parameter(torch.empty(E, D, F_))
        self.b_in = nn.Parameter(torch.empty(E, n_in * F_)) if cfg.expert_bias else None
        self.b_out = nn.Parameter(torch.empty(E, D)) if cfg.expert_bias else None
        # One expert on the decode path; moekit.inference.decode_kernels swaps in a fused kernel.
        self.expert_ffn: Callable[..., Tensor] = expert_ffn
        self.init_weights()

    def init_weights(self, std: float = 0.02, out_std: float | None = None) -> None:
        nn.init.normal_(self.w_in, std=std)
        nn.init.normal_(self.w_out, std=std if out_std is None else out_std)
        for b in (self.b_in, self.b_out):
            if b is not None:
                nn.init.zeros_(b)

    def expert_weights(self, e: int) -> tuple[Tensor | None, Tensor, Tensor]:
        """Expert e's (w_gate (F, D) or None if ungated, w_up (F, D), w_down (D, F))."""
        if self.cfg.gated:
            w_gate, w_up = self.w_in[e].chunk(2, dim=0)
            return w_gate, w_up, self.w_out[e]
        return None, self.w_in[e], self.w_out[e]

    def forward(self, x_RD: Tensor, counts_E: Tensor) -> Tensor:
        """x_RD (R, D) rows sorted by expert, counts_E (E,) rows per expert -> y_RD (R, D)."""
        return grouped_experts_forward(
            x_RD, counts_E, self.w_in, self.w_out, self.b_in, self.b_out, self.cfg
        )

    def forward_selected(self, x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor) -> Tensor:
        """The decode path (`MoELayer.selected_path`): x_TD (T, D), ids_TK and weights_TK (T, K)
        -> y_TD (T, D), running only the chosen experts (`selected_experts_forward`). `forward`
        with the dropless dispatch is its reference."""

        def expert(e: int, x_ND: Tensor) -> Tensor:
            b_in = None if self.b_in is None else self.b_in[e]
            b_out = None if self.b_out is None else self.b_out[e]
            return self.expert_ffn(x_ND, self.w_in[e], self.w_out[e], b_in, b_out, self.cfg)

        return selected_experts_forward(x_TD, ids_TK, weights_TK, expert)

    def extra_repr(self) -> str:
        c = self.cfg
        return f"experts={c.n_experts}, d_model={c.d_model}, d_expert={c.d_expert}, {c.activation}"


class SharedExperts(nn.Module):
    """The always-on experts, fused into one dense FFN of width `cfg.shared_width`, optionally
    scaled by sigmoid(x @ w_gate.T) (Qwen2-MoE's shared-expert gate)."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.activation = (cfg.activation, cfg.swiglu_alpha, cfg.swiglu_limit)
        n_in = 2 if cfg.gated else 1
        self.w_in = nn.Linear(cfg.d_model, n_in * cfg.shared_width, bias=cfg.expert_bias)
        self.w_out = nn.Linear(cfg.shared_width, cfg.d_model, bias=cfg.expert_bias)
        self.gate = nn.Linear(cfg.d_model, 1, bias=False) if cfg.shared_gate else None
        self.init_weights()

    def init_weights(self, std: float = 0.02, out_std: float | None = None) -> None:
        nn.init.normal_(self.w_in.weight, std=std)
        nn.init.normal_(self.w_out.weight, std=std if out_std is None else out_std)
        for lin in (self.w_in, self.w_out):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        if self.gate is not None:
            nn.init.normal_(self.gate.weight, std=std)

    def forward(self, x_TD: Tensor) -> Tensor:
        y = self.w_out(activate_fast(self.w_in(x_TD), *self.activation))
        if self.gate is not None:
            y = y * torch.sigmoid(self.gate(x_TD))
        return y
