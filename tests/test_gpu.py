"""moekit on CUDA against the float32 reference on CPU (`gpu`-marked: skipped without CUDA).

What runs: the grouped products (grouped_mm | loop | reference) and every expert implementation
in bfloat16, the MoELayer for the main routing schemes (tests/moe_cases.py) in bfloat16, the
MoETransformer's loss and gradients in float32 and under bfloat16 autocast (as `moekit train
--train.bf16=true` runs), and generation. Each check is a function of the device, so its logic can
be run on CPU by hand (`check_*(device="cpu")`); the tests themselves only run on CUDA.

Tolerances for bfloat16. bf16 keeps 8 significant bits: each rounding has relative error at most
u = 2^-8 (3.9e-3). The products accumulate in float32, so what remains are the roundings of the
operands and of each stored intermediate: an expert's output goes through about six (x, w_in, h,
act, w_out, y), independent, so its error is a few u of the output's scale. Errors are measured
against the reference tensor's own scale (max |error| / max |reference|, as bf16 rounds relative
to magnitude): forward within FWD_TOL = 8u (3.1e-2), gradients, which chain about twice as many
roundings, within GRAD_TOL = 16u (6.3e-2). Each check also asserts that the tolerance
discriminates: the same output with two rows exchanged (a token given another token's result, the
typical dispatch bug) must fail it.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tests.moe_cases import CASES, make_layer, tie_free_tokens
from torch import Tensor

from moekit import ModelConfig, MoELayer, MoETransformer
from moekit.experts import GROUPED_MATMULS
from moekit.experts.grouped import grouped_matmul_reference
from moekit.model.generation import generate
from moekit.moe import reference_moe_forward

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
U_BF16 = 2.0**-8
FWD_TOL = 8 * U_BF16
GRAD_TOL = 16 * U_BF16
# float32 on CUDA against float32 on CPU (TF32 off): summation order only.
F32_TOL = 1e-5
# Routing: tokens whose top-k (and group) choice is at least this far (in score) from a tie, so
# bf16's rounding of the router's logits (a few u of logits of order 1) cannot flip a choice.
BF16_ROUTING_GAP = 5e-2

# The routing schemes held on CUDA (tests/moe_cases.py): token choice with softmax and sigmoid
# scores, groups and shared experts, the activations, biases, and capacity dispatch.
LAYER_CASES = (
    "switch",
    "mixtral",
    "sigmoid",
    "deepseek-v3",
    "softmax-groups",
    "shared-gated",
    "gelu-bias",
    "gpt-oss",
    "capacity-position",
)

# gpt-oss's case clamps at 0.5 to exercise the clamp on CPU; here GPT-OSS's own limit, 7: the
# clamp's gradient jumps at the limit, and bf16 rounding moves elements across it (measured on CPU
# in bf16: a gradient error of 0.27 at 0.5, 0.006 at 7).
LAYER_OVERRIDES = {"gpt-oss": dict(swiglu_limit=7.0)}

TINY = ModelConfig.preset("tiny")


@pytest.fixture(autouse=True)
def _exact_float32_matmuls():
    """float32 products in full precision (no TF32) for the float32 comparisons."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


# --- measuring errors ---------------------------------------------------------------------------


