"""Routing traces for cache planning: which experts each token used at each MoE layer, recorded
while generating, saved as one small safetensors file with the model's identity; and a replay of
a trace against the cache policies and Belady's optimal oracle (`moekit cache-sim`).

A trace's layer calls: for each forward call (a prefill or one decode step), for each MoE layer
in order, the distinct experts the layer fetched, ascending, and whether it ran the selected
(decode) path; `OffloadedExperts` asks the cache for them in the groups of `expert_groups`, and
the simulator replays those very groups on an `ExpertCache`, so its hit counts are the model's.
The request sequence is the same keys one after another.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import save_file
from torch import Tensor

from moekit.config import ModelConfig
from moekit.fileio import atomic_path
from moekit.inference.cache import CacheStats, ExpertCache, Key, make_policy
from moekit.inference.offload import expert_groups, model_identity
from moekit.model.transformer import MoETransformer
from moekit.moe import SELECTED_MAX_TOKENS
from moekit.userfiles import REDOWNLOAD, DamagedFile, open_safetensors, parse_json, read_tokenizer

# 1: ids and step only. 2: also `fetched` and `selected`, what the layer calls did.
TRACE_VERSION = 2
RECORD_AGAIN = "record it again with `moekit trace`"


class LayerCall(NamedTuple):
    """One MoE layer call as the expert cache sees it: the distinct experts (ascending) that layer
    `layer` fetched, and whether the call ran the selected path (`MoELayer.selected_path`)."""

    layer: int
    experts: tuple[int, ...]
    selected: bool


@dataclass
class Trace:
    """ids (N, L, K): the experts of N tokens at L MoE layers; step (N,): the forward call of each
    token; identity: the model's (see `model_identity`).

    fetched (S, L, E) bool: the experts each of the S forward calls fetched at each layer (the
    chosen ones, less any a capacity-limited dispatch dropped); selected (S, L) bool: whether
    that layer call ran the selected path. A trace of version 1 has neither: they are derived
    (`derived`), fetched as the chosen experts and selected as "at most SELECTED_MAX_TOKENS
    tokens in the call", which is exact for dropless dispatch and expert_impl "auto".
    """

    ids: Tensor
    step: Tensor
    identity: dict
    fetched: Tensor | None = None
    selected: Tensor | None = None
    derived: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        if self.fetched is not None and self.selected is not None:
            return
        self.derived = True
        _, call, tokens = self.step.unique(return_inverse=True, return_counts=True)
        N, L, K = self.ids.shape
        if self.fetched is None:
            self.fetched = torch.zeros(len(tokens), L, self.identity["n_experts"], dtype=torch.bool)
            layer = torch.arange(L)[None, :, None].expand(N, L, K)
            self.fetched[call[:, None, None].expand(N, L, K), layer, self.ids.long()] = True
        if self.selected is None:
            self.selected = (tokens <= SELECTED_MAX_TOKENS)[:, None].expand(-1, L).clone()

    def expert_counts(self) -> Tensor:
        """(L, E) how many tokens chose each expert at each layer."""
        L, E = self.identity["n_layers"], self.identity["n_experts"]
        flat = self.ids + torch.arange(L)[None, :, None] * E
        return torch.bincount(flat.flatten(), minlength=L * E).view(L, E)

    def layer_calls(self) -> list[LayerCall]:
        """Every MoE layer call, in order (see the module docstring)."""
        assert self.fetched is not None and self.selected is not None
        return [
            LayerCall(layer, tuple(e for e, f in enumerate(row) if f), selected)
            for rows, flags in zip(self.fetched.tolist(), self.selected.tolist(), strict=True)
            for layer, (row, selected) in enumerate(zip(rows, flags, strict=True))
        ]

    def requests(self) -> list[Key]:
        """The cache's request sequence: the layer calls' experts one after another."""
        return [(c.layer, e) for c in self.layer_calls() for e in c.experts]


class TraceRecorder:
    """Records the routing of every forward of `model` inside `with TraceRecorder(model) as r`:
    the experts each token's router chose (hooked on the routers; generation runs the MoE layers
    without their aux), which experts each layer call fetched (the chosen ones; on the dispatch
    path, those that received rows, hooked on the experts) and which path it ran."""

    def __init__(self, model: MoETransformer) -> None:
        self.model, self.identity = model, model_identity(model.cfg)
        self.calls: list[list[Tensor]] = []
        self.fetched: list[list[Tensor]] = []
        self.selected: list[list[bool]] = []
        self.hooks: list = []

    def __enter__(self) -> TraceRecorder:
        for i, layer in enumerate(self.model.moe_layers()):
            self.hooks.append(layer.router.register_forward_hook(self._router_hook(i, layer)))
            self.hooks.append(layer.experts.register_forward_pre_hook(self._experts_hook(i)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.hooks:
            h.remove()

    def _router_hook(self, i: int, layer):
        n_experts = self.identity["n_experts"]

        def hook(module, args, routing) -> None:
            if i == 0:
                self.calls.append([])
                self.fetched.append([])
                self.selected.append([])
            ids = routing.ids_TK.detach().to(torch.int32).cpu()
            self.calls[-1].append(ids)
            self.fetched[-1].append(torch.bincount(ids.flatten(), minlength=n_experts) > 0)
            self.selected[-1].append(layer.selected_path(ids.shape[0]))

        return hook

    def _experts_hook(self, i: int):
        def hook(module, args) -> None:  # the dispatch path: experts(x_RD, counts_E)
            self.fetched[-1][i] = args[1].detach().cpu() > 0

        return hook

    def trace(self) -> Trace:
        ids = [torch.stack(layers, dim=1) for layers in self.calls]
        step = [torch.full((len(x),), s, dtype=torch.int32) for s, x in enumerate(ids)]
        fetched = torch.stack([torch.stack(layers) for layers in self.fetched])
        selected = torch.tensor(self.selected, dtype=torch.bool)
        return Trace(torch.cat(ids), torch.cat(step), self.identity, fetched, selected)


def save_trace(trace: Trace, path: str | Path) -> None:
    """Write a trace atomically as safetensors (identity and format version in the metadata).
    A trace whose layer calls were derived is written as it was read, version 1: its guesses do
    not become records."""
    names = ("ids", "step") if trace.derived else ("ids", "step", "fetched", "selected")
    version = 1 if trace.derived else TRACE_VERSION
    with atomic_path(path) as tmp:
        save_file(
            {k: getattr(trace, k).contiguous() for k in names},
            str(tmp),
            metadata={
                "moekit_trace": json.dumps(trace.identity),
                "moekit_trace_version": str(version),
            },
        )


def load_trace(path: str | Path, cfg: ModelConfig | None = None) -> Trace:
    """Read a trace; with `cfg`, raise unless it was recorded from that model. A trace of
    version 1 is read with its layer calls derived (see `Trace`)."""
    with open_safetensors(path, RECORD_AGAIN) as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    if "moekit_trace" not in meta:
        raise ValueError(f"{path} is not a moekit routing trace (no 'moekit_trace' metadata)")
    version_text = meta.get("moekit_trace_version", "1")
    if not version_text.isdigit():
        raise DamagedFile(path, f"has a trace version {version_text!r}", RECORD_AGAIN)
    version = int(version_text)
    if version > TRACE_VERSION:
        raise ValueError(
            f"{path} is a routing trace of version {version}, newer than this moekit reads "
            f"({TRACE_VERSION}); upgrade moekit or record the trace again"
        )
    identity = parse_json(meta["moekit_trace"], path, RECORD_AGAIN, expect=dict)
    _check_trace_tensors(path, tensors, identity, version)
    calls = [tensors[k].bool() for k in ("fetched", "selected")] if version >= 2 else [None, None]
    trace = Trace(tensors["ids"].long(), tensors["step"], identity, *calls)
    if cfg is not None and trace.identity != model_identity(cfg):
        raise ValueError(
            f"the trace {path} was recorded from another model: {trace.identity} != "
            f"{model_identity(cfg)}"
        )
    return trace


def _check_trace_tensors(path: str | Path, tensors: dict, identity: dict, version: int) -> None:
    """The tensors a trace of `version` needs, in the shapes its identity gives."""
    try:
        L, E, K = identity["n_layers"], identity["n_experts"], identity["top_k"]
    except KeyError as err:
        raise DamagedFile(path, f"has no {err} in its model identity", RECORD_AGAIN) from None
    names = ("ids", "step", "fetched", "selected") if version >= 2 else ("ids", "step")
    if missing := [n for n in names if n not in tensors]:
        raise DamagedFile(path, f"has no tensor {', '.join(missing)}", RECORD_AGAIN)
    N = tensors["ids"].shape[0]
    want = {"ids": (N, L, K), "step": (N,)}
    if version >= 2:
        S = int(tensors["step"].max()) + 1 if N else 0
        want |= {"fetched": (S, L, E), "selected": (S, L)}
    for name, shape in want.items():
        if tuple(tensors[name].shape) != shape:
            problem = f"has tensor '{name}' of shape {tuple(tensors[name].shape)}, not {shape}"
            raise DamagedFile(path, problem, RECORD_AGAIN)


def simulate(
    calls: list[LayerCall],
    capacity: int,
    policy: str,
    counts: Tensor | None = None,
    top_k: int = 1,
) -> CacheStats:
    """The statistics of an `ExpertCache` of `capacity` with `policy` (no prefetch) fed the layer
    calls as `OffloadedExperts` feeds it: each call's experts pinned together in the groups of
    `expert_groups`, so the hits and misses are those of the model on the same routing. "static"
    never evicts the `capacity - top_k` most counted keys of `counts` (L, E), as the model does
    given the same counts."""
    by_key = None
    if counts is not None:
        by_key = {
            (i, e): int(c) for i, row in enumerate(counts.tolist()) for e, c in enumerate(row)
        }
    pol = make_policy(policy, by_key, n_static=capacity - top_k)
    cache = ExpertCache(lambda key: (), capacity, pol, expert_bytes=0, loader_threads=0)
    for call in calls:
        for group in expert_groups(list(call.experts), capacity, call.selected):
            with cache.using([(call.layer, e) for e in group]):
                pass
    return cache.stats


def belady(requests: list[Key], capacity: int) -> float:
    """Hit rate of the optimal offline policy (Belady 1966): on a miss with the cache full, evict
    the resident key whose next request is furthest away (or never comes).

    It serves the requests one key at a time and may evict any resident key, even one that the
    same layer call requested just before (the model keeps those pinned) and it reads nothing
    ahead of its request. Any cache without prefetch that serves the same sequence in the same
    order, `ExpertCache` with its group pins included, is such a demand-paging cache, so this is
    an upper bound on its hit rate; with prefetch a cache can count more hits."""
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

    path = Path(path)
    if (path / "checkpoints").is_dir():
        from moekit.train.sample import load_run

        _, model, tokenizer = load_run(path)
        return model, tokenizer
    from moekit.interop import load_hf

    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path} has no tokenizer.json: cannot encode the prompts")
    return load_hf(path), read_tokenizer(path / "tokenizer.json", REDOWNLOAD)


def record_prompts(model: MoETransformer, tokenizer, prompts: list[str], max_new_tokens: int):
    """Trace greedy generation of `max_new_tokens` after each prompt, one prompt at a time."""
    from moekit.model.generation import generate

    with TraceRecorder(model) as rec:
        for text in prompts:
            ids = tokenizer.encode(text).ids[: model.cfg.max_seq_len - max_new_tokens] or [0]
            generate(model, torch.tensor([ids]), max_new_tokens)
    return rec.trace()


def cache_sim_rows(trace: Trace, capacities: list[int], policies: list[str]) -> list[dict]:
    """Hit rate of each policy (as the model gets it, see `simulate`) and of Belady's oracle at
    each capacity (in experts)."""
    calls, requests, counts = trace.layer_calls(), trace.requests(), trace.expert_counts()
    top_k = trace.identity["top_k"]
    rows = []
    for cap in capacities:
        row = {"budget": cap, "belady": belady(requests, cap)}
        for p in policies:
            stats = simulate(calls, cap, p, counts if p == "static" else None, top_k)
            row[p] = stats.hit_rate
        rows.append(row)
    return rows
