"""Expert offloading: routed experts live on disk, one safetensors file per MoE layer read one
expert at a time; an `ExpertCache` keeps at most a budget of them in memory.

`apply_expert_offload(model, expert_dir, budget=..., policy=...)` replaces each MoE layer's
`Experts` with `OffloadedExperts` from outside the model. It computes only the experts that
received rows, with the same grouped matmul and activation as `Experts`, so its output is
bit-identical to the all-resident model; `Experts` is its reference twin.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import struct
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from moekit.config import ModelConfig, MoEConfig
from moekit.experts.experts import activate, expert_ffn, selected_experts_forward, swiglu
from moekit.experts.grouped import GROUPED_MATMULS, resolve_impl
from moekit.fileio import atomic_path
from moekit.inference.cache import CacheStats, ExpertCache, Key, make_policy
from moekit.model.transformer import MoETransformer
from moekit.moe import MoELayer
from moekit.train.checkpoint import checkpoint_remedy
from moekit.userfiles import open_safetensors, read_json

MANIFEST = "manifest.json"
REWRITE_EXPERTS = "write the expert directory again (write_expert_files)"


def model_identity(cfg: ModelConfig) -> dict[str, Any]:
    """What an expert directory or a routing trace must match: the routed-expert shape and a hash
    of the whole model config."""
    moe = cfg.moe
    if moe is None or not cfg.moe_layer_indices:
        raise ValueError("the model has no MoE layers: there are no experts to offload or trace")
    return {
        "n_layers": len(cfg.moe_layer_indices),
        "n_experts": moe.n_experts,
        "top_k": moe.top_k,
        "d_model": moe.d_model,
        "d_expert": moe.d_expert,
        "config_hash": hashlib.sha256(cfg.to_json().encode()).hexdigest()[:16],
    }


def layer_file(expert_dir: Path, layer: int) -> Path:
    return Path(expert_dir) / f"layer-{layer:03d}.safetensors"


def write_expert_files(model: MoETransformer, expert_dir: str | Path) -> Path:
    """Write every MoE layer's routed experts as `layer-NNN.safetensors` (keys "E.w_in",
    "E.w_out") plus a manifest, atomically (the directory appears whole or not at all)."""
    expert_dir = Path(expert_dir)
    identity = model_identity(model.cfg)
    with atomic_path(expert_dir) as tmp:
        tmp.mkdir()
        for i, layer in enumerate(model.moe_layers()):
            w_in, w_out = layer.experts.w_in.detach(), layer.experts.w_out.detach()
            tensors = {}
            for e in range(w_in.shape[0]):
                tensors[f"{e}.w_in"] = w_in[e].contiguous().cpu()
                tensors[f"{e}.w_out"] = w_out[e].contiguous().cpu()
            save_file(tensors, str(layer_file(tmp, i)))
        (tmp / MANIFEST).write_text(json.dumps(identity, indent=2))
    return expert_dir


class ExpertStore:
    """The expert files of one model, checked whole when opened (manifest, every file present,
    every tensor present with its shape, no file shorter than its header says)."""

    def __init__(self, expert_dir: str | Path, cfg: ModelConfig) -> None:
        self.dir = Path(expert_dir)
        identity = model_identity(cfg)
        manifest = self.dir / MANIFEST
        if not manifest.is_file():
            raise FileNotFoundError(
                f"{self.dir} is not an expert directory: it has no {MANIFEST} "
                "(write one with moekit.inference.write_expert_files)"
            )
        found = read_json(manifest, REWRITE_EXPERTS, expect=dict)
        if found != identity:
            raise ValueError(
                f"the experts in {self.dir} belong to another model: {found} != {identity}"
            )
        moe = cfg.moe
        n_in = 2 if moe.gated else 1
        shapes = {"w_in": [n_in * moe.d_expert, moe.d_model], "w_out": [moe.d_model, moe.d_expert]}
        self.headers = [
            _check_file(layer_file(self.dir, i), moe.n_experts, shapes)
            for i in range(identity["n_layers"])
        ]
        self.expert_bytes = max(
            sum(b - a for k, v in h.items() if k.startswith("0.") for a, b in [v["data_offsets"]])
            for h, _ in self.headers
        )

    def load(self, key: Key) -> tuple[Tensor, Tensor]:
        """Expert key = (moe_layer, expert) -> (w_in, w_out), read from disk."""
        layer, e = key
        header, start = self.headers[layer]
        with layer_file(self.dir, layer).open("rb", buffering=0) as f:
            return read_tensor(f, start, header[f"{e}.w_in"]), read_tensor(
                f, start, header[f"{e}.w_out"]
            )

    def files(self) -> list[Path]:
        return sorted(self.dir.glob("layer-*.safetensors"))


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def read_tensor(f: BinaryIO, data_start: int, entry: dict, index: int | None = None) -> Tensor:
    """The tensor of header `entry` in the open safetensors file f whose data begin at
    `data_start` (with `index`: its index-th slice along the first axis), read from the disk
    straight into memory of its own with one read. Not through a memory map: a cold mapped file
    is read a page fault at a time, about 10x slower per expert on this project's machine."""
    start, end = entry["data_offsets"]
    shape = entry["shape"]
    if index is not None:
        step = (end - start) // shape[0]
        start, shape = start + index * step, shape[1:]
    out = torch.empty(shape, dtype=_DTYPES[entry["dtype"]])
    buffer = out.view(torch.uint8).numpy()
    f.seek(data_start + start)
    if f.readinto(buffer) != buffer.nbytes:
        raise ValueError(f"{f.name} is truncated: a tensor ends past the end of the file")
    return out


