"""A decoded token through a whole MoE decoder block in one C call (moekit_plan_one_token, over
the block's `BlockPlan`): x1 = x + attention(attn_norm(x)), out = x1 + moe(ffn_norm(x1)), swapped
in for `Block.forward`; the attention grouped-query (`decode_layers`) or latent (`decode_mla`).

The layer calls of `decode_layers` and `decode_moe` left, per block and token, two RMSNorm calls,
two residual adds and the modules' calls and checks around their C calls (~100 us of Python a
block on this project's machine); here they are one call and one set of checks, over the same C
functions on the same inputs, so the result equals `Block.forward`'s bit for bit (shared experts
included: `decode_shared`; a dense FFN: `decode_dense`). That runs wherever this does not qualify:
batch above 1, prefill, aux wanted, a hook on any module it would bypass or a forward of its own
put in a module's place, anything `attention_weights`, `decode_mla.latent_weights`,
`decode_moe.resident_args`, `decode_shared.shared_ref` or `decode_dense.dense_ref` refuses
(tests/test_decode_layers.py, tests/test_decode_mla.py). A block of offloaded experts
(`decode_moe.offloaded_qualifies`) runs its attention half in one C call
(moekit_plan_attention_one_token), then its MoE layer as a module (routing in C, the chosen
experts fetched, then run in one call), then the residual add.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor, nn

from moekit.experts.experts import SharedExperts
from moekit.inference.decode_dense import (
    DenseRef,
    dense_floats,
    dense_forward,
    dense_modules,
    dense_ref,
)
from moekit.inference.decode_glue import (
    _cache_qualifies,
    _hooked,
    _library,
    _replaced,
    decode_position,
    decode_window,
)
from moekit.inference.decode_layers import (
    AttentionRef,
    _cached,
    _kept,
    attention_forward,
    attention_modules,
    attention_weights,
    norm_args,
    ops_ready,
)
from moekit.inference.decode_mla import (
    LatentRef,
    latent_attention_forward,
    latent_cache_qualifies,
    latent_floats,
    latent_modules,
    latent_weights,
)
from moekit.inference.decode_moe import (
    layer_floats,
    moe_forward,
    offloaded_qualifies,
    resident_args,
)
from moekit.inference.decode_shared import layer_shared_ref, shared_modules
from moekit.model.attention import Attention, AttentionMask, LayerKVCache
from moekit.model.block import Block, DenseFFN
from moekit.model.mla import LatentAttention
from moekit.moe import MoEAux, MoELayer

OFFLOADED = "offloaded"  # a plan's MoE part for offloaded experts: fetched after the attention half
_ptr = ctypes.c_void_p


class BlockPlan(ctypes.Structure):
    """decode_glue.c's block_plan: what moekit_plan_one_token and block_tokens read of a block
    (all but the token's x, angles, position, scratch and outputs): its norms, attention and KV
    cache, window and MoE layer; the latent attention's weights where the block has one (then
    attn is None and the caches are its latents' and rotary keys'); a dense FFN's where it has
    one (then the MoE fields are unread)."""

    _fields_ = [
        ("attn_norm", _ptr), ("attn_eps", ctypes.c_double), ("attn", _ptr),
        ("k_cache", _ptr), ("v_cache", _ptr),
        *((name, ctypes.c_int64) for name in ("max_len", "H", "KV", "hd")),
        ("scale", ctypes.c_float), ("window", ctypes.c_int64),
        ("ffn_norm", _ptr), ("ffn_eps", ctypes.c_double),
        ("router", _ptr), ("expert_bias", _ptr), ("K", ctypes.c_int64),
        ("sigmoid", ctypes.c_int32), ("normalize", ctypes.c_int32), ("scaling", ctypes.c_float),
        ("n_groups", ctypes.c_int64), ("topk_groups", ctypes.c_int64),
        ("w_in", _ptr), ("w_out", _ptr), ("act", _ptr), ("shared", _ptr), ("latent", _ptr),
        ("dense", _ptr),
    ]  # fmt: skip


def _address(arg) -> int | None:
    """The address a ctypes argument of `decode_moe.resident_args` passes: byref(x), an array or
    a pointer; None stays None."""
    if arg is None:
        return None
    if isinstance(arg, ctypes._Pointer):
        return ctypes.cast(arg, ctypes.c_void_p).value
    return ctypes.addressof(getattr(arg, "_obj", arg))  # byref(x) holds x as _obj


def block_struct(block: Block, plan: tuple, cache: LayerKVCache, window: int) -> BlockPlan:
    """The block_plan of a block (`_plan`'s plan) over this cache, attending its last `window`
    positions (0: all)."""
    (attn_norm, ffn_norm), refs, moe, _ = plan
    dense = moe if type(moe) is DenseRef else None
    if moe is OFFLOADED or dense:  # (then the call reads none of the MoE layer's fields)
        moe = (None, None, 0, 0, 0, 0.0, 1, 1, None, None, None, None)
    router, bias, K, sigmoid, normalize, scaling, groups, kept, w_in, w_out, act, shared = moe
    k, v, attn = cache.k_BKLd, cache.v_BKLd, block.attn
    latent = type(refs) is LatentRef
    heads = (0, 0, 0, 0.0) if latent else (attn.n_heads, attn.n_kv_heads, attn.head_dim,
                                           attn.head_dim**-0.5)  # fmt: skip
    return BlockPlan(
        *attn_norm, None if latent else ctypes.addressof(refs), k.data_ptr(), v.data_ptr(),
        k.shape[2], *heads, window, *ffn_norm, _address(router), bias, K, sigmoid, normalize,
        scaling, groups, kept, _address(w_in), _address(w_out), _address(act), _address(shared),
        ctypes.addressof(refs) if latent else None, dense and ctypes.addressof(dense),
    )  # fmt: skip


def attention_width(refs: AttentionRef | LatentRef) -> int:
    """The model width D the attention's weights read."""
    return refs.kv_a.I if type(refs) is LatentRef else refs.q.I


def cache_qualifies(block: Block, cache: LayerKVCache, B: int, rope: tuple) -> bool:
    """Whether the block's C attention reads `cache` for B sequences at these angles."""
    attn = block.attn
    if type(attn) is LatentAttention:
        return latent_cache_qualifies(attn, cache, B, rope)
    return _cache_qualifies(cache, B, attn.n_kv_heads, attn.head_dim, rope)


def _modules(block: Block) -> tuple[nn.Module, ...] | None:
    """The modules whose work the C call does, read from the modules' own dicts (cheap): the
    norms, the attention, the MoE layer, its router and experts, the attention's projections,
    and the MoE layer's shared experts' modules (`decode_shared.shared_modules`); of a dense FFN,
    in the router's and experts' places its gate and up projections, then its down one last."""
    own = block._modules
    attn, ffn = own["attn"], own["ffn"]
    if type(attn) not in (Attention, LatentAttention):
        return None
    if type(ffn) is MoELayer:
        f = ffn._modules
        shared = f.get("shared_experts")  # (a module, or None: an attribute, not in f)
        first, last = (f["router"], f["experts"]), () if shared is None else shared_modules(shared)
    elif type(ffn) is DenseFFN:
        _, gate, up, down = dense_modules(ffn)
        first, last = (gate, up), (down,)
    else:
        return None
    return (own["attn_norm"], attn, own["ffn_norm"], ffn, *first, *_attention_parts(attn), *last)


def _attention_parts(attn: nn.Module) -> tuple[nn.Module, ...]:
    """The projections (and norms) of a block's attention, grouped-query or latent."""
    return latent_modules(attn) if type(attn) is LatentAttention else attention_modules(attn)


def _bypassed(modules: tuple) -> tuple[nn.Module, ...]:
    """Of `_modules`, those the attention half's C call runs without calling them: the norms, the
    attention and its projections (and the shared experts' modules, which the MoE layer runs
    after it: a hook there keeps the whole block on its reference)."""
    return (*modules[:3], *modules[6:])


def _plan(block: Block, modules: tuple) -> tuple | None:
    """What the C call reads of the block's weights (norms, attention, MoE layer), or None if
    anything does not qualify; kept while the modules and their tensors stay."""
    attn, ffn = modules[1], modules[3]
    moe = type(ffn) is MoELayer
    extra = (
        *map(id, modules),
        # every module's own forward: the glue's on the attention and FFN, none on their parts
        *(m.__dict__.get("forward") for m in modules),
        *((ffn.training, modules[4].__dict__.get("linear"), modules[5].__dict__.get("expert_ffn"))
          if moe else ()),  # (the router's linear and the experts' FFN `resident_args` reads)
        *_attention_state(attn),
        # the norms' eps, an instance attribute: getattr(m, "eps", None) cost 8 us a block and
        # token in the modules' failing __getattr__ (three quarters of this check)
        *(m.__dict__.get("eps") for m in modules),
        # the shared experts' activation (`decode_shared.shared_ref` reads it)
        *(m.activation for m in modules if type(m) is SharedExperts),
    )  # fmt: skip
    return _cached(block, modules, lambda: _build_plan(block), extra)


def _attention_state(attn: Attention | LatentAttention) -> tuple:
    """What the attention's weights' refs read besides its modules' tensors."""
    if type(attn) is LatentAttention:
        return attn.scale, attn.m, attn.n_heads
    return attn.qk_norm, attn.clip_qkv, attn.sinks is None


def _unhooked_plan(block: Block, modules: tuple) -> tuple | None:
    """`_plan`, or None where a module the C call bypasses is hooked (the MoE layer, router and
    experts of offloaded experts are called as modules: their hooks run; an offload's prefetch
    hook is one)."""
    plan = _plan(block, modules)
    if plan is not None and _hooked(*(_bypassed(modules) if plan[2] is OFFLOADED else modules)):
        return None
    return plan


def resident_plan(block: Block) -> tuple | None:
    """What the one-call path reads of a block whose experts are all resident, its modules as
    they are now (the step's own conditions aside: `block_forward`'s), or None: (attention norm
    args, ffn norm args), its `AttentionRef`, `decode_moe.resident_args` and the shared experts'
    argument (byref of `decode_shared.shared_ref`, or None without them), the scratch floats."""
    modules = _modules(block)
    plan = None if modules is None else _unhooked_plan(block, modules)
    return None if plan is None or plan[2] is OFFLOADED else plan


def _glue_forwards(attn: Attention | LatentAttention, ffn: MoELayer | DenseFFN) -> bool:
    """Whether the attention and the FFN run the glue's forwards (`apply_decode_glue`'s), whose
    work the C call does: not another forward put in their place (nor the class's: the
    reference, a benchmark's contender)."""
    want = latent_attention_forward if type(attn) is LatentAttention else attention_forward
    ffn_want = dense_forward if type(ffn) is DenseFFN else moe_forward
    return (
        getattr(attn.__dict__.get("forward"), "func", None) is want
        and getattr(ffn.__dict__.get("forward"), "func", None) is ffn_want
    )


def _build_plan(block: Block) -> tuple | None:
    attn, ffn = block.attn, block.ffn
    parts = _attention_parts(attn)
    if type(ffn) is DenseFFN:
        parts = (*parts, *dense_modules(ffn)[1:])
    if not _glue_forwards(attn, ffn) or _replaced(block.attn_norm, block.ffn_norm, *parts):
        return None
    refs = latent_weights(attn) if type(attn) is LatentAttention else attention_weights(attn)
    if refs is None:
        return None
    D = attention_width(refs)
    norms = norm_args(block.attn_norm, D), norm_args(block.ffn_norm, D)
    moe = dense_ref(ffn) if type(ffn) is DenseFFN else _moe_plan(ffn)
    if None in norms or moe is None:
        return None
    return norms, refs, moe, scratch_floats(block, 1, D)


def _moe_plan(ffn: MoELayer) -> tuple | str | None:
    """The MoE layer as the block's call reads it: `decode_moe.resident_args` and its shared
    experts' ref (or None without them); OFFLOADED for offloaded experts; None otherwise."""
    moe = resident_args(ffn)
    if moe is None:  # offloaded: its MoE layer is called, and adds its shared experts itself
        return OFFLOADED if offloaded_qualifies(ffn) else None
    shared = layer_shared_ref(ffn)  # its shared experts in the same call, where it has any
    if shared is None and ffn.shared_experts is not None:
        return None
    return (*moe, None if shared is None else ctypes.byref(shared))


def scratch_floats(block: Block, rows: int, D: int) -> int:
    """The C block's scratch for `rows` sequences' position of width D (a block whose plan was
    built): decode_glue.c's block_tokens', which covers moekit_plan_one_token's at one: 4 D a
    row and the larger of the attention's and the FFN's."""
    attn = block.attn
    if type(attn) is LatentAttention:
        heads = latent_floats(attn, rows)
    else:
        heads = rows * (2 * attn.n_heads + 2 * attn.n_kv_heads) * attn.head_dim
    ffn = block.ffn
    ffn_floats = dense_floats(ffn, rows) if type(ffn) is DenseFFN else layer_floats(ffn, rows)
    return rows * 4 * D + max(heads, ffn_floats)


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
    B, _, D = x_BSD.shape
    modules = plan = None
    if B == 1 and not with_aux and decode_position(x_BSD, cache, mask):
        modules = _modules(block)
    if (
        modules is not None
        and not torch.is_grad_enabled()  # generation's no_grad: no gradient anywhere
        and ops_ready()
        and cache_qualifies(block, cache, B, rope)
    ):
        plan = _unhooked_plan(block, modules)
    if plan is None or attention_width(plan[1]) != D:
        return Block.forward(block, x_BSD, rope, mask, cache, token_ids_BS, with_aux)
    assert cache is not None
    moe, scratch = plan[2], x_BSD.new_empty(plan[3])
    if moe is not OFFLOADED:
        return _plan_one_token(block, plan, x_BSD, rope, mask, cache, token_ids_BS, scratch,
                               with_aux)  # fmt: skip
    # offloaded experts: the attention half in C; the MoE layer fetches its experts, then runs
    struct = block_struct(block, plan, cache, decode_window(mask))
    status = _library().moekit_plan_attention_one_token(
        ctypes.byref(struct), x_BSD.data_ptr(), rope[0].data_ptr(), rope[1].data_ptr(),
        cache.length, scratch.data_ptr(),
    )  # fmt: skip
    if status == -1:  # the step not counted in the cache: the reference writes it again
        return Block.forward(block, x_BSD, rope, mask, cache, token_ids_BS, with_aux)
    cache.length += 1
    x1 = scratch[2 * D : 3 * D].view(1, 1, D)
    y, aux = block.ffn(scratch[:D].view(1, 1, D), None, with_aux=with_aux, decoding=True)
    return x1 + y, aux


def _plan_one_token(
    block: Block,
    plan: tuple,
    x_BSD: Tensor,
    rope: tuple[Tensor, Tensor],
    mask: AttentionMask,
    cache: LayerKVCache,
    token_ids_BS: Tensor | None,
    scratch: Tensor,
    with_aux: bool,
) -> tuple[Tensor, MoEAux | None]:
    """The block's one call with every expert resident or a dense FFN (moekit_plan_one_token, its
    block_plan)."""
    D, K = x_BSD.shape[-1], top_k(plan)
    ids, weights = (torch.empty(K, dtype=torch.int64), torch.empty(K))
    out = x_BSD.new_empty(1, 1, D)
    struct = block_struct(block, plan, cache, decode_window(mask))
    status = _library().moekit_plan_one_token(
        ctypes.byref(struct), x_BSD.data_ptr(), rope[0].data_ptr(), rope[1].data_ptr(),
        cache.length, scratch.data_ptr(), ids.data_ptr(), weights.data_ptr(), out.data_ptr(),
    )  # fmt: skip
    if status == -1:  # the step not counted in the cache: the reference writes it again
        return Block.forward(block, x_BSD, rope, mask, cache, token_ids_BS, with_aux)
    cache.length += 1
    if status == -2:  # the attention step ran; the block's reference runs the rest
        x1 = scratch[2 * D : 3 * D].view(1, 1, D).clone()
        return Block.feed_forward(block, x1, token_ids_BS, with_aux, decoding=True)
    return out, None


def top_k(plan: tuple) -> int:
    """The experts a token of the plan's block runs (ids and weights its call writes): 0 for a
    dense FFN or offloaded experts."""
    moe = plan[2]
    return 0 if moe is OFFLOADED or type(moe) is DenseRef else moe[2]


def blocks_in_one_call(model: nn.Module) -> int:
    """How many of `model`'s decoder blocks decode a token in one C call (of offloaded experts:
    the attention half, then the MoE layer's): those whose plan (built on their first decoded
    token) found every part readable (a benchmark's check)."""
    return sum(_kept.get(block, (None, None))[1] is not None for block in model.layers)
