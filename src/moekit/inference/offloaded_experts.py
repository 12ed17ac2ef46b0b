"""`OffloadedExperts`: a drop-in for `Experts` (or a quantized run's `QuantizedExperts`) whose
weights come from an `ExpertCache`. It computes with the resident module's own functions (float
experts: `grouped_experts_forward` on the fetched experts' stacked weights, `expert_ffn` on the
decode path; quantized ones: `quantized_expert_ffn` on each expert's rows), so its output is
bit-identical to the all-resident model's, its reference twin.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch
from torch import Tensor, nn

from moekit.config import MoEConfig
from moekit.experts.experts import Experts, grouped_experts_forward, selected_experts_forward
from moekit.inference.cache import ExpertCache, ExpertWeight, expert_groups
from moekit.quant.modules import QuantizedExperts, experts_on_their_rows, quantized_expert_ffn


class OffloadedExperts(nn.Module):
    """Drop-in for `Experts` or `QuantizedExperts` whose weights come from an `ExpertCache`,
    fetched in the groups of `expert_groups`; biases (small) stay resident."""

    def __init__(self, experts: Experts | QuantizedExperts, layer: int, cache: ExpertCache) -> None:
        super().__init__()
        self.cfg: MoEConfig = experts.cfg
        self.layer, self.cache = layer, cache
        self.quantized = isinstance(experts, QuantizedExperts)
        # The resident experts' decode-path expert for float weights (the decode kernels' if
        # swapped in, as `apply_decode_kernels` does here too); quantized ones always run
        # `quantized_expert_ffn`, as `QuantizedExperts` does.
        self.expert_ffn = getattr(experts, "expert_ffn", None)
        self.b_in = None if experts.b_in is None else experts.b_in.detach().clone()
        self.b_out = None if experts.b_out is None else experts.b_out.detach().clone()

    def _ffn(self, e: int, x_ND: Tensor, w_in: ExpertWeight, w_out: ExpertWeight) -> Tensor:
        """Expert e (its weights fetched) on N rows x_ND (N, D) -> (N, D)."""
        b_in = None if self.b_in is None else self.b_in[e]
        b_out = None if self.b_out is None else self.b_out[e]
        ffn = quantized_expert_ffn if self.quantized else self.expert_ffn
        return ffn(x_ND, w_in, w_out, b_in, b_out, self.cfg)

    def _group(
        self, x_RD: Tensor, counts_G: Tensor, group: list[int], weights: list[tuple]
    ) -> Tensor:
        """The experts of `group` (their weights fetched, in order) on their expert-sorted rows
        x_RD (R, D), counts_G (G,) rows each -> y_RD (R, D)."""
        if self.quantized:

            def expert(i: int, x_ND: Tensor) -> Tensor:
                return self._ffn(group[i], x_ND, *weights[i])

            return experts_on_their_rows(x_RD, counts_G, expert)
        w_in = torch.stack([w[0] for w in weights])
        w_out = torch.stack([w[1] for w in weights])
        b_in = None if self.b_in is None else self.b_in[group]
        b_out = None if self.b_out is None else self.b_out[group]
        return grouped_experts_forward(x_RD, counts_G, w_in, w_out, b_in, b_out, self.cfg)

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
                pieces.append(self._group(rows, counts_E[chunk], chunk, weights))
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

    def forward_selected(self, x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor) -> Tensor:
        """`Experts.forward_selected` (the decode path): the chosen experts fetched together (their
        loads overlap) when they fit in the cache at once, else one at a time (`expert_groups`).
        Experts run in ascending order; a group stays pinned until the next one is fetched."""
        chosen = sorted(set(ids_TK.flatten().tolist()))
        groups = expert_groups(chosen, self.cache.capacity, selected=True)
        group_of = {e: group for group in groups for e in group}
        fetched: dict[int, tuple[ExpertWeight, ...]] = {}
        with ExitStack() as held:

            def expert(e: int, x_ND: Tensor) -> Tensor:
                if e not in fetched:
                    held.close()  # unpins the previous group
                    fetched.clear()
                    group = group_of[e]
                    weights = held.enter_context(self.cache.using([(self.layer, g) for g in group]))
                    fetched.update(zip(group, weights, strict=True))
                return self._ffn(e, x_ND, *fetched[e])

            return selected_experts_forward(x_TD, ids_TK, weights_TK, expert)

    def extra_repr(self) -> str:
        stored = ", quantized" if self.quantized else ""
        return f"layer={self.layer}, experts={self.cfg.n_experts}, offloaded{stored}"