def _read_header(path: Path, remedy: str = REWRITE_EXPERTS) -> tuple[dict, int]:
    """A safetensors file's header and where its data begin; raises, saying `remedy`, if the
    file is missing, short or unreadable."""
    if not path.is_file():
        raise FileNotFoundError(f"expert file {path} is missing; {remedy}")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else size
        try:
            header = json.loads(f.read(n)) if 8 + n <= size else None
        except ValueError:
            header = None
    if header is None:
        raise ValueError(f"{path} is truncated or corrupt: its header is unreadable; {remedy}")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise ValueError(
            f"{path} is truncated: {size} bytes, its header needs {8 + n + end}; {remedy}"
        )
    return header, 8 + n


def _check_shape(path: Path, header: dict, name: str, shape: list[int]) -> None:
    entry = header.get(name)
    if entry is None or entry["shape"] != shape:
        raise ValueError(
            f"expert file {path}: tensor '{name}' should have shape {shape}, "
            f"found {None if entry is None else entry['shape']}"
        )


def _check_file(path: Path, n_experts: int, shapes: dict[str, list[int]]) -> tuple[dict, int]:
    """Raise if the file is missing, short or lacks a tensor; return `_read_header`'s answer."""
    header, start = _read_header(path)
    for e in range(n_experts):
        for name, shape in shapes.items():
            _check_shape(path, header, f"{e}.{name}", shape)
    return header, start


class CheckpointExpertStore:
    """The routed experts inside a checkpoint's safetensors file (each MoE layer's stacked
    (E, ., .) `w_in` and `w_out`), read one expert at a time (`read_tensor`): a slice of the
    file, never the whole tensor. The file is checked when the store is made."""

    def __init__(self, path: str | Path, model: MoETransformer) -> None:
        self.path = Path(path)
        self.keys = routed_expert_keys(model)
        moe = model.cfg.moe
        n_in = 2 if moe.gated else 1
        E, F_, D = moe.n_experts, moe.d_expert, moe.d_model
        header, self.data_start = _read_header(self.path, checkpoint_remedy(self.path.parent))
        for w_in, w_out in self.keys:
            _check_shape(self.path, header, w_in, [E, n_in * F_, D])
            _check_shape(self.path, header, w_out, [E, D, F_])
        self.entries = [(header[w_in], header[w_out]) for w_in, w_out in self.keys]
        a, b = header[w_in]["data_offsets"]
        c, d = header[w_out]["data_offsets"]
        self.expert_bytes = (b - a + d - c) // E

    def load(self, key: Key) -> tuple[Tensor, Tensor]:
        """Expert key = (moe_layer, expert) -> (w_in, w_out), read from the file."""
        layer, e = key
        w_in, w_out = self.entries[layer]
        with self.path.open("rb", buffering=0) as f:
            return read_tensor(f, self.data_start, w_in, e), read_tensor(
                f, self.data_start, w_out, e
            )

    def files(self) -> list[Path]:
        return [self.path]