def rel_error(got: Tensor, want: Tensor) -> float:
    """max |got - want| / max |want|, in float64 on CPU."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    scale = want.abs().max().item()
    diff = (got - want).abs().max().item()
    return diff / scale if scale > 0 else diff


def swap_two_rows(t: Tensor) -> Tensor:
    """t (N, ...) with its first row and its row farthest from it exchanged (N >= 2)."""
    flat = t.detach().reshape(t.shape[0], -1).double().cpu()
    far = int((flat - flat[0]).abs().amax(-1).argmax())
    out = t.detach().clone()
    out[[0, far]] = out[[far, 0]]
    return out


def assert_close_rel(got: Tensor, want: Tensor, tol: float, what: str) -> None:
    """got within tol of want (relative to want's scale); and the tolerance is tight enough to
    catch two exchanged rows (the rows of got's first dimension)."""
    err = rel_error(got, want)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.3e}"
    wrong = rel_error(swap_two_rows(got), want)
    assert wrong > 2 * tol, f"{what}: tolerance {tol:.1e} would pass a wrong result ({wrong:.1e})"


# --- grouped products and experts ---------------------------------------------------------------


def check_grouped_matmuls(device: str, dtype: torch.dtype = torch.bfloat16) -> dict[str, float]:
    """Each grouped product on (device, dtype) against the float32 per-row reference on CPU,
    forward and gradients (x and w), with empty experts. Returns the errors."""
    gen = torch.Generator().manual_seed(0)
    counts = torch.tensor([40, 0, 75, 16, 0, 9, 96, 20])
    x = torch.randn(int(counts.sum()), 64, generator=gen)
    w = torch.randn(8, 96, 64, generator=gen) / 8
    r = torch.randn(x.shape[0], 96, generator=gen)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    want = grouped_matmul_reference(xr, wr, counts)
    (want * r).sum().backward()
    errors = {}
    for name, matmul in GROUPED_MATMULS.items():
        xg = x.to(device, dtype, copy=True).requires_grad_()
        wg = w.to(device, dtype, copy=True).requires_grad_()
        got = matmul(xg, wg, counts.to(device))
        (got.float() * r.to(device)).sum().backward()
        tol = F32_TOL if dtype == torch.float32 else FWD_TOL
        assert_close_rel(got, want, tol, f"{name} forward")
        assert_close_rel(xg.grad, xr.grad, 2 * tol, f"{name} grad x")
        # w's gradient, expert by expert is the meaningful layout; swap rows of the flattened E*O.
        assert_close_rel(wg.grad.flatten(0, 1), wr.grad.flatten(0, 1), 2 * tol, f"{name} grad w")
        errors[name] = rel_error(got, want)
    return errors


def check_experts(
    impl: str, activation: str, device: str, dtype: torch.dtype = torch.bfloat16
) -> dict[str, float]:
    """`Experts` with expert_impl=impl on (device, dtype) against expert_impl="reference" in
    float32 on CPU, on the same weights: output and the gradients of x and every weight."""
    sizes = dict(d_model=64, d_expert=32, activation=activation, expert_bias=activation == "gelu")
    ref = make_layer(torch.float32, expert_impl="reference", **sizes).experts
    experts = copy.deepcopy(ref).to(device, dtype)
    experts.cfg = experts.cfg.replace(expert_impl=impl)
    counts = torch.tensor([10, 0, 20, 4, 0, 6, 24, 4])
    # Hidden pre-activations of std ~1.2: clamped_swiglu's limit (7) is then ~6 sigma away, so no
    # element sits where bf16 rounding could move it across the clamp (its gradient jumps there).
    x = 0.5 * torch.randn(int(counts.sum()), 64)
    r = torch.randn_like(x)
    xr = x.clone().requires_grad_()
    want = ref(xr, counts)
    (want * r).sum().backward()
    xg = x.to(device, dtype, copy=True).requires_grad_()
    got = experts(xg, counts.to(device))
    (got.float() * r.to(device)).sum().backward()
    tol = F32_TOL if dtype == torch.float32 else FWD_TOL
    assert_close_rel(got, want, tol, f"{impl}/{activation} output")
    errors = {"output": rel_error(got, want), "grad x": rel_error(xg.grad, xr.grad)}
    assert_close_rel(xg.grad, xr.grad, 2 * tol, f"{impl}/{activation} grad x")
    for (name, p), (_, p_ref) in zip(
        experts.named_parameters(), ref.named_parameters(), strict=True
    ):
        assert_close_rel(p.grad, p_ref.grad, 2 * tol, f"{impl}/{activation} grad {name}")
        errors[f"grad {name}"] = rel_error(p.grad, p_ref.grad)
    return errors


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_grouped_matmuls_on_cuda(dtype: torch.dtype) -> None:
    check_grouped_matmuls(DEVICE, dtype)


@pytest.mark.parametrize("impl", ["grouped_mm", "loop", "reference", "auto"])
@pytest.mark.parametrize("activation", ["swiglu", "gelu", "clamped_swiglu"])
def test_experts_bf16_on_cuda(impl: str, activation: str) -> None:
    check_experts(impl, activation, DEVICE)


def test_grouped_mm_is_what_auto_picks_on_cuda_bf16() -> None:
    """On an H100/H200 torch._grouped_mm works in bf16, so "auto" must not fall back to the loop."""
    from moekit.experts import grouped_mm_available

    assert grouped_mm_available("cuda", torch.bfloat16)


# --- the MoE layer ------------------------------------------------------------------------------


def check_layer(name: str, device: str, dtype: torch.dtype = torch.bfloat16) -> dict[str, float]:
    """MoELayer (case `name`) on (device, dtype) against `reference_moe_forward` in float32 on
    CPU: the same experts chosen for every token, the output and every gradient."""
    ref = make_layer(torch.float32, **{**CASES[name], **LAYER_OVERRIDES.get(name, {})}).eval()
    layer: MoELayer = copy.deepcopy(ref).to(device, dtype)
    x = tie_free_tokens(ref, 32, gap=BF16_ROUTING_GAP).view(2, 16, -1)
    r = torch.randn_like(x)

    xr = x.clone().requires_grad_()
    want = reference_moe_forward(ref, xr, ref.router(xr.reshape(-1, xr.shape[-1])))
    (want * r).sum().backward()
    _, aux_ref = ref(x)

    xg = x.to(device, dtype, copy=True).requires_grad_()
    got, aux = layer(xg)
    (got.float() * r.to(device)).sum().backward()

    got_ids = aux.ids.cpu().sort(-1).values
    assert torch.equal(got_ids, aux_ref.ids.sort(-1).values), f"{name}: routing differs"
    assert torch.equal(aux.counts.cpu(), aux_ref.counts), f"{name}: counts differ"
    errors = {"output": rel_error(got, want)}
    assert_close_rel(got.flatten(0, 1), want.flatten(0, 1), FWD_TOL, f"{name} output")
    grads_ref = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    grads = {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}
    assert grads.keys() == grads_ref.keys(), name
    assert_close_rel(xg.grad.flatten(0, 1), xr.grad.flatten(0, 1), GRAD_TOL, f"{name} grad x")
    errors["grad x"] = rel_error(xg.grad, xr.grad)
    for n, g in grads.items():
        g_ref = grads_ref[n]
        if g_ref.dim() == 1 or g_ref.shape[0] < 2:  # no rows to exchange: the error alone
            err = rel_error(g, g_ref)
            assert err <= GRAD_TOL, f"{name} grad {n}: relative error {err:.3e} > {GRAD_TOL:.3e}"
        else:
            assert_close_rel(g, g_ref, GRAD_TOL, f"{name} grad {n}")
        errors[f"grad {n}"] = rel_error(g, g_ref)
    return errors


@pytest.mark.parametrize("name", LAYER_CASES)
def test_moe_layer_bf16_on_cuda(name: str) -> None:
    check_layer(name, DEVICE)


# --- the model ----------------------------------------------------------------------------------


def tiny_model(seed: int = 0) -> MoETransformer:
    """The tiny preset with weights of std 0.1 (not 0.02): logits and routers farther from ties."""
    torch.manual_seed(seed)
    model = MoETransformer(TINY)
    model.init_weights(std=0.1)
    return model


def min_routing_gap(model: MoETransformer, ids: Tensor) -> float:
    """Over every MoE layer and token: the smallest gap between the k-th and (k+1)-th score the
    top-k ranked (float32 forward)."""
    k = TINY.moe.top_k
    found: list[Tensor] = []
    routers = [m for m in model.modules() if type(m).__name__ == "Router"]
    hooks = [
        r.register_forward_hook(
            lambda _m, _i, out: found.append(
                out.scores_TE if out.selection_TE is None else out.selection_TE
            )
        )
        for r in routers
    ]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    assert found, "no router ran"
    tops = [s.topk(k + 1, dim=-1).values for s in found]
    return min((top[:, k - 1] - top[:, k]).min().item() for top in tops)


def loss_and_grads(
    model: MoETransformer, ids: Tensor, autocast_bf16: bool = False
) -> tuple[Tensor, dict[str, Tensor], list[Tensor]]:
    """One training forward/backward as `moekit train` runs it: (loss, gradients, routing)."""
    model.zero_grad()
    device = next(model.parameters()).device
    with torch.autocast(device.type, torch.bfloat16, enabled=autocast_bf16):
        out = model(ids.to(device), labels=ids.to(device))
    out.loss.backward()
    grads = {
        n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None
    }
    return out.loss.detach().float().cpu(), grads, [a.ids.cpu() for a in out.aux]


def norm_error(got: Tensor, want: Tensor) -> float:
    """||got - want|| / ||want|| (robust to a few routing flips, unlike the max)."""
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm().clamp(min=1e-30)).item()


