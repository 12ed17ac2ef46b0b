"""The dispatcher interface: permute routed rows to experts and back. Dispatchers hold no
parameters; the same two methods serve dropless, capacity and (later) all-to-all dispatch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from moekit import losses, moe_kernels
from moekit.dispatch.combine import scatter_weighted
from moekit.routing.base import Routing


@dataclass
class DispatchState:
    """What `combine` needs to undo `dispatch`, plus the final routing for the layer's metrics.

    token_R: (R,) the token each expert-sorted row belongs to.
    weights_R: (R,) each row's combine weight (float32, differentiable).
    ids_TK, weights_TK: (T, K) the expert each assignment ended on (-1 if dropped) and its weight
        (0 if dropped), after capacity; None for expert choice.
    n_tokens: T.
    """

    token_R: Tensor
    weights_R: Tensor
    ids_TK: Tensor | None
    weights_TK: Tensor | None
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
    if moe_kernels.rows_usable(ids_R):  # a counting sort in C: the same order and counts
        return moe_kernels.sort_by_expert(ids_R, n_experts)
    order_R = torch.argsort(ids_R, stable=True)
    return order_R, losses.expert_counts(ids_R, n_experts)


def combine_rows(y_RD: Tensor, state: DispatchState) -> Tensor:
    """The combine every dispatcher shares: y_TD[t] = sum of weights_R * y_RD over t's rows."""
    return scatter_weighted(y_RD, state.weights_R, state.token_R, state.n_tokens)
