"""A MoE layer's shared experts in one C call (`moekit.inference.decode_shared`): their glued
forward against `SharedExperts.forward` (float32 rounding; exactly it wherever the C call does not
qualify), and the MoE layer's one call with them inside against the layer adding their glued
forward after (bit for bit). The whole block's and the whole step's calls with shared experts:
tests/test_decode_layers.py and tests/test_decode_step.py (QWEN2_MOE, DEEPSEEK_SHARED)."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.c_kernels import decode_logits, needs_c_kernels
from tests.test_decode_layers import SCHEMES, _count_calls, _model, _per_product
from torch.nn.modules.module import register_module_forward_hook

from moekit.experts.experts import SharedExperts, activate_fast
from moekit.inference import decode_moe
from moekit.inference.decode_kernels import apply_decode_kernels, remove_decode_kernels
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
    """17 rows, gradients wanted, an ungated activation, a w_out of another width than its
    module says (a replaced weight: the scratch is sized from the module): `SharedExperts.forward`
    itself (its bits), no C call."""
    model = _shared_model("gated")
    shared = model.moe_layers()[0].shared_experts
    calls = _count_calls(monkeypatch, ran_only=True)

    def same(module, x: torch.Tensor) -> None:
        assert torch.equal(module(x), SharedExperts.forward(module, x))

    with torch.no_grad():
        same(shared, _x(17))
    same(shared, _x(2).requires_grad_())
    gelu = _shared_model("two_ungated", activation="gelu").moe_layers()[0].shared_experts
    wide = _shared_model("gated").moe_layers()[0].shared_experts
    wide.w_out.weight = torch.nn.Parameter(torch.randn(64, 64))  # its in_features still 32
    wide.w_in.weight = torch.nn.Parameter(torch.randn(128, 64))
    with torch.no_grad():
        same(gelu, _x(2))
        same(wide, _x(2))
    assert _ran(calls) == {}
    with torch.no_grad():
        shared(_x(2))
    assert _ran(calls) == {SHARED: 1}


@pytest.mark.parametrize("scheme", [None, "int8"])
@pytest.mark.parametrize("where", ["w_in", "gate", "w_out", "global"])
def test_a_hooked_projection_runs_its_hook_and_keeps_the_bits(monkeypatch, scheme, where):
    """A hook on a shared projection, the gate, or a global one (a profiler's): the model's
    decode logits bit for bit those without it (the projections called as modules, the rest the
    C call's own arithmetic: moekit_shared_parts), and the hook ran at every step."""
    model = _shared_model("biased_clamped", scheme)
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(8))
    want = decode_logits(model, ids, 4)
    seen = []
    shared = model.moe_layers()[1].shared_experts
    if where == "global":
        handle = register_module_forward_hook(lambda m, a, out: seen.append(m is shared.w_out))
    else:
        module = getattr(shared, where)
        handle = module.register_forward_hook(lambda m, a, out: seen.append(True))
    calls = _count_calls(monkeypatch, ran_only=True)
    try:
        got = decode_logits(model, ids, 4)
    finally:
        handle.remove()
    assert torch.equal(got, want)
    assert seen.count(True) == 7 and calls.get("moekit_shared_parts", 0) >= 6


def test_a_shared_forward_put_in_place_after_decoding_is_called(monkeypatch) -> None:
    """A forward put on the shared experts after the blocks' plans were built (their first
    decoded token): the next decode calls it, at every step."""
    model = _shared_model("gated")
    ids = torch.randint(0, 97, (1, 8), generator=torch.Generator().manual_seed(9))
    decode_logits(model, ids, 4)  # the plans are built
    shared, called = model.moe_layers()[0].shared_experts, []
    shared.forward = lambda x: called.append(x.shape) or torch.zeros_like(x)
    decode_logits(model, ids, 4)
    assert len(called) == 5  # the prefill and 4 steps


def test_other_shared_experts_are_called_as_modules() -> None:
    """A shared-experts module of another class, or computing another activation than the
    routed experts' (the layer's call runs both with one): the layer calls it after its own C
    call, whose logits then equal the layer's reference's."""
    model = _shared_model("gated")
    ids = torch.randint(0, 97, (1, 8), generator=torch.Generator().manual_seed(10))
    other = model.moe_layers()[0]

    class Halved(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) * 0.5

    other.shared_experts = Halved(other.shared_experts)
    reference = decode_logits(_per_product(copy.deepcopy(model)), ids, 4)
    assert torch.equal(decode_logits(model, ids, 4), reference)
    glued_after = apply_decode_kernels(remove_decode_kernels(copy.deepcopy(model)))
    assert "forward" not in glued_after.moe_layers()[0].shared_experts.__dict__  # not glued
    reference = decode_logits(_per_product(copy.deepcopy(glued_after)), ids, 4)
    assert torch.equal(decode_logits(glued_after, ids, 4), reference)
    model.moe_layers()[1].shared_experts.activation = ("clamped_swiglu", 1.702, 0.05)
    reference = decode_logits(_per_product(copy.deepcopy(model)), ids, 4)
    assert torch.equal(decode_logits(model, ids, 4), reference)


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


def test_hooks_that_keep_or_replace_outputs_see_them_as_the_reference_would(monkeypatch) -> None:
    """A gate hook keeping its output keeps the logits (not the sigmoid written over them); a
    w_in hook returning a non-contiguous tensor, or a gate hook returning one logit for several
    rows: each module called once, the rest as the class computes it."""
    shared = _shared_model("gated").moe_layers()[0].shared_experts
    x = _x(3)
    with torch.no_grad():
        want = shared(x)
        kept = []
        handle = shared.gate.register_forward_hook(lambda m, a, out: kept.append(out.clone()))
        keep = shared.gate.register_forward_hook(lambda m, a, out: kept.append(out))
        assert torch.equal(shared(x), want)
        assert torch.equal(kept[0], kept[1])  # the module's output left as it returned it
        handle.remove(), keep.remove()
        calls = {"w_in": 0, "gate": 0}

        def count(name, replace):
            def hook(m, a, out):
                calls[name] += 1
                return replace(out)

            return hook

        shared.w_in.register_forward_hook(count("w_in", lambda out: out.t().contiguous().t()))
        shared.gate.register_forward_hook(count("gate", lambda out: out[:1]))
        h = shared.w_in(x)  # (the hooks' own results, as the reference reads them)
        g = shared.gate(x)
        calls.update(w_in=0, gate=0)
        reference = shared.w_out(activate_fast(h, *shared.activation)) * torch.sigmoid(g)
        assert torch.equal(shared(x), reference) and calls == {"w_in": 1, "gate": 1}