def check_model(device: str, autocast_bf16: bool) -> dict[str, float]:
    """The tiny model's loss and every gradient on `device` (float32 weights, optionally under
    bf16 autocast) against float32 on CPU. float32: the same routing and within F32_TOL (x10 for
    gradients, which sum over the batch); bf16 autocast: each gradient within GRAD_TOL in norm."""
    model = tiny_model()
    ids = torch.randint(0, TINY.vocab_size, (2, 16))
    # On CPU in bf16, rounding moved routing scores by up to ~1e-3 (choices 1e-3 from a tie
    # flipped); a flip changes a token's experts and so the gradients, which is no bug. This seed's
    # data stays 7.7e-3 from any tie (measured).
    gap = min_routing_gap(model, ids)
    assert gap > 5e-3, f"the test's tokens have a near-tie in routing ({gap:.1e}): reseed"
    loss_ref, grads_ref, ids_ref = loss_and_grads(model, ids)
    loss, grads, routing = loss_and_grads(copy.deepcopy(model).to(device), ids, autocast_bf16)
    assert grads.keys() == grads_ref.keys()
    errors = {"loss": abs(loss.item() - loss_ref.item()) / abs(loss_ref.item())}
    for got, want in zip(routing, ids_ref, strict=True):
        assert torch.equal(got.sort(-1).values, want.sort(-1).values), "routing differs"
    if not autocast_bf16:
        assert errors["loss"] <= F32_TOL, errors
        for n, g in grads.items():
            errors[n] = rel_error(g, grads_ref[n])
            assert errors[n] <= 10 * F32_TOL, f"grad {n}: {errors[n]:.3e}"
        return errors
    assert errors["loss"] <= FWD_TOL, errors
    for n, g in grads.items():
        errors[n] = norm_error(g, grads_ref[n])
        assert errors[n] <= GRAD_TOL, f"grad {n}: relative norm error {errors[n]:.3e}"
        # A wrong gradient (e.g. of another parameter, or sign-flipped half) must fail.
        wrong = norm_error(swap_two_rows(g) if g.dim() > 1 else -g, grads_ref[n])
        assert wrong > 2 * GRAD_TOL or g.dim() == 1, f"grad {n}: tolerance would pass {wrong:.2e}"
    return errors


