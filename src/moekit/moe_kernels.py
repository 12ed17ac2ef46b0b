"""C kernels for the MoE layer's training path on CPU: SwiGLU forward and backward over the
experts' [gate | up] rows, top-k expert ids, a counting sort by expert, the combine's weighted
scatter of rows and its backward (a weighted gather), which also serves as the backward of the
dispatch's gather (`index_select`, whose own forward is fast). torch's operators are their
reference and their fallback (tests/test_moe_kernels.py holds each kernel to them).

Why (benchmarks/README.md, Fine-grained experts at speed): an MoE layer works on T * k rows of a
few numbers each. At the demo's width with 64 experts of 32 (top-7), torch's silu, its backward
and the products on the strided 32-wide halves of the (T * k, 64) hidden tensor took 2.9 ms of a
23 ms layer forward+backward, and `topk` over (2048, 64) scores 1.7 ms: ~0.8 us a row for what is
one pass over 64 numbers.

The kernels are `torch.library` ops (`moekit::swiglu_fwd`, ...), called directly in eager mode
and through the op when a profiler records, so it lists them by name (`moekit.cbuild.call`).
They run where `usable` / `rows_usable` say (plain CPU float32 contiguous tensors, int64 indices,
the library built, not while `torch.compile` traces: Dynamo cannot trace their checks, so a
compiled model runs torch's operators); anything else (CUDA, bf16, float64 for gradcheck,
DTensors, no compiler, MOEKIT_NO_KERNELS=1) runs torch's operators. Their backwards are
`once_differentiable`: a double backward through them raises instead of silently detaching.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
from torch import Tensor

from moekit import cbuild

SOURCE = Path(__file__).with_name("moe_kernels.c")
MAX_TOPK, MAX_TOPK_EXPERTS = 64, 1024  # moe_kernels.c's limits

_ops = torch.library.Library("moekit", "FRAGMENT")
_ops.define("swiglu_fwd(Tensor h) -> Tensor")
_ops.define("swiglu_bwd(Tensor h, Tensor grad) -> Tensor")
_ops.define("topk_ids(Tensor scores, int k) -> Tensor")
_ops.define("scatter_rows(Tensor y, Tensor? weights, Tensor token, int n_tokens) -> Tensor")
_ops.define("scaled_rows(Tensor x, Tensor token, Tensor? weights, Tensor? y) -> Tensor[]")
_ops.define("sort_by_expert(Tensor ids, int n_experts) -> Tensor[]")


# Below this many numbers in their first tensor the SwiGLU and top-k ops leave the work to torch:
# a kernel call through ctypes costs ~5 us more than an operator's (top-k ids of (1, 64) scores:
# 8.4 us against 3.1; about even at (64, 64), and SwiGLU at 4,096 numbers), which decoding and
# small prefills would pay. The ops over rows win at every size (a sort of 128 expert ids 6 us
# against argsort's 30, a combine of 1,024 numbers 6 against 16).
MIN_NUMBERS = 8192


def usable(*tensors: Tensor) -> bool:
    """Whether the SwiGLU and top-k kernels run on these tensors: plain contiguous CPU float32,
    the first of at least MIN_NUMBERS numbers, the library built, not compiling."""
    return tensors[0].numel() >= MIN_NUMBERS and _plain(tensors)


def rows_usable(token_R: Tensor, *tensors: Tensor | None) -> bool:
    """Whether `scatter_rows` / `scaled_rows` / `sort_by_expert` run the kernels: a contiguous
    int64 CPU index and plain contiguous CPU float32 tensors (None skipped), any size."""
    floats = tuple(t for t in tensors if t is not None)
    return cbuild.plain_contiguous(token_R, torch.int64) and _plain(floats)


def _plain(floats: tuple[Tensor, ...]) -> bool:
    return (
        not torch.compiler.is_compiling()
        and all(cbuild.plain_contiguous(t, torch.float32) for t in floats)
        and _library() is not None
    )


def swiglu_forward(h_RH: Tensor) -> Tensor:
    """silu(gate) * up for h = [gate | up] (R, 2F), contiguous float32 on CPU -> (R, F)."""
    return cbuild.call(_swiglu_fwd_cpu, torch.ops.moekit.swiglu_fwd.default, h_RH)


def swiglu_backward(h_RH: Tensor, grad_RF: Tensor) -> Tensor:
    """The gradient (R, 2F) of `swiglu_forward` at h (R, 2F), given grad (R, F)."""
    return cbuild.call(_swiglu_bwd_cpu, torch.ops.moekit.swiglu_bwd.default, h_RH, grad_RF)


def topk_ids(scores_TE: Tensor, k: int) -> Tensor:
    """(T, k) int64: each row's k largest scores' ids, largest first; `scores.topk(k).indices`
    where the kernel does not apply (see `usable`; k up to MAX_TOPK, E up to MAX_TOPK_EXPERTS).
    NaN ranks highest, as in torch.topk (a NaN router row still reaches the loss), -inf as the
    lowest finite number. Equal scores: the lower id first; torch.topk does not say which, so
    ties may be broken apart between batches above and below MIN_NUMBERS."""
    fits = scores_TE.dim() == 2 and 1 <= k <= min(MAX_TOPK, scores_TE.shape[1])
    fits = fits and scores_TE.shape[1] <= MAX_TOPK_EXPERTS and not scores_TE.requires_grad
    if not (fits and usable(scores_TE)):
        return scores_TE.topk(k, dim=-1).indices
    return cbuild.call(_topk_ids_cpu, torch.ops.moekit.topk_ids.default, scores_TE, k)


def scatter_rows(y_RD: Tensor, weights_R: Tensor | None, token_R: Tensor, n_tokens: int) -> Tensor:
    """(n_tokens, D): row t the sum, in row order, of weights_R[r] * y_RD[r] over the rows r of
    token t (weights None: of y_RD[r]); `zeros.index_add_(0, token_R, y_RD * weights_R[:, None])`
    bit for bit. Tensors as `rows_usable` says; a token id outside 0..n_tokens-1 raises."""
    op = torch.ops.moekit.scatter_rows.default
    return cbuild.call(_scatter_rows_cpu, op, y_RD, weights_R, token_R, n_tokens)


def scaled_rows(
    x_TD: Tensor, token_R: Tensor, weights_R: Tensor | None = None, y_RD: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """(R, D): row r = weights_R[r] * x_TD[token_R[r]] (weights None: the row itself); and, given
    y_RD (R, D), the (R,) dots[r] = x_TD[token_R[r]] . y_RD[r] in the same pass (else None): the
    backward of `scatter_rows` for y and for the weights."""
    op = torch.ops.moekit.scaled_rows.default
    out = cbuild.call(_scaled_rows_cpu, op, x_TD, token_R, weights_R, y_RD)
    return out[0], out[1] if y_RD is not None else None


def sort_by_expert(ids_R: Tensor, n_experts: int) -> tuple[Tensor, Tensor]:
    """(order_R, counts_E) of R expert ids in -1..E-1 (-1: dropped): `argsort(ids, stable=True)`
    and each expert's count, by a counting sort. ids_R contiguous int64 on CPU."""
    op = torch.ops.moekit.sort_by_expert.default
    return tuple(cbuild.call(_sort_by_expert_cpu, op, ids_R, n_experts))


