"""Routing traces: which experts each token used at each MoE layer, recorded by hooks on a running
model (`TraceRecorder`, the one recorder of routing, for `moekit trace` and `moekit analyze`),
saved as one small safetensors file with the model's identity (`save_trace`, `load_trace`).

A trace's layer calls: for each forward call (a prefill or one decode step), for each MoE layer
in order, the distinct experts the layer fetched, ascending, and whether it ran the selected
(decode) path: what `moekit cache-sim` replays, in the groups of `expert_groups` in which
`OffloadedExperts` asks the cache for them, so its hit counts are the model's.
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
from moekit.inference.cache import Key
from moekit.inference.store import model_identity
from moekit.model.transformer import MoETransformer
from moekit.moe import SELECTED_MAX_TOKENS
from moekit.userfiles import DamagedFile, open_safetensors, parse_json

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
        """Every MoE layer call, in order."""
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
    """Records the routing of every forward of `model` inside `with TraceRecorder(model) as r`,
    per forward call and MoE layer: the experts each token's router chose (`calls`), which ones the
    layer call fetched (`fetched`: on the dispatch path, those that received rows) and which path
    it ran (`selected`); where the layer reports its aux (a forward with metrics), also the
    assignments it kept (`kept`: (T, K), -1 where capacity dropped one) and its mean routing
    entropy (`entropy`)."""

    def __init__(self, model: MoETransformer) -> None:
        self.model, self.identity = model, model_identity(model.cfg)
        self.calls: list[list[Tensor]] = []
        self.fetched: list[list[Tensor]] = []
        self.selected: list[list[bool]] = []
        self.kept: list[list[Tensor]] = []
        self.entropy: list[list[float]] = []
        self.hooks: list = []

    def __enter__(self) -> TraceRecorder:
        for i, layer in enumerate(self.model.moe_layers()):
            self.hooks.append(layer.router.register_forward_hook(self._router_hook(i)))
            self.hooks.append(layer.experts.register_forward_pre_hook(self._experts_hook(i)))
            self.hooks.append(layer.register_forward_hook(self._aux_hook))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.hooks:
            h.remove()

    def _router_hook(self, i: int):
        n_experts = self.identity["n_experts"]

        def hook(module, args, routing) -> None:
            if routing.ids_TK is None:
                raise ValueError(
                    "a routing trace needs token-choice routing: expert-choice layers have no "
                    "per-token top-k"
                )
            if i == 0:
                for record in (self.calls, self.fetched, self.selected, self.kept, self.entropy):
                    record.append([])
            ids = routing.ids_TK.detach().to(torch.int32).cpu()
            self.calls[-1].append(ids)
            self.fetched[-1].append(torch.bincount(ids.flatten(), minlength=n_experts) > 0)
            self.selected[-1].append(True)  # unless the experts' hook sees the dispatch run

        return hook

    def _experts_hook(self, i: int):
        def hook(module, args) -> None:  # the dispatch path: experts(x_RD, counts_E)
            self.fetched[-1][i] = args[1].detach().cpu() > 0
            self.selected[-1][i] = False

        return hook

    def _aux_hook(self, module, args, output) -> None:
        aux = output[1]  # the layer returns (y, aux); aux is None without metrics
        if aux is not None:
            self.kept[-1].append(aux.ids.reshape(-1, aux.ids.shape[-1]).cpu())
            self.entropy[-1].append(float(aux.entropy))

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
    if cfg is not None and trace.identity != (ours := model_identity(cfg)):
        raise ValueError(
            f"the trace {path} was recorded from another model ({_differences(identity, ours)}): "
            "record a trace of this model with `moekit trace MODEL --prompts FILE --out TRACE`"
        )
    return trace


def _differences(theirs: dict, ours: dict) -> str:
    """The fields in which a trace's model identity differs from this model's ("the trace's
    n_experts=4; this model's n_experts=6"); the config hash where the shapes agree."""
    names = [n for n, v in ours.items() if n != "config_hash" and theirs.get(n) != v]
    prefix = ""
    if not names:
        names, prefix = ["config_hash"], "the same expert shapes, another config: "
    trace_side = ", ".join(f"{n}={theirs.get(n)}" for n in names)
    model_side = ", ".join(f"{n}={ours[n]}" for n in names)
    return f"{prefix}the trace's {trace_side}; this model's {model_side}"


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


def record_prompts(model: MoETransformer, tokenizer, prompts: list[str], max_new_tokens: int):
    """Trace greedy generation of `max_new_tokens` after each prompt, one prompt at a time (fewer
    where the model's context ends first); a prompt that fills the context is refused, by its
    number, before any is traced."""
    from moekit.model.generation import generate, room_after_prompt

    max_seq_len = model.cfg.max_seq_len
    encoded = [tokenizer.encode(text).ids or [0] for text in prompts]
    rooms = [room_after_prompt(len(ids), max_seq_len, f"prompt {i + 1}")
             for i, ids in enumerate(encoded)]  # fmt: skip
    with TraceRecorder(model) as rec:
        for ids, room in zip(encoded, rooms, strict=True):
            generate(model, torch.tensor([ids]), min(max_new_tokens, room))
    return rec.trace()
