"""The dispatcher interface: permute routed rows to experts and back. Dispatchers hold no
parameters; the same two methods serve dropless, capacity and (later) all-to-all dispatch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from moekit.routing.base import Routing


@dataclass
class DispatchState:
    """What `combine` needs to undo `dispatch`.

    slot_R: (R,) for each expert-sorted row, its flat assignment index t * K + k (token choice) or
        its token (expert choice).
    weights_TK: (T, K) combine weights after capacity (dropped assignments are 0), or for expert
        choice the gates per row (R,).
    ids_TK: (T, K) the expert each assignment ended on (after any next-best move), -1 if dropped.
    n_tokens: T.
    """

    slot_R: Tensor
    weights_TK: Tensor
    ids_TK: Tensor | None
    n_tokens: int


class Dispatcher(Protocol):
    def dispatch(self, x_TD: Tensor, routing: Routing) -> tuple[Tensor, Tensor, DispatchState]:
        """x_TD (T, D) -> (x_RD expert-sorted rows, counts_E rows per expert, state)."""
        ...

    def combine(self, y_RD: Tensor, state: DispatchState) -> Tensor:
        """y_RD (R, D) expert outputs -> y_TD (T, D) weighted sum per token."""
        ...


def sort_by_expert(ids_R: Tensor, n_experts: int) -> tuple[Tensor, Tensor]:
    """Stable sort of assignments by expert: (order_R, counts_E).

    `order_R[i]` is the assignment that lands in row i; rows of one expert keep their input order.
    """
    order_R = torch.argsort(ids_R, stable=True)
    counts_E = torch.bincount(ids_R, minlength=n_experts)
    return order_R, counts_E


def weighted_sum_by_token(y_RD: Tensor, state: DispatchState) -> Tensor:
    """Token-choice combine: y_TD[t] = sum_k weights_TK[t, k] * y[row of (t, k)].

    Rows are put back in (T, K) order (zeros where an assignment was dropped) and reduced with one
    batched matmul, so no scatter-add over D is needed.
    """
    T, K = state.weights_TK.shape
    dropless = y_RD.shape[0] == T * K
    y_flat = (y_RD.new_empty if dropless else y_RD.new_zeros)(T * K, y_RD.shape[1])
    y_flat.index_copy_(0, state.slot_R, y_RD)
    w_T1K = state.weights_TK.to(y_RD.dtype).unsqueeze(1)
    return torch.bmm(w_T1K, y_flat.view(T, K, -1)).squeeze(1)
