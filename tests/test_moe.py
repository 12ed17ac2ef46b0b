"""MoELayer against its per-token reference, forward and gradients, for every router x option."""

from __future__ import annotations

import math

import pytest
import torch
from tests.moe_cases import CASES, make_layer, tie_free_tokens
from torch.func import functional_call

from moekit import MoEConfig, MoELayer, losses
from moekit.experts.experts import activate, swiglu
from moekit.moe import reference_moe_forward


def _grads(layer: MoELayer, x: torch.Tensor, forward) -> dict[str, torch.Tensor]:
    layer.zero_grad()
    x = x.detach().requires_grad_(True)
    y = forward(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return {"x": x.grad.clone(), **grads}


@pytest.mark.parametrize("name", CASES)
def test_layer_matches_reference_forward_and_gradients(name: str) -> None:
    layer = make_layer(**CASES[name]).eval()
    x = tie_free_tokens(layer, 24).view(2, 12, -1)

    def fast(inp):
        return layer(inp)[0]

    def reference(inp):
        return reference_moe_forward(layer, inp, layer.router(inp.reshape(-1, inp.shape[-1])))

    torch.testing.assert_close(fast(x), reference(x), rtol=1e-5, atol=1e-5)
    got, want = _grads(layer, x, fast), _grads(layer, x, reference)
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("name", CASES)
def test_gradcheck_float64(name: str) -> None:
    layer = make_layer(torch.float64, **CASES[name]).eval()
    x = tie_free_tokens(layer, 6).requires_grad_(True)
    params = dict(layer.named_parameters())
    names = [n for n in params if n != "router.noise_weight"]  # noise is off in eval

    def fn(inp, *tensors):
        overrides = dict(zip(names, tensors, strict=True))
        return functional_call(layer, {**params, **overrides}, (inp,))[0]

    inputs = (x, *(params[n].detach().clone().requires_grad_(True) for n in names))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, fast_mode=True)


