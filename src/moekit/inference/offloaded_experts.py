"""`OffloadedExperts`: a drop-in for `Experts` whose weights come from an `ExpertCache`.

It computes with the resident module's own functions (`grouped_experts_forward` on the fetched
experts' stacked weights, `expert_ffn` on the decode path), so its output is bit-identical to the
all-resident model's; `Experts` is its reference twin.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch
from torch import Tensor, nn

from moekit.config import MoEConfig
from moekit.experts.experts import Experts, grouped_experts_forward, selected_experts_forward
from moekit.inference.cache import ExpertCache, expert_groups


class OffloadedExperts(nn.Module):
    """Drop-in for `Experts` whose weights come from an `ExpertCache`, fetched in the groups of
    `expert_groups`; biases (small) stay resident."""

    def __init__(self, experts: Experts, layer: int, cache: ExpertCache) -> None:
        super().__init__()
        self.cfg: MoEConfig = experts.cfg
        self.layer, self.cache = layer, cache
        # The resident experts' decode-path expert (the decode kernels' if swapped in).
        self.expert_ffn = experts.expert_ffn
        self.b_in = None if experts.b_in is None else experts.b_in.detach().clone()
        self.b_out = None if experts.b_out is None else experts.b_out.detach().clone()

    def forward(self, x_RD: Tensor, counts_E: Tensor) -> Tensor:
        """x_RD (R, D) rows sorted by expert, counts_E (E,) rows per expert -> y_RD (R, D)."""
        counts = counts_E.tolist()
        active = [e for e, c in enumerate(counts) if c]
        if not active:
            return x_RD.new_zeros(x_RD.shape[0], self.cfg.d_model)
        starts = [0, *torch.tensor(counts).cumsum(0).tolist()]
        pieces = []
        for chunk in expert_groups(active, self.cache.capacity, selected=False):
            rows = x_RD[starts[chunk[0]] : starts[chunk[-1] + 1]]
            with self.cache.using([(self.layer, e) for e in chunk]) as weights:
                w_in = torch.stack([w[0] for w in weights])
                w_out = torch.stack([w[1] for w in weights])
            b_in = None if self.b_in is None else self.b_in[chunk]
            b_out = None if self.b_out is None else self.b_out[chunk]
            pieces.append(
                grouped_experts_forward(rows, counts_E[chunk], w_in, w_out, b_in, b_out, self.cfg)
            )
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

    def forward_selected(self, x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor) -> Tensor:
        """`Experts.forward_selected` (the decode path): the chosen experts fetched together (their
        loads overlap) when they fit in the cache at once, else one at a time (`expert_groups`).
        Experts run in ascending order; a group stays pinned until the next one is fetched."""
        chosen = sorted(set(ids_TK.flatten().tolist()))
        groups = expert_groups(chosen, self.cache.capacity, selected=True)
        group_of = {e: group for group in groups for e in group}
        fetched: dict[int, tuple[Tensor, ...]] = {}
        with ExitStack() as held:

            def expert(e: int, x_ND: Tensor) -> Tensor:
                if e not in fetched:
                    held.close()  # unpins the previous group
                    fetched.clear()
                    group = group_of[e]
                    weights = held.enter_context(self.cache.using([(self.layer, g) for g in group]))
                    fetched.update(zip(group, weights, strict=True))
                b_in = None if self.b_in is None else self.b_in[e]
                b_out = None if self.b_out is None else self.b_out[e]
                return self.expert_ffn(x_ND, *fetched[e], b_in, b_out, self.cfg)

            return selected_experts_forward(x_TD, ids_TK, weights_TK, expert)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, experts={self.cfg.n_experts}, offloaded"
