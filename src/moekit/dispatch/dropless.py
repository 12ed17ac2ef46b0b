"""Dropless dispatch: every assignment is computed (MegaBlocks-style, sort by expert)."""

from __future__ import annotations

from torch import Tensor

from moekit.dispatch.base import DispatchState, combine_rows, sort_by_expert
from moekit.dispatch.combine import gather_rows
from moekit.routing.base import Routing


class DroplessDispatcher:
    """Sort the T*K assignments by expert, gather their tokens, and weight-sum them back."""

    def dispatch(self, x_TD: Tensor, routing: Routing) -> tuple[Tensor, Tensor, DispatchState]:
        assert routing.ids_TK is not None and routing.weights_TK is not None
        K = routing.ids_TK.shape[1]
        order_R, counts_E = sort_by_expert(routing.ids_TK.reshape(-1), routing.n_experts)
        token_R = order_R // K
        weights_R = routing.weights_TK.reshape(-1)[order_R]
        state = DispatchState(token_R, weights_R, routing.ids_TK, routing.weights_TK, len(x_TD))
        return gather_rows(x_TD, token_R), counts_E, state

    def combine(self, y_RD: Tensor, state: DispatchState) -> Tensor:
        return combine_rows(y_RD, state)
