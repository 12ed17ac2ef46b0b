"""A dense block's FFN for a few decoded rows in one C call (`moekit.inference.decode_dense`):
`DenseFFN.forward`'s output to float32 rounding for float32 and quantized projections; the
reference itself wherever it does not qualify; the block's and the whole step's calls with a dense
layer (tests/test_decode_step.py holds those to the layer calls' bits)."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.c_kernels import decode_logits, needs_c_kernels, own_forward_calls
from tests.test_decode_layers import SCHEMES, _count_calls, _model

from moekit.inference import decode_dense
from moekit.inference.decode_block import blocks_in_one_call
from moekit.inference.decode_kernels import apply_decode_kernels
from moekit.model.block import DenseFFN
from moekit.quant.modules import quantize_model

pytestmark = needs_c_kernels

DENSE = {"first_dense": 1, "d_ff": 96}  # layer 0 dense, of a width other than d_model's


def _dense(scheme: str | None = None) -> DenseFFN:
    model = _model(50, **DENSE)
    if scheme is not None:
        model = quantize_model(model, SCHEMES[scheme])
    ffn = apply_decode_kernels(model).layers[0].ffn
    assert type(ffn) is DenseFFN
    return ffn


@pytest.mark.parametrize("scheme", [None, "bf16", "int8", "int4"])
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_a_few_rows_take_one_call_with_the_references_output(monkeypatch, scheme, rows) -> None:
    """1, 3 and 16 rows through float32, bf16, int8 and int4 projections: one C call, the class's
    forward (the same products, torch's SwiGLU) to float32 rounding."""
    ffn = _dense(scheme)
    x = torch.randn(rows, 1, ffn.w_gate.in_features, generator=torch.Generator().manual_seed(51))
    calls = _count_calls(monkeypatch, ran_only=True)
    with torch.no_grad():
        got, want = decode_dense.dense_forward(ffn, x), DenseFFN.forward(ffn, x)
    assert calls["moekit_dense_tokens"] == 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_what_does_not_qualify_runs_the_reference(monkeypatch) -> None:
    """17 rows, gradients, a hook on a projection (it runs), another forward put in the FFN's
    place: the class's forward, no C call."""
    ffn = _dense()
    x = torch.randn(17, ffn.w_gate.in_features)
    calls = _count_calls(monkeypatch)
    seen = []
    with torch.no_grad():
        decode_dense.dense_forward(ffn, x)  # 17 rows
    decode_dense.dense_forward(ffn, x[:1])  # gradients
    handle = ffn.w_up.register_forward_hook(lambda *args: seen.append(1))
    with torch.no_grad():
        decode_dense.dense_forward(ffn, x[:1])
    handle.remove()
    assert "moekit_dense_tokens" not in calls and seen == [1]
    ffn.forward = lambda x: x  # not the glue's: the block's call must not bypass it
    assert decode_dense.dense_ref(ffn) is None


@pytest.mark.parametrize("scheme", [None, "int4"])
def test_a_model_with_a_dense_layer_decodes_each_block_in_one_call(monkeypatch, scheme) -> None:
    """Every block, the dense one too, one C call a step (batch 1); the plain model's logits to
    float32 rounding (the quantized one's: its dequantized twin's differ more), greedy tokens the
    same."""
    plain = _model(52, **DENSE)
    if scheme is not None:
        plain = quantize_model(plain, SCHEMES[scheme])
    glued = apply_decode_kernels(copy.deepcopy(plain))
    calls = _count_calls(monkeypatch, ran_only=True)
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(53))
    got, want = decode_logits(glued, ids, 4), decode_logits(plain, ids, 4)
    assert calls["moekit_plan_one_token"] == 8 * len(glued.layers)
    assert blocks_in_one_call(glued) == len(glued.layers)
    if scheme is None:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("replaced", ["w_gate", "w_down"])
def test_a_projection_with_a_forward_of_its_own_is_called(replaced) -> None:
    """A forward of its own in a projection's place: no C call (the FFN's or its block's)
    bypasses it; it runs at the prefill and every step."""
    model = apply_decode_kernels(_model(54, **DENSE))
    module = getattr(model.layers[0].ffn, replaced)
    assert own_forward_calls(model, module, seed=55) == 5  # the prefill and 4 steps


def test_modules_the_calls_do_not_read_fall_back_without_error() -> None:
    """A dense FFN's projection wrapped in another module (an adapter's nn.Sequential) and a
    block's norm replaced by nn.Identity: decoding runs their forwards, as the plain model does,
    the same logits to float32 rounding."""
    plain = _model(56, **DENSE)
    plain.layers[0].ffn.w_gate = torch.nn.Sequential(plain.layers[0].ffn.w_gate)
    plain.layers[1].ffn_norm = torch.nn.Identity()
    glued = apply_decode_kernels(copy.deepcopy(plain))
    ids = torch.randint(0, 97, (1, 8), generator=torch.Generator().manual_seed(57))
    want = decode_logits(plain, ids, 4)
    torch.testing.assert_close(decode_logits(glued, ids, 4), want, rtol=1e-4, atol=1e-5)
