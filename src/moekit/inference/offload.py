"""Expert offloading: routed experts stay on disk (an expert directory or the checkpoint file,
`moekit.inference.store`) and an `ExpertCache` keeps at most a budget of them in memory:
`apply_expert_offload` swaps `OffloadedExperts` into a built model, `load_offloaded` builds one
from a checkpoint with its experts left in the file.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moekit.config import ModelConfig, QuantizeConfig
from moekit.inference.budget import resolve_budget
from moekit.inference.cache import ExpertCache, make_policy
from moekit.inference.decode_moe import chosen_experts
from moekit.inference.offloaded_experts import OffloadedExperts
from moekit.inference.store import CheckpointExpertStore, ExpertStore
from moekit.model.transformer import MoETransformer
from moekit.quant.files import dtype_problems
from moekit.quant.modules import quantize_model
from moekit.userfiles import DTYPES, open_safetensors

RESAVE_CHECKPOINT = "copy or save the checkpoint again"


@dataclass
class ExpertOffload:
    """A model's offloading: its cache (statistics in `stats()`), store and prefetch hooks
    (`prefetching`: whether prefetch runs; it stands down at a budget of top_k experts)."""

    cache: ExpertCache
    store: ExpertStore | CheckpointExpertStore
    hooks: list = field(default_factory=list)
    prefetching: bool = False

    def stats(self) -> dict[str, float | str]:
        """The cache's statistics with its capacity, one expert's stored bytes and their format
        ("float32", "int4", ...)."""
        d = self.cache.stats.as_dict()
        d.update(capacity=self.cache.capacity, expert_bytes=self.store.expert_bytes,
                 stored_as=self.store.stored_as)  # fmt: skip
        return d

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        self.cache.close()


def apply_expert_offload(
    model: MoETransformer,
    expert_dir: str | Path | CheckpointExpertStore,
    *,
    budget: int | float | str = 0.5,
    policy: str = "lru",
    prefetch: bool = False,
    expert_counts: Tensor | None = None,
) -> ExpertOffload:
    """Replace the experts (`Experts` or `QuantizedExperts`) of each MoE layer, the MTP blocks'
    too, by `OffloadedExperts` reading from `expert_dir` (written by `write_expert_files`) or a
    `CheckpointExpertStore`, through one `ExpertCache` of `budget` experts (`resolve_budget`; bytes
    count the experts as stored). Everything is checked before the model is changed.

    policy: "lru", "lfu" or "static" (keeps the most used experts of `expert_counts`
    (n_moe_layers, n_experts), e.g. a routing trace's). prefetch: before each MoE layer, load the
    next layer's guessed experts in the background (`_prefetch_hook`); at a budget of top_k
    experts every guess would be evicted unused, so prefetch stands down, with one warning.
    """
    store = expert_dir
    if not isinstance(store, CheckpointExpertStore):
        store = ExpertStore(expert_dir, model)
    moe = model.cfg.moe
    layers = model.moe_layers(with_mtp=True)
    capacity = expert_capacity(store, model, budget)
    pol = make_policy(policy, expert_counts, n_static=capacity - moe.top_k)
    cache = ExpertCache(store.load, capacity, pol)
    for i, layer in enumerate(layers):
        layer.experts = OffloadedExperts(layer.experts, i, cache)
    offload = ExpertOffload(cache, store)
    if prefetch and capacity <= moe.top_k:
        warnings.warn(
            f"prefetch stands down: a budget of {capacity} experts cannot hold a layer's "
            f"top_k={moe.top_k} experts plus a guess of the next layer's, so every prefetched "
            f"read would be evicted unused; give a budget above {moe.top_k} experts to prefetch",
            stacklevel=2,
        )
    elif prefetch and moe.router != "hash":  # a hash router needs the token ids, not x
        offload.prefetching = True
        # the main layers: an MTP block's input is not the last main layer's
        for i, (layer, nxt) in enumerate(itertools.pairwise(model.moe_layers())):
            offload.hooks.append(layer.register_forward_pre_hook(_prefetch_hook(i, nxt, cache)))
    return offload


def expert_capacity(
    store: ExpertStore | CheckpointExpertStore, model: MoETransformer, budget: int | float | str
) -> int:
    """`budget` as a number of experts of `model` stored as in `store` (`resolve_budget`: an error
    naming offload.budget when it cannot hold top_k of them)."""
    moe = model.cfg.moe
    n_total = len(model.moe_layers(with_mtp=True)) * moe.n_experts
    return resolve_budget(
        budget, n_total, store.expert_bytes, moe.top_k, name="offload.budget",
        stored_as=store.stored_as,
    )  # fmt: skip


def _prefetch_hook(layer: int, next_layer: nn.Module, cache: ExpertCache):
    """Guess the next MoE layer's experts from this layer's input (its router applied to the
    current hidden state: Eliseev & Mazur 2023, "Fast inference of MoE language models with
    offloading") and start loading them."""

    def hook(module: nn.Module, args: tuple) -> None:
        x_TD = args[0].reshape(-1, next_layer.cfg.d_model)
        with torch.no_grad():
            chosen = chosen_experts(next_layer.router, x_TD)
        cache.prefetch([(layer + 1, e) for e in chosen], protect_layer=layer)

    return hook


def load_offloaded(
    path: str | Path,
    cfg: ModelConfig,
    *,
    remedy: str = RESAVE_CHECKPOINT,
    quantization: QuantizeConfig | None = None,
    budget: int | float | str = 0.5,
    **offload: Any,
) -> tuple[MoETransformer, ExpertOffload]:
    """The model of `cfg` in eval mode with the weights of the safetensors file `path` (a
    checkpoint's model.safetensors) but its routed experts, which stay in the file and are read
    one at a time through `apply_expert_offload(..., budget=budget, **offload)`: the whole model is
    never in memory. The budget is checked before any weight is read. `quantization`: the
    checkpoint's `QuantizeConfig` (None: float weights); the model is quantized as it was and its
    experts are read and cached quantized. `remedy`: what a damaged file's error tells the user
    to do. `moekit.load(run, experts=budget)` loads a run's checkpoint through this."""
    with torch.device("meta"):
        model = MoETransformer(cfg)
        if quantization is not None:
            quantize_model(model, quantization, empty=True)
    store = CheckpointExpertStore(path, model, remedy)  # checks the file before anything is read
    expert_capacity(store, model, budget)  # a budget below top_k experts: nothing read yet
    routed = store.routed_keys
    with open_safetensors(path, remedy) as f:
        kept = [k for k in f.keys() if k not in routed]  # noqa: SIM118
        stored = {k: DTYPES.get(f.get_slice(k).get_dtype()) for k in kept}  # from the header
        wrong = dtype_problems(model.state_dict(), stored)
        if wrong:  # assign=True would keep them: a quantized scheme read as another, silently
            raise ValueError(f"{path} does not hold this model's weights: {wrong[0]}")
        # clone: safetensors hands out views of its memory map, which would keep the file mapped
        state = {k: f.get_tensor(k).clone() for k in kept}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if set(missing) != routed or unexpected:
        raise ValueError(
            f"{path} does not hold this model's weights: missing {sorted(set(missing) - routed)}, "
            f"unexpected {sorted(unexpected)}"
        )
    offloaded = apply_expert_offload(model, store, budget=budget, **offload)  # experts leave
    for module in model.modules():
        for name, buf in module.named_buffers(recurse=False):
            if buf.is_meta:  # non-persistent state (the MoE layers' balance counts) starts at 0
                module.register_buffer(name, torch.zeros_like(buf, device="cpu"), persistent=False)
    return model.eval(), offloaded


def format_stats(stats: dict[str, float | str]) -> str:
    """One line of cache statistics for people."""
    return (
        f"expert cache: {stats['capacity']} experts, hit rate {stats['hit_rate']:.1%} "
        f"({stats['hits']} hits, {stats['misses']} misses), "
        f"{stats['bytes_read'] / 1e6:,.1f} MB read ({stats['stored_as']}), "
        f"{stats['load_wait_s']:.2f} s waiting for loads"
        + (
            f", prefetch accuracy {stats['prefetch_accuracy']:.1%} of {stats['prefetched']}"
            if stats["prefetched"]
            else ""
        )
    )
