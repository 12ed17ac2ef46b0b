"""A decoded token through the whole model in one C call (moekit_decode_one_token): its embedding
row, every decoder block as `decode_block` runs one (moekit_block_one_token), the final norm and
the LM head, for generation's batch-1 steps (`moekit.model.generation.step_logits` asks
`model.one_token_decoder`, which `apply_decode_glue` sets to `one_token_decoder`).

Why: with each block one C call, a decode step still ran ~0.8 ms (int4) to ~1.2 ms (float32) of
Python between them on decode.py's 8-layer model on this project's machine: the forward's
embedding, masks and angles, each block's checks of its plan and its ctypes call of ~40 arguments,
the norm and head. Measured with the C calls timed inside real decoding, not stubbed out: the
weights streamed by each call evict the interpreter's own data, so its Python runs about three
times slower than in a loop that does nothing else (benchmarks/README.md, Decoding).

What the call reads is taken once, when generation's first decoded token asks for it: every block
must qualify for the one-call path with all its experts resident (`decode_block.resident_plan`),
nothing the call bypasses hooked (the model, embedding, norms, head, blocks and their modules);
the embedding a plain float32 nn.Embedding, the final norm the glue's, the head a decode-kernel
projection (or the tied embedding on the kernels' linear), the cache's layers float32 (1, KV, L,
hd) of one length. Otherwise `one_token_decoder` returns None and every step runs the model's
forward. The decoder keeps the model's tensors alive while it lives: a model changed during
`generate` (a `stream` callback replacing modules or adding hooks) is seen by the next call.
Each step's logits equal the glued forward's bit for bit, the same C functions on the same inputs
(tests/test_decode_step.py); a step it cannot run (a token id out of range, no room left, a
product's input that could not be prepared) returns None, and the forward runs that token again
from the start (the cache's length was not advanced).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch
from torch import Tensor, nn

from moekit.inference import decode_kernels
from moekit.inference.decode_block import resident_plan
from moekit.inference.decode_glue import _hooked, _library, _plain
from moekit.inference.decode_layers import float_ref, norm_args, ops_ready, projection_ref
from moekit.model.block import Block
from moekit.model.generation import KVCache
from moekit.model.transformer import MoETransformer

ROPE_CHUNK = 256  # positions whose rotary angles are computed at once (model._rope, as a forward)

_ptr = ctypes.c_void_p


class BlockPlan(ctypes.Structure):
    """decode_glue.c's block_plan: moekit_block_one_token's arguments but the token's."""

    _fields_ = [
        ("attn_norm", _ptr), ("attn_eps", ctypes.c_double), ("attn", _ptr),
        ("k_cache", _ptr), ("v_cache", _ptr),
        *((name, ctypes.c_int64) for name in ("max_len", "H", "KV", "hd")),
        ("scale", ctypes.c_float), ("window", ctypes.c_int64),
        ("ffn_norm", _ptr), ("ffn_eps", ctypes.c_double),
        ("router", _ptr), ("expert_bias", _ptr), ("K", ctypes.c_int64),
        ("sigmoid", ctypes.c_int32), ("normalize", ctypes.c_int32), ("scaling", ctypes.c_float),
        ("w_in", _ptr), ("w_out", _ptr), ("act", _ptr),
    ]  # fmt: skip


def _address(arg) -> int | None:
    """The address a ctypes argument of `decode_moe.resident_args` passes: byref(x), an array or
    a pointer; None stays None."""
    if arg is None:
        return None
    if isinstance(arg, ctypes._Pointer):
        return ctypes.cast(arg, ctypes.c_void_p).value
    return ctypes.addressof(getattr(arg, "_obj", arg))  # byref(x) holds x as _obj


def one_token_decoder(
    model: MoETransformer, cache: KVCache
) -> Callable[[Tensor], Tensor | None] | None:
    """A function next ids (1, 1) -> logits (1, vocab_size) that decodes one token continuing
    `cache` in one C call (or returns None for a step it cannot run), where the model and cache
    qualify (the module's docstring); else None."""
    if (
        torch.is_grad_enabled()
        or torch.compiler.is_compiling()
        or model.training
        or type(model).forward is not MoETransformer.forward
        or "forward" in model.__dict__
        or not ops_ready()
    ):
        return None
    embed, blocks = model.embed, list(model.layers)
    if not (
        type(embed) is nn.Embedding
        and embed.max_norm is None
        and decode_kernels.plain_matrix(embed.weight)
        and embed.weight.is_contiguous()
        and len(cache.layers) == len(blocks) > 0
        and all(type(b) is Block for b in blocks)
    ):
        return None
    V, D = embed.weight.shape
    norm = norm_args(model.norm, D)
    head_module = model.lm_head
    if head_module is None:
        tied = model.tied_head_linear is decode_kernels.linear
        head = float_ref(embed.weight.detach()) if tied else None
    else:
        head = projection_ref(head_module)
    plans = [resident_plan(b) for b in blocks]
    if (
        norm is None
        or head is None
        or (head.O, head.I) != (V, D)
        or any(p is None or p[1].q.I != D for p in plans)
        or _hooked(model, embed, model.norm, *blocks, *filter(None, [head_module]))
    ):
        return None
    layers = _cache_layers(model, cache)
    if layers is None:
        return None
    return _Decoder(model, cache, plans, layers, norm, head)


