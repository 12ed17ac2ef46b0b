"""A decoded token's MoE layer in one C call (routing, its top-k gated experts, the weighted
sum: moekit_moe_one_token; offloaded experts routed, fetched, then moekit_experts_one_token),
a few tokens' (moekit_moe_tokens: each chosen expert once, on its tokens' rows together), and a
few rows' top-k routing in C (`router_forward`), on the weights' descriptions of
`decode_layers` (which says why and what holds them to their references).

The routing runs in C wherever the layer's does, so a layer that falls back routes with the same
bits as one that runs in C (the C softmax rounds differently from torch's in the last bit; C
everywhere keeps an offloaded, hooked or traced model's tokens bit-identical to the resident
one's).
"""

from __future__ import annotations

import ctypes
import weakref

import torch
from torch import Tensor, nn

from moekit.cbuild import optional_ptr
from moekit.config import MoEConfig
from moekit.experts.experts import Experts
from moekit.inference import decode_kernels
from moekit.inference.cache import expert_groups
from moekit.inference.decode_glue import _eager_no_grad, _hooked, _library, _plain
from moekit.inference.decode_layers import (
    MAX_ROWS,
    WeightRef,
    _buffers,
    _cached,
    activation_ref,
    decoded_rows,
    float_ref,
    quant_ref,
)
from moekit.inference.decode_shared import c_shared, shared_floats
from moekit.inference.offloaded_experts import OffloadedExperts
from moekit.moe import MoEAux, MoELayer
from moekit.quant.modules import QuantizedExperts
from moekit.routing.base import Routing
from moekit.routing.router import Router
from moekit.routing.topk import NORMALIZER_EPS, group_limit


def _topk_in_c(cfg: MoEConfig) -> bool:
    """Whether the C routing computes this routing: top-k, group-limited or not."""
    return cfg.router == "topk" and cfg.n_experts % cfg.n_groups == 0


def _topk_args(router: Router) -> tuple:
    """The C routing's arguments from the expert bias to the groups a token keeps."""
    cfg = router.cfg
    return (
        router.expert_bias.data_ptr(),
        cfg.top_k,
        cfg.score == "sigmoid",
        cfg.normalize,
        cfg.routed_scaling,
        cfg.n_groups,
        cfg.topk_groups,
    )


def _router_qualifies(router: Router, x: Tensor) -> bool:
    return (
        _topk_in_c(router.cfg)
        and not router.training
        and x.dim() == 2
        and 0 < x.shape[0] <= MAX_ROWS
        and _eager_no_grad(x, router.weight)
        and _plain(x)
        and _plain(router.weight)
        and _plain(router.expert_bias)
        and (router.bias is None or _plain(router.bias))
        and _library() is not None
    )


def router_forward(router: Router, x_TD: Tensor, token_ids_T: Tensor | None = None) -> Routing:
    """`Router.forward` for a few float32 rows of top-k routing (group-limited or not): the logits
    by the router's product, then the C routing, each token's row; `Router.forward` otherwise."""
    if not _router_qualifies(router, x_TD):
        return Router.forward(router, x_TD, token_ids_T)
    cfg = router.cfg
    logits_TE, scores_TE, ids_TK, weights_TK = _route_rows(router, x_TD)
    if cfg.score == "softmax":
        probs_TE = scores_TE
    else:
        probs_TE = scores_TE / (scores_TE.sum(-1, keepdim=True) + NORMALIZER_EPS)
    return Routing(
        logits_TE=logits_TE,
        scores_TE=scores_TE,
        probs_TE=probs_TE,
        ids_TK=ids_TK,
        weights_TK=weights_TK,
        selection_TE=group_limit(scores_TE + router.expert_bias, cfg.n_groups, cfg.topk_groups),
        scale_T=_scale(scores_TE.gather(1, ids_TK), cfg.normalize, cfg.routed_scaling),
    )