def _assert_close_relative(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    """Error measured against the tensor's own scale (bf16 rounds relative to magnitude)."""
    error = (got.double() - want).abs().max() / want.abs().max()
    assert error <= tol, f"{what}: relative error {error:.2e} > {tol:.0e}"


@pytest.mark.parametrize("impl", ["grouped_mm", "loop", "reference"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("activation", ["swiglu", "gelu", "clamped_swiglu"])
def test_expert_impls_agree(impl: str, dtype: torch.dtype, tol: float, activation: str) -> None:
    """Each grouped compute against the float64 per-row reference, forward and gradients."""
    sizes = dict(d_model=16, d_expert=8, activation=activation, expert_bias=activation == "gelu")
    ref_layer = make_layer(torch.float64, expert_impl="reference", **sizes)
    layer = make_layer(dtype, expert_impl=impl, **sizes)
    x_RD = torch.randn(68, 16, dtype=torch.float64)
    counts = torch.tensor([10, 0, 20, 4, 0, 6, 24, 4])
    xin, xref = x_RD.to(dtype).requires_grad_(True), x_RD.clone().requires_grad_(True)
    got, want = layer.experts(xin, counts), ref_layer.experts(xref, counts)
    _assert_close_relative(got, want, tol, "output")
    got.float().square().sum().backward()
    want.square().sum().backward()
    _assert_close_relative(xin.grad, xref.grad, 2 * tol, "grad x")
    for name, p in ref_layer.experts.named_parameters():
        mine = dict(layer.experts.named_parameters())[name].grad
        _assert_close_relative(mine, p.grad, 2 * tol, f"grad {name}")


def test_clamped_swiglu_worked_example() -> None:
    """h = [gate | up] = [8, -1 | 9, -9], alpha 1.702, limit 7: gate clamps to (7, -1) (above
    only), up to (7, -7); out = g * sigmoid(1.702 g) * (u + 1)."""
    out = activate(torch.tensor([[8.0, -1.0, 9.0, -9.0]]), "clamped_swiglu", 1.702, 7.0)
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    expected = torch.tensor([[7 * sig(1.702 * 7) * 8, -1 * sig(-1.702) * -6]])
    torch.testing.assert_close(out, expected)


def test_ungated_activations_worked_example() -> None:
    """relu zeroes the negatives; gelu is the exact x * Phi(x) = x * (1 + erf(x / sqrt 2)) / 2,
    not its tanh approximation (2e-4 away at x = 1.5): the layer's reference runs `activate`
    too, so only this pins them."""
    xs = [-2.0, -0.5, 0.0, 0.75, 1.5]
    h = torch.tensor([xs])
    assert activate(h, "relu").tolist() == [[0.0, 0.0, 0.0, 0.75, 1.5]]
    gelu = [x * (1 + math.erf(x / math.sqrt(2))) / 2 for x in xs]  # -0.0455, -0.1543, 0, ...
    torch.testing.assert_close(activate(h, "gelu"), torch.tensor([gelu]), rtol=0, atol=1e-6)


def test_grouped_mm_refuses_misaligned_sizes_with_advice() -> None:
    layer = make_layer(expert_impl="grouped_mm")  # d_expert=10: 40-byte rows
    with pytest.raises(ValueError, match="expert_impl='auto'"):
        layer(torch.randn(4, layer.cfg.d_model))


def test_sequence_scope_balances_each_row_of_a_3d_input() -> None:
    layer = make_layer(aux_loss_coef=0.1, aux_loss_scope="sequence")
    x = torch.randn(3, 7, layer.cfg.d_model)
    _, aux = layer(x)
    routing = layer.router(x.view(21, -1))
    expected = losses.switch_balance_loss(routing.probs_TE, routing.ids_TK, n_sequences=3)
    torch.testing.assert_close(aux.balance_loss, expected)
    torch.testing.assert_close(aux.loss, 0.1 * expected)
    batch_scope = losses.switch_balance_loss(routing.probs_TE, routing.ids_TK, n_sequences=1)
    assert not torch.allclose(expected, batch_scope)


def test_aux_is_that_of_the_batch_whose_statistics_reduce_stats_sums() -> None:
    """The injected reduction decides the batch `aux` describes: counting this call's statistics
    twice (as a sum over two processes holding the same tokens would) gives the aux of a batch
    of two copies of them."""
    layer = make_layer(aux_loss_coef=0.01, z_loss_coef=0.01, importance_loss_coef=0.01)
    x = tie_free_tokens(layer, 12).view(2, 6, -1)
    _, both = layer(torch.cat([x, x]))
    layer.reduce_stats = lambda sums: 2 * sums
    _, doubled = layer(x)
    for field in ("loss", "balance_loss", "z_loss", "importance_loss", "counts", "entropy"):
        torch.testing.assert_close(getattr(doubled, field), getattr(both, field), msg=field)
    assert int(doubled.counts.sum()) == 2 * 12 * 2  # T * K of both copies


def test_wrong_width_names_both_numbers() -> None:
    layer = MoELayer(MoEConfig(d_model=16, d_expert=8, n_experts=4, top_k=1))
    with pytest.raises(ValueError, match=r"d_model=16.*last dimension 15"):
        layer(torch.randn(3, 15))


def test_output_shape_and_aux_fields() -> None:
    layer = MoELayer(MoEConfig(d_model=16, d_expert=8, n_experts=4, top_k=2, aux_loss_coef=0.01))
    y, aux = layer(torch.randn(2, 5, 16))
    assert y.shape == (2, 5, 16)
    assert aux.ids.shape == aux.weights.shape == (10, 2)
    assert aux.counts.shape == (4,) and int(aux.counts.sum()) == 20
    assert aux.loss.ndim == 0 and aux.loss.requires_grad
    torch.testing.assert_close(aux.loss, 0.01 * aux.balance_loss)


def test_expert_weights_are_views_in_linear_layout() -> None:
    layer = MoELayer(MoEConfig(d_model=16, d_expert=8, n_experts=4, top_k=2))
    w_gate, w_up, w_down = layer.experts.expert_weights(3)
    assert w_gate.shape == w_up.shape == (8, 16) and w_down.shape == (16, 8)
    assert w_gate.data_ptr() == layer.experts.w_in[3].data_ptr()
    assert layer.router.weight.shape == (4, 16) and layer.router.expert_bias.shape == (4,)


def test_meta_device_build_then_init() -> None:
    cfg = MoEConfig(d_model=16, d_expert=8, n_experts=4, top_k=2, n_shared_experts=1)
    with torch.device("meta"):
        layer = MoELayer(cfg)
    assert layer.experts.w_in.is_meta
    layer.to_empty(device="cpu")
    layer.init_weights()
    y, _ = layer(torch.randn(3, 16))
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("impl", ["grouped_mm", "loop"])
def test_backward_from_an_expanded_gradient(impl: str) -> None:
    """`y.sum()` sends a zero-stride gradient, which torch._grouped_mm's backward rejects raw."""
    layer = make_layer(d_model=16, d_expert=8, expert_impl=impl)
    x = torch.randn(10, 16, requires_grad=True)
    layer(x)[0].sum().backward()
    assert torch.isfinite(x.grad).all() and layer.experts.w_in.grad.abs().sum() > 0


def test_fused_swiglu_matches_its_definition() -> None:
    h = torch.randn(7, 10, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(swiglu(h), activate(h, "swiglu"))
    assert torch.autograd.gradcheck(swiglu, (h,))


SELECTED_CASES = ["switch", "mixtral", "deepseek-v3", "shared-gated", "gelu-bias", "gpt-oss"]


@pytest.mark.parametrize("name", SELECTED_CASES)
@pytest.mark.parametrize("n_tokens", [1, 5, 16])
def test_selected_experts_path_matches_the_dispatch(name: str, n_tokens: int) -> None:
    """The decode path (a decoding call of few tokens) against the sorted dispatch it replaces."""
    layer = make_layer(**CASES[name]).eval()
    x = tie_free_tokens(layer, n_tokens)
    with torch.no_grad():
        assert layer.selected_path(n_tokens, decoding=True)
        got, aux = layer(x, decoding=True)
    with torch.enable_grad():
        assert not layer.selected_path(n_tokens, decoding=False)
        want, want_aux = layer(x)
    torch.testing.assert_close(got, want.detach(), rtol=1e-6, atol=1e-6)
    assert torch.equal(aux.counts, want_aux.counts) and torch.equal(aux.ids, want_aux.ids)


def test_selected_experts_path_is_only_for_small_dropless_calls() -> None:
    layer = make_layer().eval()
    with torch.no_grad():
        assert not layer.selected_path(17, decoding=True)
        assert not make_layer(**CASES["capacity-position"]).selected_path(1, decoding=True)
        assert not make_layer(expert_impl="loop").selected_path(1, decoding=True)
        assert not layer.selected_path(1, decoding=False)


def test_training_step_reads_nothing_back_from_the_device() -> None:
    """Forward, backward and the aux-loss-free bias update of the dropless layer run on the meta
    device, where any host read of a value (`.item()`, `bool(t)`, a boolean mask's index) raises:
    on a GPU each would be a sync per layer per micro-batch. (grouped_mm's meta kernel takes
    bfloat16.)"""
    cfg = MoEConfig(
        d_model=32,
        d_expert=16,
        n_experts=4,
        top_k=2,
        expert_impl="grouped_mm",
        bias_update_rate=0.01,
        aux_loss_coef=0.01,
        z_loss_coef=0.001,
    )
    with torch.device("meta"):
        layer = MoELayer(cfg).to(torch.bfloat16).train()
        x = torch.randn(2, 8, 32, dtype=torch.bfloat16, requires_grad=True)
        y, aux = layer(x)
        (y.float().sum() + aux.loss).backward()
        layer.update_expert_bias()
    assert y.shape == x.shape and x.grad is not None and layer.router.weight.grad is not None
