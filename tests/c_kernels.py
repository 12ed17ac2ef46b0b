"""What the tests of moekit's C decode code (glue, layers, blocks) share: their skip marker and
the decode loop they compare paths with."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from moekit import MoETransformer
from moekit.model.generation import KVCache


def why_no_c_kernels() -> str | None:
    """Why the C decode code cannot run here (None when it can)."""
    if os.environ.get("MOEKIT_NO_KERNELS"):
        return "MOEKIT_NO_KERNELS is set: the C decode code is off"
    if not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")):
        return "no C compiler here to build the C decode code"
    return None


needs_c_kernels = pytest.mark.skipif(why_no_c_kernels() is not None, reason=str(why_no_c_kernels()))


def decode_logits(model: MoETransformer, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits of a prefill of `prefill` tokens and then one decode step per remaining token."""
    cache = KVCache.for_model(model, ids.shape[0], ids.shape[1])
    with torch.no_grad():
        out = [model(ids[:, :prefill], kv_cache=cache, with_aux=False).logits]
        for i in range(prefill, ids.shape[1]):
            out.append(model(ids[:, i : i + 1], kv_cache=cache, with_aux=False).logits)
    return torch.cat(out, dim=1)


def own_forward_calls(model: MoETransformer, module: torch.nn.Module, seed: int) -> int:
    """How many times a forward of its own put in `module`'s place (counting, then running the
    one it had) runs while `model` decodes 4 steps after a 4-token prefill (batch 1)."""
    calls, forward = [], module.forward
    module.forward = lambda *args: calls.append(1) or forward(*args)
    ids = torch.randint(0, 97, (1, 8), generator=torch.Generator().manual_seed(seed))
    decode_logits(model, ids, 4)
    return len(calls)
