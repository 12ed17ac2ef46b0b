"""Where offloaded experts are read from: an expert directory (one safetensors file per MoE layer,
keys "E.w_in" and "E.w_out", plus a manifest) or the stacked expert tensors of a checkpoint's
model.safetensors. Either store is checked whole when opened and then reads one expert at a time.

The `safetensors` library checks each file (a missing, truncated or corrupt one fails when the
store opens, naming the file and what to do); an expert is then read straight from its byte range
in the file (`read_tensor`), which is what the library has no call for.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors.torch import save_file
from torch import Tensor

from moekit.config import ModelConfig
from moekit.fileio import atomic_path
from moekit.inference.cache import Key
from moekit.interop.files import DTYPES
from moekit.model.transformer import MoETransformer
from moekit.moe import MoELayer
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
    """The expert files of one model, checked whole when opened (manifest, every file present
    and readable, every tensor present with its shape)."""

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
        self.headers = []
        for i in range(identity["n_layers"]):
            path = layer_file(self.dir, i)
            if not path.is_file():
                raise FileNotFoundError(f"expert file {path} is missing; {REWRITE_EXPERTS}")
            header, start = tensor_layout(path, REWRITE_EXPERTS)
            for e in range(moe.n_experts):
                for name, shape in shapes.items():
                    check_shape(path, header, f"{e}.{name}", shape)
            self.headers.append((header, start))
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


class CheckpointExpertStore:
    """The routed experts inside a checkpoint's safetensors file (each MoE layer's stacked
    (E, ., .) `w_in` and `w_out`), read one expert at a time (`read_tensor`): a slice of the
    file, never the whole tensor. The file is checked when the store is made; `remedy` says what
    to do about a damaged one."""

    def __init__(self, path: str | Path, model: MoETransformer, remedy: str) -> None:
        self.path = Path(path)
        self.keys = routed_expert_keys(model)
        moe = model.cfg.moe
        n_in = 2 if moe.gated else 1
        E, F_, D = moe.n_experts, moe.d_expert, moe.d_model
        header, self.data_start = tensor_layout(self.path, remedy)
        for w_in, w_out in self.keys:
            check_shape(self.path, header, w_in, [E, n_in * F_, D])
            check_shape(self.path, header, w_out, [E, D, F_])
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


def check_shape(path: Path, header: dict, name: str, shape: list[int]) -> None:
    entry = header.get(name)
    if entry is None or entry["shape"] != shape:
        raise ValueError(
            f"expert file {path}: tensor '{name}' should have shape {shape}, "
            f"found {None if entry is None else entry['shape']}"
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
