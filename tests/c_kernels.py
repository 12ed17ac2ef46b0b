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
