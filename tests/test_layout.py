"""The decode weight layout: same shapes, values and bytes; same tokens; undone for saving."""

from __future__ import annotations

import copy

import torch
from safetensors.torch import save_model

from moekit import ModelConfig, MoETransformer
from moekit.inference.layout import decode_layout, standard_layout
from moekit.model.generation import generate

TINY = ModelConfig.preset("tiny")


def test_decode_layout_keeps_values_and_bytes_and_tokens(tmp_path) -> None:
    model = MoETransformer(TINY).eval()
    fast = copy.deepcopy(model)
    changed = decode_layout(fast)
    params = dict(fast.named_parameters())
    assert "layers.0.attn.q_proj.weight" in changed and "embed.weight" not in changed
    assert any(name.endswith("experts.w_in") for name in changed)
    for name, p in model.named_parameters():
        q = params[name]
        assert torch.equal(q, p) and q.untyped_storage().nbytes() == p.untyped_storage().nbytes()
        assert q.is_contiguous() == (name not in changed)
    x = torch.randint(0, TINY.vocab_size, (2, 7))
    torch.testing.assert_close(fast(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(generate(fast, x, 6), generate(model, x, 6))
    standard_layout(fast)
    assert all(p.is_contiguous() for p in fast.parameters())
    save_model(fast, str(tmp_path / "model.safetensors"))