def _sort_by_expert_cpu(ids_R: Tensor, n_experts: int) -> list[Tensor]:
    order_R = torch.empty_like(ids_R)
    counts_E = ids_R.new_empty(n_experts)
    status = _library().moekit_sort_by_expert(
        ids_R.data_ptr(), ids_R.shape[0], n_experts, order_R.data_ptr(), counts_E.data_ptr()
    )
    if status != 0:
        raise ValueError(f"sort_by_expert: expert ids must lie in -1..{n_experts - 1}")
    return [order_R, counts_E]


def _scatter_rows_cpu(
    y_RD: Tensor, weights_R: Tensor | None, token_R: Tensor, n_tokens: int
) -> Tensor:
    R, D = y_RD.shape
    out_TD = y_RD.new_empty(n_tokens, D)
    w = cbuild.optional_ptr(weights_R)
    status = _library().moekit_scatter_rows(
        y_RD.data_ptr(), w, token_R.data_ptr(), R, D, n_tokens, out_TD.data_ptr()
    )
    _check_tokens(status, n_tokens)
    return out_TD


def _scaled_rows_cpu(
    x_TD: Tensor, token_R: Tensor, weights_R: Tensor | None, y_RD: Tensor | None
) -> list[Tensor]:
    R, D = token_R.shape[0], x_TD.shape[1]
    out = [x_TD.new_empty(R, D)] + ([] if y_RD is None else [x_TD.new_empty(R)])
    dots = out[1] if y_RD is not None else None
    w, y, dots = (cbuild.optional_ptr(t) for t in (weights_R, y_RD, dots))
    status = _library().moekit_scaled_rows(
        x_TD.data_ptr(), x_TD.shape[0], token_R.data_ptr(), w, R, D, out[0].data_ptr(), y, dots
    )
    _check_tokens(status, x_TD.shape[0])
    return out


