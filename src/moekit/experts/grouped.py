"""Grouped matrix products over expert-sorted rows: y[rows of e] = x[rows of e] @ w[e].T.

Three implementations of one contract, selected by `MoEConfig.expert_impl`:
  grouped_mm  one `torch._grouped_mm` call (checked at run time: `grouped_mm_available`);
  loop        one GEMM per expert that received rows;
  reference   one row at a time; slow and obviously correct, the twin the others are tested against.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor


def grouped_matmul_grouped_mm(x_RI: Tensor, w_EOI: Tensor, counts_E: Tensor) -> Tensor:
    """x_RI (R, I) rows sorted by expert, w_EOI (E, O, I), counts_E (E,) -> (R, O)."""
    offsets = torch.cumsum(counts_E, 0, dtype=torch.int32)
    y_RO = torch._grouped_mm(x_RI, w_EOI.transpose(-2, -1), offs=offsets)
    if y_RO.requires_grad:
        # Its backward rejects gradients with zero strides (e.g. from `y.sum()`).
        y_RO.register_hook(torch.Tensor.contiguous)
    return y_RO


def grouped_matmul_loop(x_RI: Tensor, w_EOI: Tensor, counts_E: Tensor) -> Tensor:
    """Same contract; a Python loop over the experts that received rows."""
    # unbind, not w_EOI[e]: its backward stacks the E gradients once instead of writing each into
    # a zero-filled (E, O, I) tensor.
    weights = w_EOI.unbind(0)
    pieces = [
        rows @ weights[e].t()
        for e, rows in enumerate(torch.split(x_RI, counts_E.tolist()))
        if rows.shape[0]
    ]
    if not pieces:
        return x_RI.new_zeros(0, w_EOI.shape[1])
    return torch.cat(pieces)


def grouped_matmul_reference(x_RI: Tensor, w_EOI: Tensor, counts_E: Tensor) -> Tensor:
    """Same contract; one row at a time."""
    expert_of_row = torch.repeat_interleave(torch.arange(w_EOI.shape[0]), counts_E.cpu()).tolist()
    rows = [w_EOI[e] @ x_RI[r] for r, e in enumerate(expert_of_row)]
    if not rows:
        return x_RI.new_zeros(0, w_EOI.shape[1])
    return torch.stack(rows)


# The probes run once each (functools.cache). Their public callers are marked constant for
# torch.compile, so tracing calls them eagerly instead of tracing a probe (one traced ran its
# tensors as fake ones: torch logged the meta kernel's error at every MoE layer; Dynamo traces
# through a functools.cache it meets, hence the cache one call down).


@torch.compiler.assume_constant_result
def grouped_mm_available(device_type: str, dtype: torch.dtype) -> bool:
    """Whether `torch._grouped_mm` runs forward and backward here, with correct results."""
    return _runs_forward_and_backward(device_type, dtype)


@torch.compiler.assume_constant_result
def grouped_mm_traceable(dtype: torch.dtype) -> bool:
    """Whether torch.compile can trace `torch._grouped_mm` in `dtype`: its meta kernel, which
    tracing runs, takes bfloat16 alone in torch 2.13, where the CPU kernel takes float32 too."""
    return _runs_on_meta(dtype)


@functools.cache
def _runs_forward_and_backward(device_type: str, dtype: torch.dtype) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        # Its own generator: a probe that drew from the global RNG would shift every later draw
        # (router noise) by when it first ran, so a resumed run would not repeat the original.
        gen = torch.Generator(device_type).manual_seed(0)
        x = torch.randn(6, 16, generator=gen, device=device_type, dtype=dtype, requires_grad=True)
        w = torch.randn(3, 32, 16, generator=gen, device=device_type, dtype=dtype).requires_grad_()
        counts = torch.tensor([2, 0, 4], device=device_type)
        y = grouped_matmul_grouped_mm(x, w, counts)
        y.sum().backward()  # an expanded (zero-stride) gradient, the hardest case
        expected = grouped_matmul_loop(x.detach(), w.detach(), counts)
        return bool(torch.allclose(y.detach().float(), expected.float(), rtol=0.05, atol=0.05))
    except (RuntimeError, NotImplementedError, TypeError):
        return False


@functools.cache
def _runs_on_meta(dtype: torch.dtype) -> bool:
    try:
        x, w = (torch.empty(shape, device="meta", dtype=dtype) for shape in ((6, 16), (3, 16, 32)))
        torch._grouped_mm(x, w, offs=torch.tensor([2, 2, 6], dtype=torch.int32, device="meta"))
    except (RuntimeError, NotImplementedError, TypeError, AttributeError):
        return False
    return True


def grouped_mm_fits(x_RI: Tensor, w_EOI: Tensor) -> bool:
    """torch._grouped_mm needs 16-byte aligned rows: I and O times the element size."""
    size = x_RI.element_size()
    return (w_EOI.shape[-1] * size) % 16 == 0 and (w_EOI.shape[-2] * size) % 16 == 0


GroupedMatmul = Callable[[Tensor, Tensor, Tensor], Tensor]  # (x_RI, w_EOI, counts_E) -> y_RO

GROUPED_MATMULS: dict[str, GroupedMatmul] = {
    "grouped_mm": grouped_matmul_grouped_mm,
    "loop": grouped_matmul_loop,
    "reference": grouped_matmul_reference,
}


# While torch.compile traces, the loops run eagerly, outside the graph. Traced, `counts_E.tolist()`
# breaks the graph anyway, and the frame resumed after it guards on each expert's row count (0, 1
# or more): a run recompiled as routing changed until Dynamo's recompile limit (8), warned and
# ran the loop eagerly from then on. Inductor has nothing to fuse in a loop of GEMMs.
_OUTSIDE_THE_GRAPH = {
    name: torch.compiler.disable(fn) for name, fn in GROUPED_MATMULS.items() if name != "grouped_mm"
}


def grouped_matmul(impl: str, x_RI: Tensor, w_EOI: Tensor) -> GroupedMatmul:
    """The implementation `impl` ("auto" resolved by `resolve_impl`) for these operands."""
    name = resolve_impl(impl, x_RI, w_EOI)
    if torch.compiler.is_compiling() and name in _OUTSIDE_THE_GRAPH:
        return _OUTSIDE_THE_GRAPH[name]
    return GROUPED_MATMULS[name]


def resolve_impl(impl: str, x_RI: Tensor, w_EOI: Tensor) -> str:
    """Turn "auto" into the fastest implementation that works for these operands."""
    if impl == "grouped_mm" and not grouped_mm_fits(x_RI, w_EOI):
        raise ValueError(
            f"expert_impl='grouped_mm' needs d_model and d_expert whose rows are multiples of 16 "
            f"bytes (got weights {tuple(w_EOI.shape)} in {x_RI.dtype}); use expert_impl='auto'"
        )
    if impl != "auto":
        return impl
    usable = grouped_mm_available(x_RI.device.type, x_RI.dtype) and grouped_mm_fits(x_RI, w_EOI)
    if torch.compiler.is_compiling() and not grouped_mm_traceable(x_RI.dtype):
        usable = False
    return "grouped_mm" if usable else "loop"