def routed_expert_keys(model: MoETransformer) -> list[tuple[str, str]]:
    """The state_dict keys of each MoE layer's routed expert weights (w_in, w_out), in order."""
    names = [n for n, m in model.named_modules() if isinstance(m, MoELayer)]
    return [(f"{n}.experts.w_in", f"{n}.experts.w_out") for n in names]


def expert_groups(experts: list[int], capacity: int, selected: bool) -> list[list[int]]:
    """The groups in which one MoE layer call fetches its distinct experts (ascending) from a
    cache of `capacity`, each group pinned together, in order: all at once when they fit; else,
    on the dispatch path (a prefill), chunks of `capacity`; on the selected path
    (`MoELayer.selected_path`: a decode step, few tokens), one expert at a time.

    `OffloadedExperts` fetches by these groups and `moekit cache-sim` replays them, so the two
    count the same hits."""
    if len(experts) <= capacity:
        return [list(experts)] if experts else []
    step = 1 if selected else capacity
    return [list(experts[i : i + step]) for i in range(0, len(experts), step)]


class OffloadedExperts(nn.Module):
    """Drop-in for `Experts` whose weights come from an `ExpertCache`, fetched in the groups of
    `expert_groups`; biases (small) stay resident."""

    def __init__(self, experts: nn.Module, layer: int, cache: ExpertCache) -> None:
        super().__init__()
        self.cfg: MoEConfig = experts.cfg
        self.layer, self.cache = layer, cache
        self.b_in = None if experts.b_in is None else experts.b_in.detach().clone()
        self.b_out = None if experts.b_out is None else experts.b_out.detach().clone()
        w_out = experts.w_out
        self._probe = torch.empty((1, *w_out.shape[1:]), dtype=w_out.dtype, device="meta")

    def forward(self, x_RD: Tensor, counts_E: Tensor) -> Tensor:
        """x_RD (R, D) rows sorted by expert, counts_E (E,) rows per expert -> y_RD (R, D)."""
        counts = counts_E.tolist()
        active = [e for e, c in enumerate(counts) if c]
        if not active:
            return x_RD.new_zeros(x_RD.shape[0], self.cfg.d_model)
        matmul = GROUPED_MATMULS[resolve_impl(self.cfg.expert_impl, x_RD, self._probe)]
        starts = [0, *torch.tensor(counts).cumsum(0).tolist()]
        pieces = []
        for chunk in expert_groups(active, self.cache.capacity, selected=False):
            rows = x_RD[starts[chunk[0]] : starts[chunk[-1] + 1]]
            pieces.append(self._compute(rows, chunk, counts_E[chunk], matmul))
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

    def _compute(self, x_RD: Tensor, chunk: list[int], counts_A: Tensor, matmul) -> Tensor:
        with self.cache.using([(self.layer, e) for e in chunk]) as weights:
            w_in = torch.stack([w[0] for w in weights])
            w_out = torch.stack([w[1] for w in weights])
        h = matmul(x_RD, w_in, counts_A)
        if self.b_in is not None:
            h = h + torch.repeat_interleave(self.b_in[chunk], counts_A, dim=0)
        c = self.cfg
        act = (
            swiglu(h)
            if c.activation == "swiglu"
            else activate(h, c.activation, c.swiglu_alpha, c.swiglu_limit)
        )
        y = matmul(act, w_out, counts_A)
        if self.b_out is not None:
            y = y + torch.repeat_interleave(self.b_out[chunk], counts_A, dim=0)
        return y

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
                return self._ffn(e, *fetched[e], x_ND)

            return selected_experts_forward(x_TD, ids_TK, weights_TK, expert)

    def _ffn(self, e: int, w_in: Tensor, w_out: Tensor, x_ND: Tensor) -> Tensor:
        b_in = None if self.b_in is None else self.b_in[e]
        b_out = None if self.b_out is None else self.b_out[e]
        return expert_ffn(x_ND, w_in, w_out, b_in, b_out, self.cfg)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, experts={self.cfg.n_experts}, offloaded"


