"""All-to-all dispatch: the `Dispatcher` interface across processes.

`AllToAllDispatcher` wraps a single-process dispatcher (dropless, capacity, or capacity decided
over the global batch) and moves rows between processes:

    dispatch: local permute by expert (the wrapped dispatcher) -> exchange the rows-per-expert
              counts -> all-to-all the rows (per-rank split sizes) -> re-sort the received rows by
              local expert -> (x_RD, counts for the local experts, state)
    combine:  undo the re-sort -> all-to-all the results back -> the wrapped dispatcher's combine

Experts are split evenly and in order: rank j of the expert-parallel group holds experts
[j * E / ep, (j + 1) * E / ep). Like every dispatcher it holds no parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from moekit.config import MoEConfig
from moekit.dispatch import (
    CapacityDispatcher,
    Dispatcher,
    DispatchState,
    capacity_assignment,
)
from moekit.distributed.comm import all_to_all, exchange_counts, gather_rows
from moekit.distributed.mesh import Layout
from moekit.routing import Routing, expert_capacity


@dataclass(kw_only=True)
class AllToAllState(DispatchState):
    """The wrapped dispatcher's state `local` (its fields repeated, so the layer reads them as
    usual), the rows sent to / received from each rank (`send`, `recv`), and for each
    local-expert-sorted row its index among the received rows (`order_R`; None: no re-sort)."""

    local: DispatchState
    send: list[int]
    recv: list[int]
    order_R: Tensor | None


class AllToAllDispatcher:
    """Dispatch to experts split over the ranks of `layout.ep_group` (see the module docstring):
    this process holds experts [first_expert, first_expert + n_local). With a group of one
    process it is the wrapped dispatcher."""

    def __init__(self, local: Dispatcher, n_experts: int, layout: Layout) -> None:
        self.local = local
        self.layout = layout
        self.group = layout.ep_group
        self.ep = layout.ep_size
        self.n_local = n_experts // self.ep
        self.first_expert = layout.ep_rank * self.n_local

    def dispatch(self, x_TD: Tensor, routing: Routing) -> tuple[Tensor, Tensor, DispatchState]:
        x_RD, counts_E, local = self.local.dispatch(x_TD, routing)
        if self.ep == 1:
            return x_RD, counts_E, local
        recv_JL = exchange_counts(counts_E, self.group)
        send = counts_E.view(self.ep, self.n_local).sum(1).tolist()
        recv = recv_JL.sum(1).tolist()
        x_recv = all_to_all(x_RD, send, recv, self.group)
        order_R = local_expert_order(recv_JL)
        x_local = x_recv if order_R is None else x_recv.index_select(0, order_R)
        shared = {f.name: getattr(local, f.name) for f in fields(DispatchState)}
        state = AllToAllState(**shared, local=local, send=send, recv=recv, order_R=order_R)
        return x_local, recv_JL.sum(0), state

    def combine(self, y_RD: Tensor, state: DispatchState) -> Tensor:
        if not isinstance(state, AllToAllState):
            return self.local.combine(y_RD, state)
        y_recv = y_RD
        if state.order_R is not None:
            y_recv = y_RD.new_empty(y_RD.shape).index_copy(0, state.order_R, y_RD)
        y_back = all_to_all(y_recv, state.recv, state.send, self.group)
        return self.local.combine(y_back, state.local)


def local_expert_order(recv_JL: Tensor) -> Tensor | None:
    """Received rows come rank by rank, each rank's rows sorted by local expert. The order that
    sorts them by local expert, keeping rank order within an expert (None: already sorted)."""
    ep, n_local = recv_JL.shape
    if ep == 1 or n_local == 1:
        return None
    expert_of_block = torch.arange(n_local, device=recv_JL.device).repeat(ep)
    expert_R = torch.repeat_interleave(expert_of_block, recv_JL.reshape(-1))
    return torch.argsort(expert_R, stable=True)


class GlobalCapacityDispatcher(CapacityDispatcher):
    """Capacity dispatch of this process's tokens, decided over the global batch: the capacity
    and the assignments each expert keeps are those of one process holding every process's
    tokens of `group` in rank order. Every process gathers the routing decisions (expert ids, and
    the weights or selection scores the policy needs), runs the same `capacity_assignment`, and
    keeps its own rows. The rest is `CapacityDispatcher`'s."""

    def __init__(self, cfg: MoEConfig, group: ProcessGroup) -> None:
        super().__init__(cfg)
        self.group = group

    def assignment(self, routing: Routing) -> Tensor:
        """This process's (T, K) final expert ids (-1 where dropped), decided globally."""
        assert routing.ids_TK is not None and routing.weights_TK is not None
        cfg, (T, K) = self.cfg, routing.ids_TK.shape
        parts = [routing.ids_TK.double()]
        if cfg.drop_policy == "probability":
            parts.append(routing.weights_TK.detach().double())
        if cfg.overflow == "next_best":
            assert routing.selection_TE is not None
            parts.append(routing.selection_TE.detach().double())
        rows, start = gather_rows(torch.cat(parts, dim=1), self.group)
        ids = rows[:, :K].long()
        weights = rows[:, K : 2 * K] if cfg.drop_policy == "probability" else ids.float()
        selection = rows[:, -cfg.n_experts :] if cfg.overflow == "next_best" else None
        placeholder = rows.new_zeros(()).expand(rows.shape[0], cfg.n_experts)
        everyone = Routing(
            placeholder, placeholder, placeholder, ids, weights, selection_TE=selection
        )
        capacity = expert_capacity(rows.shape[0], cfg)
        final = capacity_assignment(everyone, capacity, cfg.drop_policy, cfg.overflow)
        return final[start : start + T]