def _route_rows(router: Router, x_TD: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """logits (T, E) by the router's product, then each row's C routing: scores (T, E), ids and
    weights (T, K) best first. For a router and rows `_router_qualifies` accepts."""
    T, E, K = x_TD.shape[0], router.cfg.n_experts, router.cfg.top_k
    logits_TE = router.linear(x_TD, router.weight, router.bias)
    scores_TE = torch.empty_like(logits_TE)
    ids_TK = torch.empty(T, K, dtype=torch.int64)
    weights_TK = torch.empty(T, K)
    route, args = _library().moekit_route_topk_f32, _topk_args(router)
    for t in range(T):
        route(
            logits_TE[t].data_ptr(),
            E,
            *args,
            scores_TE[t].data_ptr(),
            ids_TK[t].data_ptr(),
            weights_TK[t].data_ptr(),
        )
    return logits_TE, scores_TE, ids_TK, weights_TK


def chosen_experts(router: Router, x_TD: Tensor) -> list[int]:
    """The distinct experts `router` routes the rows x_TD (T, D) to, ascending, as
    `router_forward` chooses them (`_route_rows`) without the rest of its `Routing`, where that
    runs; by the router's class's forward otherwise (no module hooks: an offload's prefetch
    guesses with it; none for a routing without ids)."""
    if _router_qualifies(router, x_TD):
        ids_TK = _route_rows(router, x_TD)[2]
    else:
        ids_TK = type(router).forward(router, x_TD).ids_TK
    return [] if ids_TK is None else sorted(set(ids_TK.flatten().tolist()))


def _scale(selected_TK: Tensor, normalize: bool, scaling: float) -> Tensor:
    """topk_route's scale_T (the capacity dispatch's re-weighting reads it)."""
    if normalize:
        return (selected_TK.sum(-1) + NORMALIZER_EPS).reciprocal() * scaling
    return torch.full_like(selected_TK[:, 0], scaling)


def experts_activation(experts: nn.Module) -> ctypes._Pointer | bool | None:
    """`activation_ref` of a layer's routed experts: their settings, and whether they have
    biases (biased SwiGLU experts without the quantized kernels run torch's silu in their
    per-expert reference, which the C layers would not reproduce)."""
    cfg = experts.cfg
    biased = experts.b_in is not None or experts.b_out is not None
    return activation_ref(cfg.activation, cfg.swiglu_alpha, cfg.swiglu_limit, biased)


def _bias(b: Tensor | None, e: int) -> Tensor | None:
    return None if b is None else b.detach()[e]


def _expert_refs(experts: nn.Module) -> tuple[ctypes.Array, ctypes.Array] | None:
    """(w_in, w_out) refs (with their biases) of each of a resident layer's E gated experts, or
    None if they do not qualify: float32 `Experts` running the decode kernels' expert (as
    `apply_decode_kernels` leaves them) or `QuantizedExperts` the kernels read."""
    cfg = experts.cfg
    if not cfg.gated:
        return None
    if type(experts) is Experts:
        if experts.expert_ffn is not decode_kernels.kernel_expert_ffn:
            return None
        w_in, w_out, make = experts.w_in.detach(), experts.w_out.detach(), float_ref
    elif type(experts) is QuantizedExperts:
        (w_in, w_out), make = experts.quantized_weights(), quant_ref
    else:
        return None
    weights = [(w_in[e], w_out[e]) for e in range(cfg.n_experts)]
    return _gated_arrays(make, weights, range(cfg.n_experts), experts)


def _gated_arrays(make, weights: list, numbers, experts: nn.Module) -> tuple | None:
    """The C arrays (w_in refs, w_out refs) of the gated experts `numbers` of `experts` whose
    (w_in, w_out) are `weights` (`make` reads one, with its row of the experts' biases); None
    unless each is readable, w_in (2F, D) and w_out (D, F)."""
    D, F = experts.cfg.d_model, experts.cfg.d_expert
    arrays = []
    for side, (b, shape) in enumerate(((experts.b_in, (2 * F, D)), (experts.b_out, (D, F)))):
        refs = [make(w[side], _bias(b, e)) for w, e in zip(weights, numbers, strict=True)]
        if not all(r is not None and shape == (r.O, r.I) for r in refs):
            return None
        arrays.append((WeightRef * len(refs))(*refs))
    return tuple(arrays)


def _layer_qualifies(layer: MoELayer) -> bool:
    """The layer's settings the C layer needs: eval mode, `_topk_in_c` routing on the decode
    kernels' product with a plain expert bias, the decode path of `selected_path`."""
    router = layer.router
    return (
        not layer.training
        and _topk_in_c(layer.cfg)
        and layer.selected_path(1, True)
        and _plain(router.expert_bias)
        and router.linear is decode_kernels.linear
    )


def moe_step_qualifies(layer: MoELayer, x: Tensor, with_aux: bool, decoding: bool) -> bool:
    """What a call must be for the C layer, the layer's own settings aside: a decoding call of
    at most MAX_ROWS tokens (a decode step of a batch, a speculative verification) of plain
    float32 x, no aux, no gradients anywhere, not traced, router and experts unhooked."""
    T = decoded_rows(x, layer.cfg.d_model) if decoding and not with_aux else 0
    return (
        T > 0
        and layer.selected_path(T, decoding)  # the reference's path at that count
        and not _hooked(layer.router, layer.experts)  # the layer's own hooks see it as any other
    )


def moe_forward(
    layer: MoELayer,
    x: Tensor,
    token_ids: Tensor | None = None,
    *,
    with_aux: bool = True,
    decoding: bool = False,
) -> tuple[Tensor, MoEAux | None]:
    """`MoELayer.forward` for decoded tokens without aux, in one C call where the step and the
    layer qualify and its gated experts (SwiGLU or clamped, biases or not) are ones
    `_expert_refs` reads: one token (moekit_moe_one_token), or up to MAX_ROWS (a batch's step, a
    speculative verification: moekit_moe_tokens), each chosen expert run once on its tokens' rows
    together, the reference's products and sums (float32 experts' products give every row a lone
    token's numbers; quantized ones' depend on the row count, as the reference's do).
    Offloaded experts (one token only) route in C, fetch the chosen experts, then run in one
    call; `MoELayer.forward` itself otherwise. Shared experts are added as it adds them: in the
    same C call where `decode_shared.c_shared` reads them, else by calling them after."""
    if not (moe_step_qualifies(layer, x, with_aux, decoding) and _layer_qualifies(layer)):
        return MoELayer.forward(layer, x, token_ids, with_aux=with_aux, decoding=decoding)
    shared = layer.shared_experts
    x_TD = x.reshape(-1, layer.cfg.d_model)
    y_TD = x.new_empty(x_TD.shape)
    T, args = x_TD.shape[0], resident_args(layer)
    in_c = c_shared(layer) if args is not None else None  # (the offloaded add them after)
    # sized for MAX_ROWS tokens, whatever T: one set a thread and layer shape
    scratch, ids, weights = _buffers(layer_floats(layer, MAX_ROWS), MAX_ROWS * layer.cfg.top_k)
    if args is not None and T == 1:
        status = _library().moekit_moe_one_token(
            x_TD.data_ptr(), *args, in_c, scratch, ids, weights, y_TD.data_ptr()
        )
    elif args is not None:
        status = _library().moekit_moe_tokens(
            x_TD.data_ptr(), T, *args, in_c, scratch, ids, weights, y_TD.data_ptr()
        )
    elif T == 1:
        status = _offloaded_experts(layer, x_TD, scratch, ids, weights, y_TD)
    else:
        status = 1
    if status != 0:  # not runnable here (the experts' x could not be prepared): the reference
        return MoELayer.forward(layer, x, token_ids, with_aux=with_aux, decoding=decoding)
    if shared is not None and in_c is None:  # (the glue's `shared_forward`, as the reference)
        y_TD = y_TD + shared(x_TD)
    return y_TD.view(x.shape), None


def layer_floats(layer: MoELayer, rows: int) -> int:
    """The scratch floats the C MoE layer takes for `rows` tokens: moekit_moe_tokens' routing and
    chosen experts (2 E + K (3 F + 2 D) a token, which covers moekit_moe_one_token's), or its
    shared experts' after them (`decode_shared.shared_floats`), whichever is more."""
    cfg = layer.cfg
    D, E, K, F = cfg.d_model, cfg.n_experts, cfg.top_k, cfg.d_expert
    return max(rows * (2 * E + K * (3 * F + 2 * D)), shared_floats(layer.shared_experts, rows))


def router_ref(router: Router) -> WeightRef | None:
    """The router's weight (and bias) as the C calls read them (float32), or None."""
    return _cached(router, (router,), lambda: float_ref(router.weight.detach(), router.bias))


def resident_args(layer: MoELayer) -> tuple | None:
    """moekit_moe_one_token's (and moekit_moe_tokens') arguments from router to act for a
    layer whose router and resident experts the C call reads (`_expert_refs`; top-k routing,
    group-limited or not, on the decode kernels' product, the selected path, eval mode); None
    otherwise. Kept while the router's and experts' tensors stay."""
    router, experts = layer.router, layer.experts
    extra = (layer.training, router.linear, getattr(experts, "expert_ffn", None))
    return _cached(layer, (router, experts), lambda: _resident_args(layer), extra)


def _resident_args(layer: MoELayer) -> tuple | None:
    if not _layer_qualifies(layer):
        return None
    r, refs = router_ref(layer.router), _expert_refs(layer.experts)
    act = experts_activation(layer.experts)
    if r is None or refs is None or act is False:
        return None
    return (ctypes.byref(r), *_topk_args(layer.router), refs[0], refs[1], act)


def offloaded_qualifies(layer: MoELayer) -> bool:
    """Whether a decoded token's call of this layer can run `_offloaded_experts` (the call's own
    checks, `moe_step_qualifies`, aside): `offloaded_args` reads it."""
    return offloaded_args(layer) is not None


def offloaded_args(layer: MoELayer) -> tuple | None:
    """(activation,) of `_offloaded_experts`' C call for a layer it runs, else None: the settings
    the C layer needs (`_layer_qualifies`: top-k routing in C, not a hash router's, which routes
    by token id), offloaded gated experts the C calls read (quantized, or float ones on the decode
    kernels' expert) with an activation they compute, and a router they read. Kept as
    `resident_args` is, while the same modules' tensors stay."""
    router, experts = layer.router, layer.experts
    extra = (layer.training, router.linear, getattr(experts, "expert_ffn", None))
    # kept for the experts module (the layer's slot holds `resident_args`)
    return _cached(experts, (router, experts), lambda: _offloaded_args(layer), extra)


def _offloaded_args(layer: MoELayer) -> tuple | None:
    experts = layer.experts
    if not (
        _layer_qualifies(layer)
        and type(experts) is OffloadedExperts
        and layer.cfg.gated
        and (experts.quantized or experts.expert_ffn is decode_kernels.kernel_expert_ffn)
        and router_ref(layer.router) is not None
    ):
        return None
    act = experts_activation(experts)
    return None if act is False else (act,)


# Each offloaded expert's C refs (w_in, w_out), kept while the cache keeps the expert's weights:
# per OffloadedExperts module and expert, a weak reference to the fetched w_in's data tensor, the
# pointers the refs hold beside it (its data's, the module's biases'; a reload is a new tensor,
# re-pointed data or biases other pointers: either rebuilds them) and the refs, or None where
# they do not qualify.
_fetched_refs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _offloaded_refs(experts: OffloadedExperts, chosen: list[int], fetched: list) -> tuple | None:
    """The C arrays (w_in refs, w_out refs) of the fetched experts `chosen` (`_gated_arrays`'),
    each expert's pair built once per load; None unless each is readable."""
    kept = _fetched_refs.setdefault(experts, {})
    make = quant_ref if experts.quantized else float_ref
    pairs = []
    for e, weights in zip(chosen, fetched, strict=True):
        first = weights[0].data if experts.quantized else weights[0]
        pointers = (first.data_ptr(), *(optional_ptr(b) for b in (experts.b_in, experts.b_out)))
        pair = kept.get(e)
        if pair is None or pair[0]() is not first or pair[1] != pointers:
            arrays = _gated_arrays(make, [weights], [e], experts)
            refs = arrays and (arrays[0][0], arrays[1][0])
            pair = kept[e] = (weakref.ref(first), pointers, refs)
        if pair[2] is None:
            return None
        pairs.append(pair[2])
    K = len(pairs)
    return (WeightRef * K)(*(p[0] for p in pairs)), (WeightRef * K)(*(p[1] for p in pairs))


def _offloaded_experts(layer, x_TD, scratch, ids, weights, y_TD) -> int:
    """The offloaded layer's call: routed in C (the logits by the router's own product, which
    `moekit_moe_one_token` computes alike), the chosen experts fetched together, run in one call
    (scratch: E + K (3F + D) floats); 1 (the reference runs) where the experts are not offloaded
    gated ones (`offloaded_args`) that all fit at once."""
    if (args := offloaded_args(layer)) is None:
        return 1
    cfg, router, experts = layer.cfg, layer.router, layer.experts
    E, K = cfg.n_experts, cfg.top_k
    logits = router.linear(x_TD, router.weight, router.bias)
    scores = ctypes.addressof(scratch)
    _library().moekit_route_topk_f32(
        logits.data_ptr(), E, *_topk_args(router), scores, ids, weights
    )
    order = sorted(range(K), key=lambda k: ids[k])
    chosen = [ids[k] for k in order]
    if len(expert_groups(chosen, experts.cache.capacity, selected=True)) != 1:
        return 1
    with experts.cache.using([(experts.layer, e) for e in chosen]) as fetched:
        arrays = _offloaded_refs(experts, chosen, fetched)
        if arrays is None:
            return 1
        chosen_weights = (ctypes.c_float * K)(*(weights[k] for k in order))
        h = ctypes.addressof(scratch) + 4 * E
        return _library().moekit_experts_one_token(
            x_TD.data_ptr(),
            K,
            *arrays,
            *args,
            chosen_weights,
            h,
            y_TD.data_ptr(),
        )
