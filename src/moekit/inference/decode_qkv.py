"""The fused q/k/v product of `moekit.inference.decode_glue`'s attention step: q_proj, k_proj and
v_proj's weights (and biases) stacked into one tensor that the three parameters view
(`fuse_qkv`), and the check that they still do (`fused_qkv`) before a decode step trusts it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.inference.decode_kernels import KernelLinear
from moekit.inference.decode_kernels import linear as kernel_linear
from moekit.model.attention import Attention


def linear_of(module: nn.Module):
    """The product a plain projection module runs (KernelLinear: the decode kernel), or None for
    any other module (a quantized one, say): its own forward then runs."""
    if type(module) is KernelLinear:
        return kernel_linear
    if type(module) is nn.Linear:
        return F.linear
    return None


def fuse_qkv(attn: Attention) -> bool:
    """Stack q_proj, k_proj and v_proj's weights (and biases) into one (q+k+v, D) tensor whose
    rows the three parameters become views of (nothing is duplicated; in-place updates of either
    show in both), for `glue_attention_forward`'s one product. Only for three plain projections
    of one kind; returns whether it fused."""
    projs = (attn.q_proj, attn.k_proj, attn.v_proj)
    kinds = {linear_of(p) for p in projs}
    biased = {p.bias is not None for p in projs}
    if len(kinds) != 1 or None in kinds or len(biased) != 1:
        return False
    with torch.no_grad():
        for name in ("weight", "bias") if biased == {True} else ("weight",):
            params = [getattr(p, name) for p in projs]
            fused = torch.cat([t.detach() for t in params])
            for t, view in zip(params, fused.split([t.shape[0] for t in params]), strict=True):
                t.data = view
            setattr(attn, f"_glue_qkv_{name}", fused)
    return True


def unfuse_qkv(attn: Attention) -> None:
    """Undo `fuse_qkv`: each projection's parameters get storage of their own again."""
    for name in ("weight", "bias"):
        if attn.__dict__.pop(f"_glue_qkv_{name}", None) is not None:
            for p in (attn.q_proj, attn.k_proj, attn.v_proj):
                getattr(p, name).data = getattr(p, name).data.clone()


def fused_qkv(attn: Attention, name: str) -> Tensor | None:
    """`fuse_qkv`'s fused `name` ("weight" or "bias") while q_proj, k_proj and v_proj's own still
    view it, row block after row block; None otherwise: never fused, or gone stale (a deepcopy
    clones each parameter, `.to()` or `param.data = ...` gives it other memory), and then the
    projections' own parameters must run. A few data_ptr calls: cheap enough for every step."""
    fused = attn.__dict__.get(f"_glue_qkv_{name}")
    if fused is None:
        return None
    at, end = fused.data_ptr(), fused.data_ptr() + fused.numel() * fused.element_size()
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        t = getattr(proj, name, None)
        if t is None or t.data_ptr() != at or t.dtype != fused.dtype or not t.is_contiguous():
            return None
        at += t.numel() * t.element_size()
    return fused if at == end else None