def _check_tokens(status: int, n_tokens: int) -> None:
    if status != 0:
        raise IndexError(f"a token id lies outside 0..{n_tokens - 1} (the rows' token index)")


def _swiglu_fwd_cpu(h_RH: Tensor) -> Tensor:
    R, H = h_RH.shape
    act_RF = h_RH.new_empty(R, H // 2)
    _library().moekit_swiglu_fwd(h_RH.data_ptr(), H, R, H // 2, act_RF.data_ptr())
    return act_RF


def _swiglu_bwd_cpu(h_RH: Tensor, grad_RF: Tensor) -> Tensor:
    R, H = h_RH.shape
    grad_RH = torch.empty_like(h_RH)
    _library().moekit_swiglu_bwd(
        h_RH.data_ptr(), H, grad_RF.data_ptr(), R, H // 2, grad_RH.data_ptr()
    )
    return grad_RH


def _topk_ids_cpu(scores_TE: Tensor, k: int) -> Tensor:
    T, E = scores_TE.shape
    ids_TK = torch.empty(T, k, dtype=torch.int64, device=scores_TE.device)
    if _library().moekit_topk_ids(scores_TE.data_ptr(), T, E, k, ids_TK.data_ptr()) != 0:
        raise ValueError(
            f"topk_ids: k={k} must be in 1..min(E={E}, {MAX_TOPK}), E at most {MAX_TOPK_EXPERTS}"
        )
    return ids_TK


_ops.impl("swiglu_fwd", _swiglu_fwd_cpu, "CPU")
_ops.impl("swiglu_bwd", _swiglu_bwd_cpu, "CPU")
_ops.impl("topk_ids", _topk_ids_cpu, "CPU")
_ops.impl("scatter_rows", _scatter_rows_cpu, "CPU")
_ops.impl("scaled_rows", _scaled_rows_cpu, "CPU")
_ops.impl("sort_by_expert", _sort_by_expert_cpu, "CPU")


@torch.library.register_fake("moekit::swiglu_fwd")
def _swiglu_fwd_fake(h_RH: Tensor) -> Tensor:
    return h_RH.new_empty(h_RH.shape[0], h_RH.shape[1] // 2)


@torch.library.register_fake("moekit::swiglu_bwd")
def _swiglu_bwd_fake(h_RH: Tensor, grad_RF: Tensor) -> Tensor:
    return torch.empty_like(h_RH)


@torch.library.register_fake("moekit::topk_ids")
def _topk_ids_fake(scores_TE: Tensor, k: int) -> Tensor:
    return scores_TE.new_empty(scores_TE.shape[0], k, dtype=torch.int64)


@torch.library.register_fake("moekit::scatter_rows")
def _scatter_rows_fake(y_RD: Tensor, weights_R, token_R: Tensor, n_tokens: int) -> Tensor:
    return y_RD.new_empty(n_tokens, y_RD.shape[1])


@torch.library.register_fake("moekit::scaled_rows")
def _scaled_rows_fake(x_TD: Tensor, token_R: Tensor, weights_R, y_RD) -> list:
    out = [x_TD.new_empty(token_R.shape[0], x_TD.shape[1])]
    return out if y_RD is None else [*out, x_TD.new_empty(token_R.shape[0])]


@torch.library.register_fake("moekit::sort_by_expert")
def _sort_by_expert_fake(ids_R: Tensor, n_experts: int) -> list:
    return [torch.empty_like(ids_R), ids_R.new_empty(n_experts)]


@functools.cache
def _library() -> ctypes.CDLL | None:
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    return cbuild.load(
        SOURCE,
        {
            "moekit_swiglu_fwd": ([ptr, i64, i64, i64, ptr], None),
            "moekit_swiglu_bwd": ([ptr, i64, ptr, i64, i64, ptr], None),
            "moekit_topk_ids": ([ptr, i64, i64, i64, ptr], ctypes.c_int),
            "moekit_scatter_rows": ([ptr, ptr, ptr, i64, i64, i64, ptr], ctypes.c_int),
            "moekit_scaled_rows": ([ptr, i64, ptr, ptr, i64, i64, ptr, ptr, ptr], ctypes.c_int),
            "moekit_sort_by_expert": ([ptr, i64, i64, ptr, ptr], ctypes.c_int),
        },
        "MoE training kernels",
        "torch's operators run",
        cbuild.EXACT_FLAGS,  # the combine rounds as index_add_ does
    )
