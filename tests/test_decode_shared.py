"""A MoE layer's shared experts in one C call (`moekit.inference.decode_shared`): their glued
forward against `SharedExperts.forward` (float32 rounding; exactly it wherever the C call does not
qualify), and the MoE layer's one call with them inside against the layer adding their glued
forward after (bit for bit). The whole block's and the whole step's calls with shared experts:
tests/test_decode_layers.py and tests/test_decode_step.py (QWEN2_MOE, DEEPSEEK_SHARED)."""

from __future__ import annotations

import pytest
import torch
from tests.c_kernels import needs_c_kernels
from tests.test_decode_layers import SCHEMES, _count_calls, _model

from moekit.experts.experts import SharedExperts
from moekit.inference import decode_moe
from moekit.inference.decode_kernels import apply_decode_kernels
from moekit.quant.modules import quantize_model

pytestmark = needs_c_kernels

SHARED = "moekit_shared_tokens"
GATED = {"n_shared_experts": 1, "shared_gate": True}
CLAMPED = {"expert_bias": True, "activation": "clamped_swiglu", "swiglu_limit": 0.05}
VARIANTS = {
    "gated": GATED,
    "two_ungated": {"n_shared_experts": 2},
    "biased_clamped": GATED | CLAMPED,
}


def _shared_model(variant: str, scheme: str | None = None, **moe):
    """A glued 2-layer model whose shared experts are random enough to matter (biases and gate
    included); with `scheme`, quantized first."""
    model = _model(7, moe=VARIANTS[variant] | moe)
    with torch.no_grad():
        for layer in model.moe_layers():
            for p in layer.shared_experts.parameters():
                p.normal_(std=0.3 if p.dim() == 1 else 0.15)
    if scheme is not None:
        model = quantize_model(model, SCHEMES[scheme])
    return apply_decode_kernels(model)


def _ran(calls: dict[str, int]) -> dict[str, int]:
    """The C calls that computed something (not the one-time hand-over of the row functions)."""
    return {name: n for name, n in calls.items() if name != "moekit_layers_set_ops"}


def _x(rows: int) -> torch.Tensor:
    return torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows))


@pytest.mark.parametrize("scheme", [None, "int8", "int4"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("rows", [1, 5, 16])
def test_glued_shared_experts_are_their_forward_to_float32_rounding(
    monkeypatch, variant, scheme, rows
) -> None:
    """Up to 16 rows, gated or not, biased, clamped SwiGLU, float32 or quantized: one C call, the
    class's forward within float32 rounding (the same kernels' products; the C SwiGLU and sigmoid,
    not torch's)."""
    shared = _shared_model(variant, scheme).moe_layers()[0].shared_experts
    calls = _count_calls(monkeypatch, ran_only=True)
    with torch.no_grad():
        got = shared(_x(rows))
        assert _ran(calls) == {SHARED: 1}
        want = SharedExperts.forward(shared, _x(rows))
    assert got.abs().max() > 0.1  # (not a vanishing output, which any error would pass)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_what_does_not_qualify_runs_the_class_forward(monkeypatch) -> None:
    """17 rows, gradients wanted, a hook on a projection, an ungated activation, a forward put in
    the glue's place: `SharedExperts.forward` itself (its bits), no C call."""
    model = _shared_model("gated")
    shared = model.moe_layers()[0].shared_experts
    calls = _count_calls(monkeypatch, ran_only=True)

    def same(x: torch.Tensor) -> None:
        assert torch.equal(shared(x), SharedExperts.forward(shared, x))

    with torch.no_grad():
        same(_x(17))
    same(_x(2).requires_grad_())
    handle = shared.w_in.register_forward_hook(lambda *args: None)
    with torch.no_grad():
        same(_x(2))
    handle.remove()
    gelu = _shared_model("two_ungated", activation="gelu").moe_layers()[0].shared_experts
    with torch.no_grad():
        assert torch.equal(gelu(_x(2)), SharedExperts.forward(gelu, _x(2)))
    assert _ran(calls) == {}
    with torch.no_grad():
        shared(_x(2))
    assert _ran(calls) == {SHARED: 1}  # (the hook removed: C again)


@pytest.mark.parametrize("scheme", [None, "int4"])
@pytest.mark.parametrize("rows", [1, 4])
def test_a_layer_runs_its_shared_experts_in_its_own_call_with_the_same_bits(
    monkeypatch, scheme, rows
) -> None:
    """A decoded MoE layer's one C call (one token or a few) adds its shared experts itself; with
    a hook on them it calls them after (their glued forward: one C call of theirs, the hook runs),
    the same bits either way."""
    layer = _shared_model("gated", scheme).moe_layers()[1]
    x = _x(rows)[None]
    calls = _count_calls(monkeypatch, ran_only=True)
    layer_call = "moekit_moe_one_token" if rows == 1 else "moekit_moe_tokens"
    with torch.no_grad():
        y, _ = decode_moe.moe_forward(layer, x, with_aux=False, decoding=True)
        assert _ran(calls) == {layer_call: 1}
        seen = []
        layer.shared_experts.register_forward_hook(lambda m, args, out: seen.append(out))
        y_hooked, _ = decode_moe.moe_forward(layer, x, with_aux=False, decoding=True)
    assert _ran(calls) == {layer_call: 2, SHARED: 1} and len(seen) == 1
    assert torch.equal(y, y_hooked)