def resolve_budget(
    budget: int | float | str, n_total: int, expert_bytes: int | None, top_k: int
) -> int:
    """A budget as a number of experts: an int is a count, a float in (0, 1] or "N%" a fraction of
    all experts, "N[K|M|G]B" (or "NKiB" ...) bytes (refused where `expert_bytes` is None: a
    routing trace knows no sizes). Below top_k experts nothing can run."""
    count = _parse_budget(budget, n_total, expert_bytes)
    if count < top_k:
        size = "" if expert_bytes is None else f"{top_k * expert_bytes:,} bytes, "
        raise ValueError(
            f"expert budget {budget!r} holds {count} experts; the minimum is top_k={top_k} "
            f"({size}{top_k / n_total:.1%} of the {n_total} experts)"
        )
    return min(count, n_total)


_UNITS = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "KI": 2**10, "MI": 2**20, "GI": 2**30}


def _parse_budget(budget: int | float | str, n_total: int, expert_bytes: int | None) -> int:
    given = budget
    forms = "a count (12) or a fraction (0.5 or 50%)"
    if expert_bytes is not None:
        forms = "a count (12), a fraction (0.5 or 50%) or bytes (200MB)"
    if isinstance(budget, str):
        text = budget.strip()
        m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([KMG]I?)?B", text, re.IGNORECASE)
        if m and expert_bytes is None:
            raise ValueError(
                f"expert budget {budget!r} is in bytes, but a routing trace does not know the "
                "experts' size: give a count (12) or a fraction (0.5 or 50%)"
            )
        if m:
            return int(float(m[1]) * _UNITS[(m[2] or "").upper()]) // expert_bytes
        try:
            if text.endswith("%"):
                budget = float(text[:-1]) / 100
            else:
                budget = int(text) if text.isdigit() else float(text)
        except ValueError:
            raise ValueError(f"expert budget {given!r} is invalid: give {forms}") from None
    if isinstance(budget, bool) or not isinstance(budget, int | float):
        raise ValueError(f"expert budget {budget!r} is invalid: must be an int, float or str")
    if budget < 0 or budget != budget:  # negative, or NaN
        raise ValueError(f"expert budget {given!r} is invalid: give {forms}")
    if isinstance(budget, float):
        if not 0 < budget <= 1:
            raise ValueError(f"expert budget {given!r} is invalid: a fraction must be in (0, 1]")
        return int(budget * n_total)
    return budget


def check_budget_form(budget: str, in_bytes: bool = True) -> str:
    """`budget` if `resolve_budget` can read it (before the model's sizes are known); raises
    ValueError saying what forms it takes otherwise. For command-line arguments."""
    _parse_budget(budget, 1, 1 if in_bytes else None)
    return budget


@dataclass
class ExpertOffload:
    """A model's offloading: its cache (statistics in `stats()`), store and prefetch hooks
    (`prefetching`: whether prefetch runs; it stands down at a budget of top_k experts)."""

    cache: ExpertCache
    store: ExpertStore | CheckpointExpertStore
    hooks: list = field(default_factory=list)
    prefetching: bool = False

    def stats(self) -> dict[str, float]:
        d = self.cache.stats.as_dict()
        d.update(capacity=self.cache.capacity, expert_bytes=self.store.expert_bytes)
        return d

    def reset_stats(self) -> None:
        self.cache.stats = CacheStats()

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
    """Replace each MoE layer's experts by `OffloadedExperts` reading from `expert_dir` (written
    by `write_expert_files`), or from a `CheckpointExpertStore`, through one `ExpertCache` of
    `budget` experts (see `resolve_budget`).

    policy: "lru", "lfu" or "static" (keeps the most used experts of `expert_counts`
    (n_moe_layers, n_experts), e.g. from a routing trace). prefetch: before each MoE layer, run
    the next MoE layer's router on this layer's input and load its experts in a background thread
    (`_prefetch_hook`). At a budget of top_k experts every layer call fills the cache, so every
    guess would be evicted unused: prefetch then stands down for good, with one warning.
    Everything is checked before the model is changed.
    """
    store = expert_dir
    if not isinstance(store, CheckpointExpertStore):
        store = ExpertStore(expert_dir, model.cfg)
    moe = model.cfg.moe
    layers = model.moe_layers()
    n_total = len(layers) * moe.n_experts
    capacity = resolve_budget(budget, n_total, store.expert_bytes, moe.top_k)
    counts = None
    if expert_counts is not None:
        counts = {(i, e): int(c) for (i, e), c in _enumerate2(expert_counts)}
    pol = make_policy(policy, counts, n_static=capacity - moe.top_k)
    cache = ExpertCache(store.load, capacity, pol, store.expert_bytes)
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
        for i, (layer, nxt) in enumerate(itertools.pairwise(layers)):
            offload.hooks.append(layer.register_forward_pre_hook(_prefetch_hook(i, nxt, cache)))
    return offload


