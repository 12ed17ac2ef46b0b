"""A decoded token through a whole MoE decoder block in one C call (moekit_block_one_token):
x1 = x + attention(attn_norm(x)), out = x1 + moe(ffn_norm(x1)), swapped in for `Block.forward` by
`moekit.inference.decode_glue.apply_decode_glue`.

The layer calls of `decode_layers` and `decode_moe` left, per block and token, two RMSNorm module
calls, two residual adds and the attention and MoE modules' calls and checks around their C calls
(~100 us of Python a block on this project's machine); here they are one call and one set of
checks. It runs the same C functions (decode_glue.c's RMSNorm, attention block and MoE layer) on
the same inputs and adds as torch adds, so its result equals `Block.forward`'s bit for bit, which
runs wherever it does not qualify: batch above 1, prefill, aux wanted, shared experts or a dense
FFN, offloaded experts, a hook on any module it would bypass, anything `attention_refs` or
`decode_moe.resident_args` refuses (tests/test_decode_layers.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.inference.decode_glue import GlueRMSNorm, _hooked, _library, _plain
from moekit.inference.decode_layers import attention_args, attention_refs
from moekit.inference.decode_moe import _moe_qualifies, resident_args
from moekit.model.attention import AttentionMask, LayerKVCache
from moekit.model.block import Block
from moekit.moe import MoEAux, MoELayer


def _norm_args(norm, D: int) -> tuple[int, float] | None:
    """(weight pointer, eps) of a GlueRMSNorm over the last D numbers, or None."""
    w = norm.weight if type(norm) is GlueRMSNorm else None
    if w is None or norm.normalized_shape != (D,) or not _plain(w):
        return None
    return w.data_ptr(), torch.finfo(torch.float32).eps if norm.eps is None else norm.eps


def block_forward(
    block: Block,
    x_BSD: Tensor,
    rope: tuple[Tensor, Tensor],
    mask: AttentionMask,
    cache: LayerKVCache | None = None,
    token_ids_BS: Tensor | None = None,
    with_aux: bool = True,
) -> tuple[Tensor, MoEAux | None]:
    """`Block.forward` for one decoded token (batch 1) in one C call where it qualifies (see the
    module's docstring); `Block.forward` itself otherwise."""
    B, S, D = x_BSD.shape
    ffn = block.ffn
    plan = None
    if (
        B * S == 1
        and not with_aux
        and cache is not None
        and type(ffn) is MoELayer
        and ffn.shared_experts is None
        and not _hooked(block.attn_norm, block.attn, block.ffn_norm, ffn)
    ):
        norms = _norm_args(block.attn_norm, D), _norm_args(block.ffn_norm, D)
        refs = attention_refs(block.attn, x_BSD, rope, mask, cache)
        if None not in norms and refs is not None and _moe_qualifies(ffn, x_BSD, False, True):
            moe = resident_args(ffn)
            plan = None if moe is None else (norms, refs, moe)
    if plan is None:
        return Block.forward(block, x_BSD, rope, mask, cache, token_ids_BS, with_aux)
    assert cache is not None
    (attn_norm, ffn_norm), refs, moe = plan
    attn, cfg = block.attn, ffn.cfg
    E, K, F = cfg.n_experts, cfg.top_k, cfg.d_expert
    H, KV, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
    scratch = x_BSD.new_empty(4 * D + max((2 * H + 2 * KV) * hd, 2 * E + K * (2 * F + D)))
    ids, weights = (torch.empty(K, dtype=torch.int64), torch.empty(K))
    out = x_BSD.new_empty(1, 1, D)
    status = _library().moekit_block_one_token(
        x_BSD.data_ptr(),
        *attn_norm,
        refs,
        *attention_args(attn, rope, cache),
        *ffn_norm,
        *moe,
        scratch.data_ptr(),
        ids.data_ptr(),
        weights.data_ptr(),
        out.data_ptr(),
    )
    if status == -1:  # nothing written to the cache
        return Block.forward(block, x_BSD, rope, mask, cache, token_ids_BS, with_aux)
    cache.length += 1
    if status == -2:  # the attention step ran; the MoE layer's reference runs the rest
        x1 = scratch[2 * D : 3 * D].view(1, 1, D).clone()
        y, aux = ffn(block.ffn_norm(x1), None, with_aux=with_aux, decoding=True)
        return x1 + y, aux
    return out, None