def test_model_forward_backward_float32_on_cuda() -> None:
    check_model(DEVICE, autocast_bf16=False)


def test_model_forward_backward_bf16_autocast_on_cuda() -> None:
    check_model(DEVICE, autocast_bf16=True)


# --- generation ---------------------------------------------------------------------------------


def min_greedy_gap(model: MoETransformer, prompt: Tensor, new: Tensor) -> float:
    """The smallest gap between the best and second-best logit over the greedy steps."""
    with torch.no_grad():
        logits = model.eval()(torch.cat([prompt, new], 1)).logits[:, prompt.shape[1] - 1 : -1]
    top2 = logits.topk(2, dim=-1).values
    return (top2[..., 0] - top2[..., 1]).min().item()


def check_greedy_float32(device: str) -> Tensor:
    """Greedy tokens of the tiny model in float32 on `device` equal those on CPU."""
    model = tiny_model()
    prompt = torch.randint(0, TINY.vocab_size, (2, 8))
    want = generate(model, prompt, 16)
    gap = min_greedy_gap(model, prompt, want)
    assert gap > 1e-3, f"the test's prompts have a near-tie ({gap:.1e}): pick another seed"
    got = generate(copy.deepcopy(model).to(device), prompt.to(device), 16)
    assert torch.equal(got.cpu(), want), f"greedy tokens differ:\n{got.cpu()}\n{want}"
    return got


def check_generate_bf16(device: str) -> Tensor:
    """The tiny model in bfloat16 on `device`: greedy and sampled generation produce valid
    tokens, and its prefill logits are those of float32 on CPU within bf16's tolerance."""
    model = tiny_model()
    prompt = torch.randint(0, TINY.vocab_size, (2, 8))
    m16 = copy.deepcopy(model).to(device, torch.bfloat16)
    with torch.no_grad():
        want = model.eval()(prompt).logits
        got = m16.eval()(prompt.to(device)).logits
    err = norm_error(got.float().cpu(), want)
    assert err <= GRAD_TOL, f"bf16 prefill logits: relative norm error {err:.3e}"
    greedy = generate(m16, prompt.to(device), 16)
    gen = torch.Generator(device).manual_seed(0)
    sampled = generate(m16, prompt.to(device), 16, temperature=1.0, top_k=20, generator=gen)
    for new in (greedy, sampled):
        assert new.shape == (2, 16) and new.dtype == torch.long and new.device.type == device
        assert int(new.min()) >= 0 and int(new.max()) < TINY.vocab_size
    assert math.isfinite(got.float().abs().max().item())
    return greedy


def test_greedy_generation_float32_cuda_equals_cpu() -> None:
    check_greedy_float32(DEVICE)


def test_generation_bf16_on_cuda() -> None:
    check_generate_bf16(DEVICE)
