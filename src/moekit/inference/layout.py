"""A weight layout for decoding.

A decode step multiplies one row per sequence by every weight matrix: matrix-vector products,
bound by how fast the kernel streams each matrix from memory. On CPU, torch's kernels (MKL)
stream a matrix stored as its transpose, (in, out) contiguous, faster than the nn.Linear layout
(out, in) when the matrix has at least as many rows as columns (the query and output projections,
the experts' [gate; up] projection, the LM head); `benchmarks/decode.py` measures both layouts.

`decode_layout(model)` re-stores those weights in place: the same shapes, values and bytes, no
copy kept, every module computing as before (`F.linear` takes either layout). The results differ
from the standard layout's only by the kernels' rounding. Such parameters are not contiguous, so
safetensors refuses to save them: `standard_layout(model)` undoes it.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def decode_layout(model: nn.Module) -> list[str]:
    """Store, in place, every weight matrix (or stack of them) of shape (..., out, in) with
    out >= in as its transpose seen through `.transpose(-2, -1)`; embedding tables, which decode
    reads by row, are left alone. Returns the names of the parameters changed."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    changed = []
    for name, p in model.named_parameters():
        if p.dim() >= 2 and p.shape[-2] >= p.shape[-1] and id(p) not in embeddings:
            p.data = p.data.transpose(-2, -1).contiguous().transpose(-2, -1)
            changed.append(name)
    return changed


@torch.no_grad()
def standard_layout(model: nn.Module) -> None:
    """Make every parameter contiguous again (the layout checkpoints are saved in)."""
    for p in model.parameters():
        if not p.is_contiguous():
            p.data = p.data.contiguous()
