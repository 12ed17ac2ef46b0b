"""Where offloaded experts are read from: an expert directory (one safetensors file per MoE layer,
keys "E.w_in" and "E.w_out", plus a manifest) or the stacked expert tensors of a checkpoint's
model.safetensors. Either store is checked whole when opened (the `safetensors` library checks
each file: a missing, truncated or corrupt one fails naming the file and what to do) and then
reads one expert at a time, straight from its byte range (`read_tensor`). Quantized experts are
read as stored ("w_in_data", "w_in_scales", ...: `stored_experts`), as `QuantizedWeight`s, so a
miss reads the quantized bytes (int4: 4.5 bits a weight against float32's 32).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from moekit.config import ModelConfig
from moekit.experts import Experts
from moekit.fileio import atomic_path
from moekit.inference.cache import ExpertWeight, Key
from moekit.model.transformer import MoETransformer
from moekit.quant.modules import QuantizedExperts
from moekit.quant.schemes import QuantizedWeight
from moekit.userfiles import DTYPES, open_safetensors, read_json

MANIFEST = "manifest.json"
REWRITE_EXPERTS = "write the expert directory again (write_expert_files)"
WEIGHTS = ("w_in", "w_out")  # an expert's two weights, in the order a store's `load` gives them
# How a layer's experts are stored: weight -> (scheme or None for float, its tensors' names).
Layout = dict[str, tuple[str | None, tuple[str, ...]]]


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


def stored_experts(experts: nn.Module) -> dict[str, tuple[str | None, dict[str, Tensor]]]:
    """How one MoE layer's routed experts are stored: weight ("w_in", "w_out") -> (its quantization
    scheme, None for float; {its tensors' names under the experts module: the stacked (E, ...)
    tensor}). `Experts`: {"w_in": (None, {"w_in": ...}), ...}; `QuantizedExperts` (a quantized
    run's, `moekit quantize`): {"w_in": ("int4", {"w_in_data": ..., "w_in_scales": ...}), ...}."""
    if isinstance(experts, QuantizedExperts):
        pairs = zip(WEIGHTS, experts.quantized_weights(), strict=True)
        return {w: (qw.scheme, {f"{w}_{k}": t for k, t in qw.tensors().items()}) for w, qw in pairs}
    if isinstance(experts, Experts):
        return {w: (None, {w: getattr(experts, w)}) for w in WEIGHTS}
    raise TypeError(
        f"{type(experts).__name__} holds no routed experts in memory to offload or write "
        "(experts already offloaded?): give a model with Experts or QuantizedExperts"
    )


def layout_of(stored: dict[str, tuple[str | None, dict[str, Tensor]]]) -> Layout:
    """`stored_experts`'s answer without the tensors (which offloading is to free)."""
    return {w: (scheme, tuple(stacked)) for w, (scheme, stacked) in stored.items()}


def directory_identity(model: MoETransformer) -> dict[str, Any]:
    """What an expert directory's manifest holds: `model_identity`, plus the schemes of quantized
    experts (a float directory cannot serve a quantized model, nor the reverse)."""
    identity = model_identity(model.cfg)
    layers = model.moe_layers(with_mtp=True)
    schemes = {w: scheme for w, (scheme, _) in stored_experts(layers[0].experts).items()}
    if any(schemes.values()):
        identity["quantized"] = schemes
    return identity


def write_expert_files(model: MoETransformer, expert_dir: str | Path) -> Path:
    """Write the routed experts of every MoE layer, the main model's then its MTP blocks' (a draft
    token reads them as a verified one reads the main layers'; DeepSeek-V3's MTP block alone
    holds 256 experts; expert files and cache keys number them in this order), as
    `layer-NNN.safetensors` (keys "E.<name>", the names of `stored_experts`) plus a manifest,
    atomically."""
    expert_dir = Path(expert_dir)
    identity = directory_identity(model)
    with atomic_path(expert_dir) as tmp:
        tmp.mkdir()
        for i, layer in enumerate(model.moe_layers(with_mtp=True)):
            tensors = {}
            for _, stacked in stored_experts(layer.experts).values():
                for name, t_E in stacked.items():
                    for e in range(t_E.shape[0]):
                        tensors[f"{e}.{name}"] = t_E[e].detach().contiguous().cpu()
            save_file(tensors, str(layer_file(tmp, i)))
        (tmp / MANIFEST).write_text(json.dumps(identity, indent=2))
    return expert_dir


class ExpertStore:
    """The expert files of one model, checked whole when opened (manifest, every file present
    and readable, every tensor present with its shape; a quantized model's with its dtype too).
    `load` gives one expert's (w_in, w_out): tensors, or `QuantizedWeight`s for quantized
    experts. expert_bytes: one expert's stored bytes; stored_as: their format ("float32",
    "int4", ...)."""

    def __init__(self, expert_dir: str | Path, model: MoETransformer) -> None:
        self.dir = Path(expert_dir)
        identity = directory_identity(model)
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
        self.layouts, self.headers = [], []
        for i, layer in enumerate(model.moe_layers(with_mtp=True)):
            path = layer_file(self.dir, i)
            if not path.is_file():
                raise FileNotFoundError(f"expert file {path} is missing; {REWRITE_EXPERTS}")
            header, start = tensor_layout(path, REWRITE_EXPERTS)
            stored = stored_experts(layer.experts)
            for scheme, stacked in stored.values():
                for name, t_E in stacked.items():
                    for e in range(t_E.shape[0]):
                        check_tensor(path, header, f"{e}.{name}", t_E[0], scheme is not None)
            self.layouts.append(layout_of(stored))
            self.headers.append((header, start))
        firsts = [self._entries(i, 0) for i in range(len(self.layouts))]
        self.expert_bytes = max(sum(map(_span, entries.values())) for entries in firsts)
        self.stored_as = stored_format(self.layouts[0], firsts[0])

    def _entries(self, layer: int, e: int) -> dict[str, dict]:
        """{tensor name ("w_in", "w_in_data", ...): its header entry} of expert e of `layer`."""
        header = self.headers[layer][0]
        return {n: header[f"{e}.{n}"] for _, t in self.layouts[layer].values() for n in t}

    def load(self, key: Key) -> tuple[ExpertWeight, ...]:
        """Expert key = (moe_layer, expert) -> (w_in, w_out), read from disk."""
        layer, e = key
        with layer_file(self.dir, layer).open("rb", buffering=0) as f:
            return read_expert(
                f, self.headers[layer][1], self.layouts[layer], self._entries(layer, e)
            )

    def files(self) -> list[Path]:
        return sorted(self.dir.glob("layer-*.safetensors"))


class CheckpointExpertStore:
    """The routed experts inside a checkpoint's safetensors file (each MoE layer's stacked
    (E, ., .) `w_in` and `w_out`; a quantized run's `w_in_data`, `w_in_scales`, ...), each read as
    a slice of the file. `model` (on the meta device will do) says which tensors and shapes to
    expect; `remedy` what to do about a damaged file. `load`, expert_bytes and stored_as as
    `ExpertStore`'s."""

    def __init__(self, path: str | Path, model: MoETransformer, remedy: str) -> None:
        model_identity(model.cfg)  # a model without MoE layers has no experts to offload
        self.path = Path(path)
        header, self.data_start = tensor_layout(self.path, remedy)
        self.layouts, self.entries, self.routed_keys = [], [], set()
        names = {id(m): n for n, m in model.named_modules()}
        for layer in model.moe_layers(with_mtp=True):
            layer_name = names[id(layer)]
            stored, entries = stored_experts(layer.experts), {}
            for scheme, stacked in stored.values():
                for name, t_E in stacked.items():
                    key = f"{layer_name}.experts.{name}"
                    check_tensor(self.path, header, key, t_E, scheme is not None)
                    entries[name] = header[key]
                    self.routed_keys.add(key)
            self.layouts.append(layout_of(stored))
            self.entries.append(entries)
        E = model.cfg.moe.n_experts
        self.expert_bytes = max(sum(_span(v) // E for v in e.values()) for e in self.entries)
        self.stored_as = stored_format(self.layouts[0], self.entries[0])

    def load(self, key: Key) -> tuple[ExpertWeight, ...]:
        """Expert key = (moe_layer, expert) -> (w_in, w_out), read from the file."""
        layer, e = key
        with self.path.open("rb", buffering=0) as f:
            return read_expert(f, self.data_start, self.layouts[layer], self.entries[layer], e)

    def files(self) -> list[Path]:
        return [self.path]


def read_expert(
    f: BinaryIO, data_start: int, layout: Layout, entries: dict[str, dict], index: int | None = None
) -> tuple[ExpertWeight, ...]:
    """One expert's (w_in, w_out) from the open file f: each tensor of `layout` (`stored_experts`)
    read from its header entry in `entries` (with `index`: that slice of a stacked tensor); a
    quantized weight as a `QuantizedWeight` of its scheme."""
    weights = []
    for w, (scheme, names) in layout.items():
        read = {n: read_tensor(f, data_start, entries[n], index) for n in names}
        if scheme is None:
            weights.append(read[w])
        else:
            weights.append(
                QuantizedWeight(scheme, **{n.removeprefix(f"{w}_"): t for n, t in read.items()})
            )
    return tuple(weights)


def stored_format(layout: Layout, entries: dict[str, dict]) -> str:
    """The experts' stored format for people: their scheme ("int4") or, float, the file's dtype
    ("float32"); "w_in int4, w_out int8" where the weights differ."""
    formats = {
        w: scheme or str(DTYPES[entries[next(iter(stacked))]["dtype"]]).removeprefix("torch.")
        for w, (scheme, stacked) in layout.items()
    }
    if len(set(formats.values())) == 1:
        return next(iter(formats.values()))
    return ", ".join(f"{w} {f}" for w, f in formats.items())


def _span(entry: dict) -> int:
    start, end = entry["data_offsets"]
    return end - start


def tensor_layout(path: Path, remedy: str) -> tuple[dict, int]:
    """A safetensors file's header ({name: {"dtype", "shape", "data_offsets"}}) and where its
    data begin, once the library has checked the file (a truncated or corrupt one raises,
    saying `remedy`)."""
    with open_safetensors(path, remedy):
        pass
    # Read by hand only for the byte offsets, which the library does not expose (`read_tensor`).
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)), 8 + n


def check_tensor(path: Path, header: dict, name: str, like: Tensor, exact_dtype: bool) -> None:
    """The tensor `name` of a file's header has the shape of `like` and, with `exact_dtype`
    (quantized tensors: the dtype is part of the scheme's layout), its dtype."""
    entry, shape = header.get(name), list(like.shape)
    if entry is None or entry["shape"] != shape:
        raise ValueError(
            f"expert file {path}: tensor '{name}' should have shape {shape}, "
            f"found {None if entry is None else entry['shape']}"
        )
    if exact_dtype and DTYPES.get(entry["dtype"]) != like.dtype:
        raise ValueError(
            f"expert file {path}: tensor '{name}' should be {like.dtype} as its quantization "
            f"scheme stores it, found {entry['dtype']}; write the quantized model again "
            "(moekit quantize)"
        )


def read_tensor(f: BinaryIO, data_start: int, entry: dict, index: int | None = None) -> Tensor:
    """The tensor of header `entry` in the open safetensors file f whose data begin at
    `data_start` (with `index`: its index-th slice along the first axis), read from the disk
    straight into memory of its own with one read. Not through the library's memory map: a cold
    mapped file is read a page fault at a time, about 10x slower per expert on this project's
    machine."""
    start, end = entry["data_offsets"]
    shape = entry["shape"]
    if index is not None:
        step = (end - start) // shape[0]
        start, shape = start + index * step, shape[1:]
    out = torch.empty(shape, dtype=DTYPES[entry["dtype"]])
    buffer = out.view(torch.uint8).numpy()
    f.seek(data_start + start)
    if f.readinto(buffer) != buffer.nbytes:
        raise ValueError(f"{f.name} is truncated: a tensor ends past the end of the file")
    return out
