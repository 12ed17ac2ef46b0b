"""Combine: y_TD[t] = sum over the rows r of token t of weights_R[r] * y_RD[r].

`scatter_weighted` is the fast path, an autograd function that works through the rows in chunks so
that no (R, D) temporary is allocated in the forward pass, and only the (R, D) gradient itself in
the backward pass (on CPU, fresh multi-MB allocations page-fault and cost as much as the
arithmetic); on CPU float32 each pass is one C call (`moekit.moe_kernels`, the same sums in the
same order). `scatter_weighted_reference` is its readable twin. Rows are summed with `index_add_`,
which is deterministic on CPU; on CUDA its atomics make the order of the K additions per token
vary between runs (differences at rounding level).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from moekit import moe_kernels

CHUNK_ROWS = 4096


def scatter_weighted_reference(
    y_RD: Tensor, weights_R: Tensor, token_R: Tensor, n_tokens: int
) -> Tensor:
    """Readable twin: one weighted (R, D) product, then a scatter-add into (T, D)."""
    weighted_RD = y_RD * weights_R.unsqueeze(1)
    out = weighted_RD.new_zeros(n_tokens, y_RD.shape[1])
    return out.index_add(0, token_R, weighted_RD).to(y_RD.dtype)


class _ScatterWeighted(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_RD: Tensor, weights_R: Tensor, token_R: Tensor, n_tokens: int) -> Tensor:
        ctx.save_for_backward(y_RD, weights_R, token_R)
        ctx.kernel = moe_kernels.rows_usable(token_R, y_RD, weights_R)
        if ctx.kernel:  # the loop below in one C pass, bit for bit
            return moe_kernels.scatter_rows(y_RD, weights_R, token_R, n_tokens)
        acc_dtype = torch.promote_types(y_RD.dtype, weights_R.dtype)
        out = y_RD.new_zeros(n_tokens, y_RD.shape[1], dtype=acc_dtype)
        for s in range(0, y_RD.shape[0], CHUNK_ROWS):
            rows = slice(s, s + CHUNK_ROWS)
            out.index_add_(0, token_R[rows], y_RD[rows] * weights_R[rows, None])
        return out.to(y_RD.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_TD: Tensor):
        y_RD, weights_R, token_R = ctx.saved_tensors
        if ctx.kernel:  # the weights' dots only where their gradient is needed
            y = y_RD if ctx.needs_input_grad[1] else None
            grad_y, grad_w = moe_kernels.scaled_rows(grad_TD.contiguous(), token_R, weights_R, y)
            return grad_y, grad_w, None, None
        grad_y = torch.empty_like(y_RD) if ctx.needs_input_grad[0] else None
        grad_w = torch.empty_like(weights_R) if ctx.needs_input_grad[1] else None
        for s in range(0, y_RD.shape[0], CHUNK_ROWS):
            rows = slice(s, s + CHUNK_ROWS)
            g_rows = grad_TD.index_select(0, token_R[rows])
            if grad_y is not None:
                torch.mul(g_rows, weights_R[rows, None].to(g_rows.dtype), out=grad_y[rows])
            if grad_w is not None:
                y_rows = y_RD[rows].to(weights_R.dtype)
                grad_w[rows] = torch.linalg.vecdot(g_rows.to(weights_R.dtype), y_rows)
        return grad_y, grad_w, None, None


def scatter_weighted(y_RD: Tensor, weights_R: Tensor, token_R: Tensor, n_tokens: int) -> Tensor:
    """y_RD (R, D) expert outputs, weights_R (R,), token_R (R,) -> y_TD (T, D) in y's dtype."""
    return _ScatterWeighted.apply(y_RD, weights_R, token_R, n_tokens)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD: Tensor, token_R: Tensor) -> Tensor:
        ctx.save_for_backward(token_R)
        ctx.n_tokens = x_TD.shape[0]
        return x_TD.index_select(0, token_R)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_RD: Tensor):
        (token_R,) = ctx.saved_tensors
        if moe_kernels.rows_usable(token_R, grad_RD):
            return moe_kernels.scatter_rows(grad_RD, None, token_R, ctx.n_tokens), None
        grad_TD = grad_RD.new_zeros(ctx.n_tokens, grad_RD.shape[1])
        return grad_TD.index_add_(0, token_R, grad_RD), None


def gather_rows(x_TD: Tensor, token_R: Tensor) -> Tensor:
    """The dispatch's gather: x_TD (T, D), token_R (R,) -> x_TD[token_R] (R, D). Its backward sums
    each token's rows in row order: `index_select`'s own, in one C pass on CPU float32."""
    return _GatherRows.apply(x_TD, token_R)
