"""Expert-choice dispatch: expert e computes its C chosen tokens; a token's output is the
gate-weighted sum over the experts that took it (zero if none did)."""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.dispatch.base import DispatchState
from moekit.routing.base import Routing


class ExpertChoiceDispatcher:
    def dispatch(self, x_TD: Tensor, routing: Routing) -> tuple[Tensor, Tensor, DispatchState]:
        assert routing.tokens_EC is not None and routing.gates_EC is not None
        E, C = routing.tokens_EC.shape
        slot_R = routing.tokens_EC.reshape(-1)
        counts_E = torch.full((E,), C, dtype=torch.long, device=x_TD.device)
        state = DispatchState(slot_R, routing.gates_EC.reshape(-1), None, x_TD.shape[0])
        return x_TD.index_select(0, slot_R), counts_E, state

    def combine(self, y_RD: Tensor, state: DispatchState) -> Tensor:
        weighted_RD = y_RD * state.weights_TK.to(y_RD.dtype).unsqueeze(1)
        y_TD = y_RD.new_zeros(state.n_tokens, y_RD.shape[1])
        return y_TD.index_add(0, state.slot_R, weighted_RD)
