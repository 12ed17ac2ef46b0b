"""Dropless dispatch: every assignment is computed (MegaBlocks-style, sort by expert)."""

from __future__ import annotations

from torch import Tensor

from moekit.dispatch.base import DispatchState, sort_by_expert, weighted_sum_by_token
from moekit.routing.base import Routing


class DroplessDispatcher:
    """Sort the T*K assignments by expert, gather their tokens, and weight-sum them back."""

    def dispatch(self, x_TD: Tensor, routing: Routing) -> tuple[Tensor, Tensor, DispatchState]:
        assert routing.ids_TK is not None and routing.weights_TK is not None
        K = routing.ids_TK.shape[1]
        order_R, counts_E = sort_by_expert(routing.ids_TK.reshape(-1), routing.n_experts)
        x_RD = x_TD.index_select(0, order_R // K)
        state = DispatchState(order_R, routing.weights_TK, routing.ids_TK, x_TD.shape[0])
        return x_RD, counts_E, state

    def combine(self, y_RD: Tensor, state: DispatchState) -> Tensor:
        return weighted_sum_by_token(y_RD, state)
