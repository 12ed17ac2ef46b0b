"""A decoded token through the whole model in one C call (moekit_decode_tokens): its embedding
row, every decoder block as `decode_block` runs one (moekit_plan_one_token), the final norm and
the LM head, for generation's steps (`moekit.model.generation.step_logits` asks
`model.one_token_decoder`, which `apply_decode_glue` sets to `one_token_decoder`); a batch's step
(B <= 16 sequences, one position each) likewise, each block as its layer calls run it (two norms,
the C attention block, moekit_moe_tokens or a dense FFN's call, two residual adds).

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
projection (or the tied embedding on the kernels' linear), the cache's layers float32 of one
length ((B, KV, L, hd) keys and values; a latent attention's (B, 1, L, Rkv) latents and (B, 1, L,
rope) rotary keys), B <= 16 (above one, a step the layer calls would run in C too: `_rows_fit`).
Otherwise `one_token_decoder` returns None and every step runs the model's forward. Each step
checks again what a `stream` callback might change cheaply (a hook on any module, training or
gradient mode: that step runs the forward); the modules and tensors are those of the first decoded
token until `generate` returns (a module replaced meanwhile is seen by the next call), and the
decoder keeps those tensors alive while it lives.
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
from moekit.inference.decode_block import (
    BlockPlan,
    attention_width,
    block_forward,
    block_struct,
    cache_qualifies,
    resident_plan,
    scratch_floats,
    top_k,
)
from moekit.inference.decode_glue import (
    MAX_NORM_NUMBERS,
    _hooked,
    _library,
    _replaced,
    hook_dicts,
)
from moekit.inference.decode_kernels import MAX_ROWS
from moekit.inference.decode_layers import float_ref, norm_args, ops_ready, projection_ref
from moekit.model.block import Block, DenseFFN
from moekit.model.generation import KVCache
from moekit.model.transformer import MoETransformer

ROPE_CHUNK = 256  # positions whose rotary angles are computed at once (model._rope, as a forward)

_ptr = ctypes.c_void_p


Decoder = Callable[[Tensor], Tensor | None]  # next ids (B, 1) -> logits (B, V), or None


def one_token_decoder(model: MoETransformer, cache: KVCache) -> Decoder | None:
    """A function next ids (B, 1) -> logits (B, vocab_size) that decodes one position of the B
    <= 16 sequences of `cache` in one C call (or returns None for a step it cannot run), where the
    model and cache qualify (the module's docstring); else None."""
    if not (
        _no_grad_eval(model)
        and type(model).forward is MoETransformer.forward
        and "forward" not in model.__dict__
        and ops_ready()
    ):
        return None
    embed, blocks, head_module = model.embed, list(model.layers), model.lm_head
    called = (embed, model.norm, *filter(None, [head_module]))  # their forwards it replaces
    B = cache.layers[0].k_BKLd.shape[0] if cache.layers else 0
    if not (
        type(embed) is nn.Embedding
        and embed.max_norm is None
        and decode_kernels.plain_matrix(embed.weight)
        and embed.weight.is_contiguous()
        and not _replaced(*called)
        and all(type(b) is Block and _glued(b) for b in blocks)
        and len(cache.layers) == len(blocks) > 0
        and len({c.length for c in cache.layers}) == 1
        and 1 <= B <= MAX_ROWS
    ):
        return None
    V, D = embed.weight.shape
    norm = norm_args(model.norm, D)
    if head_module is None:
        tied = model.tied_head_linear is decode_kernels.linear
        head = float_ref(embed.weight.detach()) if tied else None
    else:
        head = projection_ref(head_module)
    plans = [resident_plan(b) for b in blocks]
    modules = tuple(model.modules())  # whose hooks it would bypass: each step checks them
    if (
        norm is None
        or head is None
        or (head.O, head.I) != (V, D)
        or any(p is None or attention_width(p[1]) != D for p in plans)
        or not all(_rows_fit(b, B, D) for b in blocks)
        or _hooked(*modules)
    ):
        return None
    pos = cache.layers[0].length
    rope = model._rope(pos, ROPE_CHUNK, embed.weight.device)
    first = (rope[0][:1], rope[1][:1])  # (1, hd / 2): the glue's check of a cache and angles
    if not all(cache_qualifies(b, c, B, first) for b, c in zip(blocks, cache.layers, strict=True)):
        return None
    return _Decoder(model, cache, plans, norm, head, modules, (pos, rope))


def _no_grad_eval(model: MoETransformer) -> bool:
    """Generation's mode, which the C call assumes: no gradient, eval mode, not traced."""
    return not (torch.is_grad_enabled() or torch.compiler.is_compiling() or model.training)


def _glued(block: Block) -> bool:
    """Whether the block's forward is the glue's one-call block (`apply_decode_glue`), whose
    work the C call does: not another forward put in its place."""
    return getattr(block.__dict__.get("forward"), "func", None) is block_forward


def _rows_fit(block: Block, B: int, D: int) -> bool:
    """Whether the layer calls run a step of B sequences of this block as the C call does: its
    norms' rows in C (`decode_glue.rms_norm`: the block's and the q/k norms' numbers at most
    MAX_NORM_NUMBERS above one row, where `block_tokens` runs them) and the MoE layer on its
    chosen experts (`MoELayer.selected_path`, which `moekit_moe_tokens` computes)."""
    attn, ffn = block.attn, block.ffn
    qk_norm = getattr(attn, "qk_norm", None)  # (latent attention has none; its C norms are C's)
    norms = (D, *([attn.n_heads * attn.head_dim] if qk_norm else []))
    dense_or_selected = type(ffn) is DenseFFN or ffn.selected_path(B, True)
    return dense_or_selected and (B == 1 or all(B * n <= MAX_NORM_NUMBERS for n in norms))


class _Decoder:
    """`one_token_decoder`'s function: the C call's arguments built once, a step's filled in."""

    def __init__(self, model, cache, plans, norm, head, modules, rope) -> None:
        cfg = model.cfg
        self.model, self.cache_layers, self.hooks = model, cache.layers, hook_dicts(*modules)
        layers = [(c.k_BKLd, c.v_BKLd) for c in cache.layers]
        self.kept = (list(model.parameters()), list(model.buffers()), plans, layers, head)
        self.blocks = (BlockPlan * len(plans))()
        rows = zip(plans, cache.layers, model.layers, strict=True)
        for i, (plan, layer, block) in enumerate(rows):
            window = cfg.layer_window(i)
            window = window if window is not None and window > 0 else 0  # (decode_window's)
            self.blocks[i] = block_struct(block, plan, layer, window)
        self.embed = model.embed.weight
        V, D = self.embed.shape
        B, K = layers[0][0].shape[0], max(1, *(top_k(p) for p in plans))
        self.B, self.V = B, V
        self.room = min(layers[0][0].shape[2], cfg.max_seq_len)
        self.norm, self.head = norm, head
        # float32 CPU buffers, as the embedding (whatever torch's default dtype and device)
        self.scratch = self.embed.new_empty(max(scratch_floats(b, B, D) for b in model.layers))
        self.xs, self.hidden = self.embed.new_empty(2 * B * D), self.embed.new_empty(B * D)
        self.ids, self.weights = torch.empty(B * K, dtype=torch.int64), self.embed.new_empty(B * K)
        self.rope_start, self.rope = rope
        self.rope_bytes = self.rope[0].shape[1] * 4
        self.call = _library().moekit_decode_tokens

    def _angles(self, pos: int) -> tuple[int, int]:
        """The (cos, sin) pointers of position pos's rotary angles: the model's own, computed for
        ROPE_CHUNK positions at a time (each position's are the bits a one-position forward
        computes)."""
        if not 0 <= pos - self.rope_start < ROPE_CHUNK:
            self.rope_start = pos
            self.rope = self.model._rope(pos, ROPE_CHUNK, self.embed.device)
        at = (pos - self.rope_start) * self.rope_bytes
        return self.rope[0].data_ptr() + at, self.rope[1].data_ptr() + at

    def __call__(self, ids_BS: Tensor) -> Tensor | None:
        pos, B = self.cache_layers[0].length, self.B
        if (
            ids_BS.shape != (B, 1)
            or ids_BS.dtype != torch.long
            or ids_BS.device.type != "cpu"
            or pos >= self.room
            or not _no_grad_eval(self.model)
            or any(self.hooks)  # `_hooked` (a stream callback's hook, say)
        ):
            return None
        if B == 1:
            low = high = int(ids_BS)
        else:
            ids_BS = ids_BS.contiguous()
            low, high = map(int, torch.aminmax(ids_BS))
        if not (low >= 0 and high < self.V):
            return None  # (the forward's embedding raises its IndexError)
        logits = self.embed.new_empty(B, self.V)
        status = self.call(
            ctypes.addressof(self.blocks),
            len(self.blocks),
            self.embed.data_ptr(),
            ids_BS.data_ptr(),
            B,
            *self._angles(pos),
            pos,
            *self.norm,
            ctypes.byref(self.head),
            self.scratch.data_ptr(),
            self.xs.data_ptr(),
            self.ids.data_ptr(),
            self.weights.data_ptr(),
            self.hidden.data_ptr(),
            logits.data_ptr(),
        )
        if status != 0:
            return None
        for layer in self.cache_layers:
            layer.length = pos + 1
        return logits


def decodes_in_one_call(model: MoETransformer, batch: int = 1) -> bool:
    """Whether `generate` decodes a position of `batch` sequences of `model` in one C call, as it
    stands (a benchmark's check): it gets a decoder for a fresh cache."""
    with torch.no_grad():
        return one_token_decoder(model, KVCache.for_model(model, batch, 1)) is not None
