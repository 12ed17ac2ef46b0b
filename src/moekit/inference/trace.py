"""Routing traces for cache planning: which experts each token used at each MoE layer, recorded
while generating, saved as one small safetensors file with the model's identity; and a replay of
a trace against the cache policies and Belady's optimal oracle (`moekit cache-sim`).

A trace's request sequence: for each forward call (a prefill or one decode step), for each MoE
layer in order, the distinct experts its tokens chose, ascending: what `OffloadedExperts` asks
the cache for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from moekit.config import ModelConfig
from moekit.fileio import atomic_path
from moekit.inference.cache import ExpertCache, Key, make_policy
from moekit.inference.offload import model_identity
from moekit.model.transformer import MoETransformer


@dataclass
class Trace:
    """ids (N, L, K): the experts of N tokens at L MoE layers; step (N,): the forward call of each
    token; identity: the model's (see `model_identity`)."""

    ids: Tensor
    step: Tensor
    identity: dict

    def expert_counts(self) -> Tensor:
        """(L, E) how many tokens chose each expert at each layer."""
        L, E = self.identity["n_layers"], self.identity["n_experts"]
        flat = self.ids + torch.arange(L)[None, :, None] * E
        return torch.bincount(flat.flatten(), minlength=L * E).view(L, E)

    def requests(self) -> list[Key]:
        """The cache's request sequence (see the module docstring)."""
        out: list[Key] = []
        for s in self.step.unique().tolist():
            rows = self.ids[self.step == s]
            for layer in range(rows.shape[1]):
                out += [(layer, e) for e in rows[:, layer].unique().tolist()]
        return out


class TraceRecorder:
    """Records the routing of every forward of `model` inside `with TraceRecorder(model) as r`:
    the experts each token's router chose, hooked on the routers (generation runs the MoE layers
    without their aux). With dropless dispatch, what generation uses, these are the experts that
    ran; a capacity-limited layer may have dropped some of them."""

    def __init__(self, model: MoETransformer) -> None:
        self.model, self.identity = model, model_identity(model.cfg)
        self.calls: list[list[Tensor]] = []
        self.hooks: list = []

    def __enter__(self) -> TraceRecorder:
        layers = self.model.moe_layers()
        for i, layer in enumerate(layers):
            self.hooks.append(layer.router.register_forward_hook(self._hook(i)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.hooks:
            h.remove()

    def _hook(self, i: int):
        def hook(module, args, routing) -> None:
            if i == 0:
                self.calls.append([])
            self.calls[-1].append(routing.ids_TK.detach().to(torch.int32).cpu())

        return hook

    def trace(self) -> Trace:
        ids = [torch.stack(layers, dim=1) for layers in self.calls]
        step = [torch.full((len(x),), s, dtype=torch.int32) for s, x in enumerate(ids)]
        return Trace(torch.cat(ids), torch.cat(step), self.identity)


def save_trace(trace: Trace, path: str | Path) -> None:
    """Write a trace atomically as safetensors (identity in the metadata)."""
    with atomic_path(path) as tmp:
        save_file(
            {"ids": trace.ids.contiguous(), "step": trace.step.contiguous()},
            str(tmp),
            metadata={"moekit_trace": json.dumps(trace.identity)},
        )


def load_trace(path: str | Path, cfg: ModelConfig | None = None) -> Trace:
    """Read a trace; with `cfg`, raise unless it was recorded from that model."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            ids, step = f.get_tensor("ids"), f.get_tensor("step")
    except Exception as exc:
        raise ValueError(f"{path} is not a readable routing trace: {exc}") from exc
    if "moekit_trace" not in meta:
        raise ValueError(f"{path} is not a moekit routing trace (no 'moekit_trace' metadata)")
    trace = Trace(ids.long(), step, json.loads(meta["moekit_trace"]))
    if cfg is not None and trace.identity != model_identity(cfg):
        raise ValueError(
            f"the trace {path} was recorded from another model: {trace.identity} != "
            f"{model_identity(cfg)}"
        )
    return trace


def simulate(
    requests: list[Key], capacity: int, policy: str, counts: Tensor | None = None, top_k: int = 1
) -> float:
    """Hit rate of `ExpertCache` with `policy` (no prefetch) on the request sequence. "static"
    never evicts the `capacity - top_k` most counted keys of `counts` (L, E), as the model does."""
    by_key = None
    if counts is not None:
        by_key = {
            (i, e): int(c) for i, row in enumerate(counts.tolist()) for e, c in enumerate(row)
        }
    pol = make_policy(policy, by_key, n_static=capacity - top_k)
    cache = ExpertCache(lambda key: (), capacity, pol, expert_bytes=0)
    for key in requests:
        cache.get(key)
        cache.unpin(key)
    return cache.stats.hit_rate


def belady(requests: list[Key], capacity: int) -> float:
    """Hit rate of the optimal offline policy (Belady 1966): on a miss with the cache full, evict
    the resident key whose next request is furthest away (or never comes)."""
    next_use = [0] * len(requests)
    seen: dict[Key, int] = {}
    for i in range(len(requests) - 1, -1, -1):
        next_use[i] = seen.get(requests[i], len(requests))
        seen[requests[i]] = i
    resident: dict[Key, int] = {}  # key -> index of its next request
    hits = 0
    for i, key in enumerate(requests):
        if key in resident:
            hits += 1
        elif len(resident) >= capacity:
            del resident[max(resident, key=resident.__getitem__)]
        resident[key] = next_use[i]
    return hits / max(len(requests), 1)


def load_model_and_tokenizer(path: str | Path):
    """(model, tokenizer) of a moekit run directory or a Hugging Face checkpoint directory (which
    must hold a tokenizer.json)."""
    from tokenizers import Tokenizer

    path = Path(path)
    if (path / "checkpoints").is_dir():
        from moekit.train.sample import load_run

        _, model, tokenizer = load_run(path)
        return model, tokenizer
    from moekit.interop import load_hf

    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path} has no tokenizer.json: cannot encode the prompts")
    return load_hf(path), Tokenizer.from_file(str(path / "tokenizer.json"))


def record_prompts(model: MoETransformer, tokenizer, prompts: list[str], max_new_tokens: int):
    """Trace greedy generation of `max_new_tokens` after each prompt, one prompt at a time."""
    from moekit.model.generation import generate

    with TraceRecorder(model) as rec:
        for text in prompts:
            ids = tokenizer.encode(text).ids[: model.cfg.max_seq_len - max_new_tokens] or [0]
            generate(model, torch.tensor([ids]), max_new_tokens)
    return rec.trace()


def cache_sim_rows(trace: Trace, capacities: list[int], policies: list[str]) -> list[dict]:
    """Hit rate of each policy and of Belady's oracle at each capacity (in experts)."""
    requests, counts = trace.requests(), trace.expert_counts()
    top_k = trace.identity["top_k"]
    rows = []
    for cap in capacities:
        row = {"budget": cap, "belady": belady(requests, cap)}
        for p in policies:
            row[p] = simulate(requests, cap, p, counts if p == "static" else None, top_k)
        rows.append(row)
    return rows