def _enumerate2(t: Tensor):
    for i, row in enumerate(t.tolist()):
        for e, c in enumerate(row):
            yield (i, e), c


def _prefetch_hook(layer: int, next_layer: nn.Module, cache: ExpertCache):
    """Guess the next MoE layer's experts from this layer's input (its router applied to the
    current hidden state: Eliseev & Mazur 2023, "Fast inference of MoE language models with
    offloading") and start loading them."""

    def hook(module: nn.Module, args: tuple) -> None:
        x_TD = args[0].reshape(-1, next_layer.cfg.d_model)
        with torch.no_grad():
            ids = next_layer.router(x_TD).ids_TK
        if ids is not None:
            keys = [(layer + 1, int(e)) for e in ids.unique().tolist()]
            cache.prefetch(keys, protect_layer=layer)

    return hook


def drop_from_page_cache(paths: list[Path]) -> None:
    """Ask the OS to forget these files' cached pages, so the next reads come from disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def load_offloaded(
    path: str | Path, cfg: ModelConfig, **offload: Any
) -> tuple[MoETransformer, ExpertOffload]:
    """The model of `cfg` with the weights of the safetensors file `path` (a checkpoint's
    model.safetensors), its routed experts left in the file: the model is built on the meta
    device, everything else is read into memory, and the experts are read one at a time through
    `apply_expert_offload(..., **offload)`. The whole model is never in memory. Eval mode."""
    with torch.device("meta"):
        model = MoETransformer(cfg)
    store = CheckpointExpertStore(path, model)  # checks the file before anything is read
    routed = {key for pair in store.keys for key in pair}
    with open_safetensors(path, checkpoint_remedy(Path(path).parent)) as f:
        # clone: safetensors hands out views of its memory map, which would keep the file mapped
        state = {k: f.get_tensor(k).clone() for k in f.keys() if k not in routed}  # noqa: SIM118
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if set(missing) != routed or unexpected:
        raise ValueError(
            f"{path} does not hold this model's weights: missing {sorted(set(missing) - routed)}, "
            f"unexpected {sorted(unexpected)}"
        )
    for module in model.modules():
        for name, buf in module.named_buffers(recurse=False):
            if buf.is_meta:  # non-persistent state (the MoE layers' balance counts) starts at 0
                module.register_buffer(name, torch.zeros_like(buf, device="cpu"), persistent=False)
    return model.eval(), apply_expert_offload(model, store, **offload)


def format_stats(stats: dict[str, float]) -> str:
    """One line of cache statistics for people."""
    return (
        f"expert cache: {stats['capacity']} experts, hit rate {stats['hit_rate']:.1%} "
        f"({stats['hits']} hits, {stats['misses']} misses), "
        f"{stats['bytes_read'] / 1e6:,.1f} MB read, {stats['load_wait_s']:.2f} s waiting for loads"
        + (
            f", prefetch accuracy {stats['prefetch_accuracy']:.1%} of {stats['prefetched']}"
            if stats["prefetched"]
            else ""
        )
    )
