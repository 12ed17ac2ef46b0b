"""Expert-choice dispatch: expert e computes its C chosen tokens; a token's output is the
gate-weighted sum over the experts that took it (zero if none did)."""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.dispatch.base import DispatchState, combine_rows
from moekit.dispatch.combine import gather_rows
from moekit.routing.base import Routing


class ExpertChoiceDispatcher:
    def dispatch(self, x_TD: Tensor, routing: Routing) -> tuple[Tensor, Tensor, DispatchState]:
        assert routing.tokens_EC is not None and routing.gates_EC is not None
        E, C = routing.tokens_EC.shape
        token_R = routing.tokens_EC.reshape(-1)
        counts_E = torch.full((E,), C, dtype=torch.long, device=x_TD.device)
        state = DispatchState(token_R, routing.gates_EC.reshape(-1), None, None, x_TD.shape[0])
        return gather_rows(x_TD, token_R), counts_E, state

    def combine(self, y_RD: Tensor, state: DispatchState) -> Tensor:
        return combine_rows(y_RD, state)