def _cache_layers(model: MoETransformer, cache: KVCache) -> list[tuple[Tensor, Tensor]] | None:
    """Each layer's (k, v) cache where all are float32 (1, KV, L, hd) of the layer's heads, one
    length L and as many positions filled."""
    out = []
    lengths = {c.length for c in cache.layers}
    for block, c in zip(model.layers, cache.layers, strict=True):
        k, v, attn = c.k_BKLd, c.v_BKLd, block.attn
        if not (
            _plain(k)
            and _plain(v)
            and k.shape == v.shape == (1, attn.n_kv_heads, k.shape[2], attn.head_dim)
            and attn.head_dim % 2 == 0
            and k.shape[2] == cache.layers[0].k_BKLd.shape[2]
        ):
            return None
        out.append((k, v))
    return out if len(lengths) == 1 else None


class _Decoder:
    """`one_token_decoder`'s function: the C call's arguments built once, a step's filled in."""

    def __init__(self, model, cache, plans, layers, norm, head) -> None:
        cfg = model.cfg
        self.model, self.cache_layers = model, cache.layers
        self.kept = (list(model.parameters()), list(model.buffers()), plans, layers, head)
        self.blocks = (BlockPlan * len(plans))()
        for i, (((attn_norm, ffn_norm), refs, moe, _), (k, v), block) in enumerate(
            zip(plans, layers, model.layers, strict=True)
        ):
            attn, window = block.attn, cfg.layer_window(i)
            router, bias, K, sigmoid, normalize, scaling, w_in, w_out, act = moe
            self.blocks[i] = BlockPlan(
                *attn_norm, ctypes.addressof(refs), k.data_ptr(), v.data_ptr(), k.shape[2],
                attn.n_heads, attn.n_kv_heads, attn.head_dim, attn.head_dim**-0.5,
                window if window is not None and window > 0 else 0,
                *ffn_norm, _address(router), bias, K, sigmoid, normalize, scaling,
                _address(w_in), _address(w_out), _address(act),
            )  # fmt: skip
        V, D = model.embed.weight.shape
        K = max(p[2][2] for p in plans)
        self.embed, self.row_bytes, self.V = model.embed.weight, D * 4, V
        self.room = min(layers[0][0].shape[2], cfg.max_seq_len)
        self.norm, self.head = norm, head
        self.scratch = torch.empty(max(p[3] for p in plans) + 3 * D)  # + xs (2 D), hidden (D)
        self.ids, self.weights = torch.empty(K, dtype=torch.int64), torch.empty(K)
        self.rope_start = self.rope_bytes = 0
        self.rope = self._rope_from(cache.layers[0].length)
        self.call = _library().moekit_decode_one_token

    def _rope_from(self, pos: int) -> tuple[Tensor, Tensor]:
        """The rotary angles (cos, sin), each (ROPE_CHUNK, hd / 2), of positions pos onwards: the
        model's own (each position's are the bits a one-position forward computes)."""
        rope = self.model._rope(pos, ROPE_CHUNK, self.embed.device)
        self.rope_start, self.rope_bytes = pos, rope[0].shape[1] * 4
        return rope

    def _angles(self, pos: int) -> tuple[int, int]:
        """The (cos, sin) pointers of position pos's rotary angles."""
        if not 0 <= pos - self.rope_start < ROPE_CHUNK:
            self.rope = self._rope_from(pos)
        at = (pos - self.rope_start) * self.rope_bytes
        return self.rope[0].data_ptr() + at, self.rope[1].data_ptr() + at

    def __call__(self, ids_BS: Tensor) -> Tensor | None:
        pos = self.cache_layers[0].length
        if ids_BS.shape != (1, 1) or pos >= self.room:
            return None
        token = int(ids_BS)
        if not 0 <= token < self.V:
            return None  # (the forward's embedding raises its IndexError)
        logits = torch.empty(1, self.V)
        s = self.scratch
        D = self.row_bytes // 4
        n = s.numel() - 3 * D
        status = self.call(
            ctypes.addressof(self.blocks),
            len(self.blocks),
            self.embed.data_ptr() + token * self.row_bytes,
            *self._angles(pos),
            pos,
            *self.norm,
            ctypes.byref(self.head),
            s.data_ptr(),
            s.data_ptr() + n * 4,
            self.ids.data_ptr(),
            self.weights.data_ptr(),
            s.data_ptr() + (n + 2 * D) * 4,
            logits.data_ptr(),
        )
        if status != 0:
            return None
        for layer in self.cache_layers:
            layer.length = pos + 1
        return logits


def decodes_in_one_call(model: MoETransformer) -> bool:
    """Whether `generate` decodes `model`'s batch-1 tokens in one C call each, as it stands (a
    benchmark's check): it gets a decoder for a fresh cache."""
    with torch.no_grad():
        return one_token_decoder(model, KVCache.for_model(model, 1, 1)) is not None
