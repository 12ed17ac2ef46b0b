"""Declarative key maps: where each moekit tensor lives in a Hugging Face checkpoint.

A key map is a table `{moekit name template: Source}` (or a pair of sources: the hub's per-expert
layout first, transformers 5's fused layout second). Templates use `{i}` for the layer and `{e}`
for the expert. Each architecture's key map is in `archs/<arch>.py`, built from the pieces at the
end of this file. A `Source` names the checkpoint keys a tensor is made of and the `op` that joins
them; each op is a pair of functions, one reading a moekit tensor of a given shape from the
checkpoint as pieces (index, values) of at most one expert or one slice of rows each, which the
loader copies or quantizes into place, and one producing the checkpoint tensors from a moekit
tensor.

    copy            one key, the same tensor
    cat             k keys stacked on the first axis: [gate; up] of a fused shared FFN
    experts         per expert e, k keys stacked on the expert's first axis: experts.{e}.w1/w3
    transpose       one key holding the tensor with its last two axes swapped (GPT-OSS down_proj)
    interleaved_t   one key (E, D, 2F) with gate and up interleaved on the last axis (GPT-OSS
                    gate_up_proj; its (E, 2F) bias likewise, untransposed)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.config import ModelConfig
from moekit.userfiles import CheckpointReader


@dataclass(frozen=True)
class Source:
    """The checkpoint keys (templates) of one moekit tensor and how they join."""

    keys: tuple[str, ...]
    op: str = "copy"

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"op={self.op!r} is not one of {sorted(OPS)}")


KeyMap = dict[str, "Source | tuple[Source, Source]"]
LAYOUTS = ("per_expert", "fused")
_LAYER = re.compile(r"^layers\.(\d+)\.")
_MTP = re.compile(r"^mtp\.(\d+)\.")


def template_of(name: str, n_layers: int) -> tuple[str, int | None]:
    """ "layers.3.attn.q_proj.weight" -> ("layers.{i}.attn.q_proj.weight", 3). Depth k of the
    multi-token-prediction module is checkpoint layer n_layers + k (DeepSeek-V3's layer 61): its
    block's tensors take the layers' templates, its own ones "mtp.{i}.*":
    "mtp.0.block.attn_norm.weight" -> ("layers.{i}.attn_norm.weight", n_layers),
    "mtp.0.enorm.weight" -> ("mtp.{i}.enorm.weight", n_layers)."""
    mtp = _MTP.match(name)
    if mtp is not None:
        rest, layer = name[mtp.end() :], n_layers + int(mtp.group(1))
        if rest.startswith("block."):
            return "layers.{i}." + rest.removeprefix("block."), layer
        return "mtp.{i}." + rest, layer
    match = _LAYER.match(name)
    if match is None:
        return name, None
    return "layers.{i}." + name[match.end() :], int(match.group(1))


def placements(
    keymap: KeyMap, name: str, cfg: ModelConfig
) -> list[tuple[Source, list[str]]] | None:
    """(source, its checkpoint keys) of each layout the moekit tensor `name` of a model of `cfg`
    may take, per-expert (hub) first; None where `keymap` has no place for it."""
    template, layer = template_of(name, cfg.n_layers)
    if template not in keymap:
        return None
    entry = keymap[template]
    n_experts = cfg.moe.n_experts if cfg.moe is not None else 0
    layouts = entry if isinstance(entry, tuple) else (entry,)
    return [(s, checkpoint_keys(s, layer, n_experts)) for s in layouts]


def checkpoint_keys(source: Source, layer: int | None, n_experts: int) -> list[str]:
    """The concrete checkpoint keys of a source for one layer."""
    keys = []
    for template in source.keys:
        experts = range(n_experts) if "{e}" in template else [None]
        keys += [template.format(i=layer, e=e) for e in experts]
    return keys


# ---- ops: expected shapes, loading (checkpoint -> moekit) and saving (moekit -> checkpoint) ----


Shape = tuple[int, ...]
# One piece of a moekit tensor as a loader yields it: (where it goes: an index of the tensor's
# leading axes, the float values there), at most one expert or one slice of rows.
Piece = tuple[int | slice | tuple[int, slice], Tensor]


def expected_shapes(source: Source, ours: Shape, keys: list[str]) -> dict[str, Shape]:
    """{checkpoint key: required shape} of the `keys` of `source` for one moekit tensor of shape
    `ours`: what the op's saver makes of it (on the meta device)."""
    saved = OPS[source.op][1](torch.empty(ours, device="meta"), keys)
    return {key: tuple(t.shape) for key, t in saved}


def _load_copy(shape: Shape, keys: list[str], reader: CheckpointReader) -> Iterator[Piece]:
    if len(shape) >= 3:  # stacked experts (a fused layout's): one expert at a time
        for e in range(shape[0]):
            yield e, reader.read(keys[0], e)
        return
    for rows in reader.row_slices(keys[0]):
        yield rows, reader.read(keys[0], None if rows == slice(None) else rows)


def _load_cat(shape: Shape, keys: list[str], reader: CheckpointReader) -> Iterator[Piece]:
    n = shape[0] // len(keys)
    for p, key in enumerate(keys):
        yield slice(p * n, (p + 1) * n), reader.read(key)


def _load_experts(shape: Shape, keys: list[str], reader: CheckpointReader) -> Iterator[Piece]:
    n_experts = shape[0]
    parts = len(keys) // n_experts
    n = shape[1] // parts
    for e in range(n_experts):
        for p in range(parts):
            yield (e, slice(p * n, (p + 1) * n)), reader.read(keys[p * n_experts + e])


def _load_transpose(shape: Shape, keys: list[str], reader: CheckpointReader) -> Iterator[Piece]:
    for e in range(shape[0]):
        yield e, reader.read(keys[0], e).transpose(-1, -2)


def _load_interleaved(shape: Shape, keys: list[str], reader: CheckpointReader) -> Iterator[Piece]:
    f = shape[1] // 2
    for e in range(shape[0]):
        src = reader.read(keys[0], e)  # (D, 2F) or, for the bias, (2F,)
        for half, rows in ((0, slice(0, f)), (1, slice(f, 2 * f))):
            part = src[..., half::2]
            yield (e, rows), part.transpose(-1, -2) if src.dim() == 2 else part


def _save_copy(t: Tensor, keys: list[str]) -> Iterator[tuple[str, Tensor]]:
    yield keys[0], t


def _save_cat(t: Tensor, keys: list[str]) -> Iterator[tuple[str, Tensor]]:
    yield from zip(keys, t.chunk(len(keys), dim=0), strict=True)


def _save_experts(t: Tensor, keys: list[str]) -> Iterator[tuple[str, Tensor]]:
    n_experts = t.shape[0]
    parts = len(keys) // n_experts
    for p in range(parts):
        for e in range(n_experts):
            yield keys[p * n_experts + e], t[e].chunk(parts, dim=0)[p]


def _save_transpose(t: Tensor, keys: list[str]) -> Iterator[tuple[str, Tensor]]:
    yield keys[0], t.transpose(-1, -2).contiguous()


def _save_interleaved(t: Tensor, keys: list[str]) -> Iterator[tuple[str, Tensor]]:
    gate, up = t.chunk(2, dim=1)  # (E, F, D) each, or (E, F) for the bias
    if t.dim() == 3:
        gate, up = gate.transpose(1, 2), up.transpose(1, 2)
    yield keys[0], torch.stack([gate, up], dim=-1).flatten(-2)


Loader = Callable[[Shape, list[str], CheckpointReader], Iterator[Piece]]
Saver = Callable[[Tensor, list[str]], Iterator[tuple[str, Tensor]]]
OPS: dict[str, tuple[Loader, Saver]] = {
    "copy": (_load_copy, _save_copy),
    "cat": (_load_cat, _save_cat),
    "experts": (_load_experts, _save_experts),
    "transpose": (_load_transpose, _save_transpose),
    "interleaved_t": (_load_interleaved, _save_interleaved),
}


# ---- pieces the architectures' key maps are made of ----

LAYER = "model.layers.{i}."  # a decoder layer's prefix in every architecture
MLP = LAYER + "mlp."


def common_keys() -> KeyMap:
    """The embedding, final norm, LM head and each layer's two norms."""
    return {
        "embed.weight": Source(("model.embed_tokens.weight",)),
        "norm.weight": Source(("model.norm.weight",)),
        "lm_head.weight": Source(("lm_head.weight",)),
        "layers.{i}.attn_norm.weight": Source((LAYER + "input_layernorm.weight",)),
        "layers.{i}.ffn_norm.weight": Source((LAYER + "post_attention_layernorm.weight",)),
    }


_MHA = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")


def attention_keys(names: dict[str, str] | None = None) -> KeyMap:
    """Attention's projections and norms under `self_attn.`, weights and biases: `names` maps
    moekit's module names to the checkpoint's (default: multi-head attention's q/k/v/o
    projections and q/k norms, named alike). Only moekit's own tensors are looked up, so a norm's
    bias entry is never used (its norms have none)."""
    names = names or {n: n for n in _MHA}
    return {
        f"layers.{{i}}.attn.{ours}.{kind}": Source((f"{LAYER}self_attn.{theirs}.{kind}",))
        for ours, theirs in names.items()
        for kind in ("weight", "bias")
    }


def expert_keys(hub: str, fused: str, names: tuple[str, str, str]) -> KeyMap:
    """Routed experts: hub keys `{hub}experts.{e}.<gate|up|down>.weight`, fused keys
    `{fused}experts.gate_up_proj` and `down_proj`."""
    gate, up, down = (f"{hub}experts.{{e}}.{n}.weight" for n in names)
    return {
        "layers.{i}.ffn.experts.w_in": (
            Source((gate, up), "experts"),
            Source((fused + "experts.gate_up_proj",)),
        ),
        "layers.{i}.ffn.experts.w_out": (
            Source((down,), "experts"),
            Source((fused + "experts.down_proj",)),
        ),
    }


def mlp_keys() -> KeyMap:
    """A layer's FFN under `mlp.` as Qwen, OLMoE and DeepSeek-V3 store it: a dense layer's
    gate/up/down_proj, a MoE layer's router (`mlp.gate`) and experts (`mlp.experts.{e}.*`)."""
    return {
        **{
            f"layers.{{i}}.ffn.w_{part}.weight": Source((f"{MLP}{part}_proj.weight",))
            for part in ("gate", "up", "down")
        },
        "layers.{i}.ffn.router.weight": Source((MLP + "gate.weight",)),
        **expert_keys(MLP, MLP, ("gate_proj", "up_proj", "down_proj")),
    }


def shared_expert_keys(prefix: str) -> KeyMap:
    """The shared experts as one FFN at `prefix` (gate and up fused into our w_in)."""
    return {
        "layers.{i}.ffn.shared_experts.w_in.weight": Source(
            (prefix + "gate_proj.weight", prefix + "up_proj.weight"), "cat"
        ),
        "layers.{i}.ffn.shared_experts.w_out.weight": Source((prefix + "down_proj.weight",)),
    }
