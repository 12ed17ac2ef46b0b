"""The MoE training path's C kernels (moekit.moe_kernels) against the torch operators they
replace: SwiGLU forward and backward, top-k ids, the counting sort, the dispatch's gather and the
combine's scatter (bit for bit where the sums run in the same order), on 1 and 2 threads, in the
portable body, and a whole MoE layer with and without them."""

from __future__ import annotations

import ctypes

import pytest
import torch
import torch.nn.functional as F

from c_kernels import needs_c_kernels
from moekit import cbuild, losses, moe_kernels
from moekit.config import MoEConfig
from moekit.dispatch.base import sort_by_expert
from moekit.dispatch.combine import gather_rows, scatter_weighted
from moekit.experts.experts import swiglu
from moekit.moe import MoELayer
from test_cpu_kernels import on_one_and_two_threads

pytestmark = needs_c_kernels


@pytest.fixture(autouse=True)
def kernels_at_every_size(monkeypatch) -> None:
    """The kernels on these tests' small tensors too (they leave tensors below MIN_NUMBERS
    numbers to torch; `test_small_tensors_go_to_torch` checks that)."""
    monkeypatch.setattr(moe_kernels, "MIN_NUMBERS", 0)


def test_small_tensors_go_to_torch(monkeypatch) -> None:
    """Below MIN_NUMBERS numbers (a decode step's routing) torch's SwiGLU and top-k run: a ctypes
    call costs more than they do there; the ops over rows win at every size."""
    monkeypatch.setattr(moe_kernels, "MIN_NUMBERS", 8192)
    assert moe_kernels.usable(torch.randn(128, 64)) and not moe_kernels.usable(torch.randn(1, 64))
    assert moe_kernels.rows_usable(torch.zeros(100, dtype=torch.int64), torch.randn(100, 8))


def torch_swiglu(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu_and_grad(fn, h: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h = h.clone().requires_grad_()
    y = fn(h)
    y.backward(g)
    return y.detach(), h.grad


@pytest.mark.parametrize("rows, F_", [(14336, 32), (37, 13), (5, 1), (0, 8), (300, 128)])
def test_swiglu_kernel_is_torch_silu_times_up_forward_and_backward(rows, F_) -> None:
    g = torch.Generator().manual_seed(rows + F_)
    h = torch.randn(rows, 2 * F_, generator=g) * 6  # gates from about -25 to 25
    grad = torch.randn(rows, F_, generator=g)
    assert moe_kernels.usable(h)
    got = swiglu_and_grad(swiglu, h, grad)
    want = swiglu_and_grad(torch_swiglu, h, grad)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-6)


def test_swiglu_kernel_at_extreme_gates() -> None:
    """exp(-|x|) never overflows: silu of -1e4 is a tiny negative number, of 1e4 is 1e4."""
    gate = torch.tensor([-1e4, -100.0, -87.0, -20.0, 0.0, 20.0, 88.0, 1e4, 3.0])
    h = torch.cat([gate, torch.full_like(gate, 2.0)]).view(1, -1)
    y, grad = swiglu_and_grad(swiglu, h, torch.ones(1, 9))
    y_ref, grad_ref = swiglu_and_grad(torch_swiglu, h, torch.ones(1, 9))
    torch.testing.assert_close(y, y_ref, rtol=2e-6, atol=1e-30)
    torch.testing.assert_close(grad, grad_ref, rtol=2e-6, atol=1e-30)
    assert torch.isfinite(y).all() and torch.isfinite(grad).all()


def test_swiglu_falls_back_to_torch_off_cpu_float32(monkeypatch) -> None:
    """Where the kernel does not apply (float64 here, as gradcheck) the torch operators run, the
    same function; and they agree with the kernel."""
    h = torch.randn(7, 10, dtype=torch.float64, requires_grad=True)
    assert not moe_kernels.usable(h)
    assert torch.autograd.gradcheck(swiglu, (h,))
    h32, grad = torch.randn(50, 24), torch.randn(50, 12)
    kernel = swiglu_and_grad(swiglu, h32, grad)
    monkeypatch.setattr(moe_kernels, "usable", lambda *t: False)
    fallback = swiglu_and_grad(swiglu, h32, grad)
    for a, b in zip(kernel, fallback, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize(
    "T, E, K", [(2048, 64, 7), (100, 8, 2), (33, 13, 5), (9, 256, 8), (4, 3, 3)]
)
def test_topk_ids_are_torch_topk_indices(T, E, K) -> None:
    scores = torch.randn(T, E, generator=torch.Generator().manual_seed(E))  # no ties
    assert torch.equal(moe_kernels.topk_ids(scores, K), scores.topk(K, dim=-1).indices)


def test_topk_ids_ties_and_masked_experts() -> None:
    """Equal scores: the lower id first; -inf (group-limited routing masks) ranks below every
    finite score; NaN above every number, as in torch.topk (a NaN row reaches the loss)."""
    s = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0], [float("-inf"), 0.5, float("nan"), -1.0, -2.0]])
    assert moe_kernels.topk_ids(s, 3).tolist() == [[1, 2, 4], [2, 1, 3]]
    masked = torch.tensor([[float("-inf"), -3.0, float("-inf"), 0.5]])
    assert moe_kernels.topk_ids(masked, 3).tolist() == [[3, 1, 0]]


def test_topk_ids_fall_back_to_torch_beyond_the_kernel() -> None:
    many = torch.randn(3, 2000)  # more experts than the kernel's row copy holds
    assert torch.equal(moe_kernels.topk_ids(many, 4), many.topk(4).indices)
    wide = torch.randn(3, 100)  # k beyond MAX_TOPK
    assert torch.equal(moe_kernels.topk_ids(wide, 70), wide.topk(70).indices)
    assert torch.equal(moe_kernels.topk_ids(wide.double(), 3), wide.double().topk(3).indices)


def test_counting_sort_is_stable_argsort_and_counts() -> None:
    ids = torch.randint(-1, 16, (5000,), generator=torch.Generator().manual_seed(0))
    order, counts = sort_by_expert(ids, 16)
    assert torch.equal(order, torch.argsort(ids, stable=True))
    assert torch.equal(counts, losses.expert_counts(ids, 16))
    with pytest.raises(ValueError, match=r"expert ids must lie in -1\.\.15"):
        moe_kernels.sort_by_expert(torch.tensor([3, 16]), 16)


def rows_case(R: int = 3000, D: int = 40, T: int = 500):
    g = torch.Generator().manual_seed(R)
    y = torch.randn(R, D, generator=g, requires_grad=True)
    w = torch.rand(R, generator=g, requires_grad=True)
    token = torch.randint(0, T - 1, (R,), generator=g)  # the last token has no rows
    return y, w, token, T


def test_combine_and_gather_are_index_add_and_index_select_bit_for_bit() -> None:
    y, w, token, T = rows_case()
    out = scatter_weighted(y, w, token, T)
    assert torch.equal(out, torch.zeros(T, y.shape[1]).index_add_(0, token, y * w[:, None]))
    grad = torch.randn(T, y.shape[1])
    out.backward(grad)
    assert torch.equal(y.grad, grad[token] * w[:, None])
    torch.testing.assert_close(w.grad, (grad[token] * y).sum(1), rtol=1e-5, atol=1e-5)
    x = y.detach()[:T].clone().requires_grad_()
    rows = gather_rows(x, token)
    assert torch.equal(rows, x[token])
    rows.backward(y.detach())
    assert torch.equal(x.grad, torch.zeros_like(x).index_add_(0, token, y.detach()))


def test_token_ids_out_of_range_raise_instead_of_reading_past_the_rows() -> None:
    y, w, token, T = rows_case(100, 8, 20)
    bad = token.clone()
    bad[7] = T  # one past the last token
    with pytest.raises(IndexError, match=r"outside 0\.\.19"):
        moe_kernels.scatter_rows(y.detach(), w.detach(), bad, T)
    bad[7] = -1
    with pytest.raises(IndexError, match=r"outside 0\.\.19"):
        moe_kernels.scaled_rows(torch.randn(T, 8), bad)


def test_kernels_are_deterministic_across_thread_counts() -> None:
    y, w, token, T = rows_case(40000, 64, 3000)  # large enough to use both threads
    h, g = torch.randn(40000, 64), torch.randn(40000, 32)
    scores = torch.randn(40000, 64)

    def run():
        return (
            moe_kernels.scatter_rows(y.detach(), w.detach(), token, T),
            *moe_kernels.scaled_rows(
                torch.randn(T, 64, generator=torch.Generator().manual_seed(1)),
                token,
                w.detach(),
                y.detach(),
            ),
            moe_kernels.swiglu_forward(h),
            moe_kernels.swiglu_backward(h, g),
            moe_kernels.topk_ids(scores, 8),
        )

    one, two = on_one_and_two_threads(run)
    assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True))


def test_source_builds_without_the_x86_intrinsics() -> None:
    """Other CPUs (aarch64, Apple clang) compile only the portable body: the same top-k ids and
    SwiGLU to float32 rounding (expf against the AVX2 body's polynomial)."""
    lib = ctypes.CDLL(str(cbuild.build(moe_kernels.SOURCE, (*cbuild.FLAGS, "-DMOEKIT_PORTABLE"))))
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.moekit_swiglu_fwd.argtypes = [ptr, i64, i64, i64, ptr]
    lib.moekit_topk_ids.argtypes = [ptr, i64, i64, i64, ptr]
    h, act = torch.randn(30, 22) * 5, torch.empty(30, 11)
    lib.moekit_swiglu_fwd(h.data_ptr(), 22, 30, 11, act.data_ptr())
    torch.testing.assert_close(act, torch_swiglu(h), rtol=2e-6, atol=1e-6)
    scores, ids = torch.randn(30, 21), torch.empty(30, 4, dtype=torch.int64)
    assert lib.moekit_topk_ids(scores.data_ptr(), 30, 21, 4, ids.data_ptr()) == 0
    assert torch.equal(ids, scores.topk(4).indices)


@pytest.mark.parametrize(
    "dispatch",
    [
        {},
        {"capacity_factor": 1.0},
        {"capacity_factor": 1.0, "overflow": "next_best"},
        {"router": "expert_choice", "capacity_factor": 2.0, "aux_loss_coef": 0.0},
    ],
    ids=["dropless", "capacity", "next-best", "expert-choice"],
)
def test_moe_layer_with_and_without_the_kernels(monkeypatch, dispatch) -> None:
    """A fine-grained layer with a shared expert, under each dispatcher: outputs, aux loss and
    every gradient agree with torch's operators throughout; the routing is the same."""
    shape = {"d_model": 32, "d_expert": 16, "n_experts": 16, "top_k": 4, "n_shared_experts": 1}
    cfg = MoEConfig(**{**shape, "d_shared": 16, "aux_loss_coef": 0.01, **dispatch})
    torch.manual_seed(0)
    layer = MoELayer(cfg)
    x = torch.randn(4, 50, 32)

    def run():
        layer.zero_grad()
        y, aux = layer(x)
        (y.square().sum() + aux.loss).backward()
        grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
        return y.detach(), (aux.counts, aux.ids), grads

    y, routed, grads = run()
    monkeypatch.setattr(moe_kernels, "usable", lambda *t: False)
    monkeypatch.setattr(moe_kernels, "rows_usable", lambda *t: False)
    y_ref, routed_ref, grads_ref = run()
    (counts, ids), (counts_ref, ids_ref) = routed, routed_ref
    assert torch.equal(counts, counts_ref) and grads.keys() == grads_ref.keys()
    assert (ids is None) == (ids_ref is None)  # expert choice has no per-token ids
    assert ids is None or torch.equal(ids, ids_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-6)


def test_no_kernels_switch_leaves_everything_to_torch(monkeypatch) -> None:
    """MOEKIT_NO_KERNELS=1 (read when the library is first loaded) turns every kernel off."""
    monkeypatch.setenv("MOEKIT_NO_KERNELS", "1")
    moe_kernels._library.cache_clear()
    try:
        h, ids = torch.randn(64, 256), torch.zeros(64, dtype=torch.int64)
        assert not moe_kernels.usable(h) and not moe_kernels.rows_usable(ids, h)
    finally:
        moe_kernels._library.cache_clear()


def test_what_the_kernels_leave_to_torch(monkeypatch) -> None:
    """Strided rows, int32 indices and anything `torch.compile` traces (Dynamo cannot trace the
    checks) go to torch's operators."""
    h = torch.randn(64, 256)
    assert moe_kernels.usable(h) and not moe_kernels.usable(h[:, :128])
    ids = torch.zeros(64, dtype=torch.int64)
    assert moe_kernels.rows_usable(ids, h) and not moe_kernels.rows_usable(ids.int(), h)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not moe_kernels.usable(h) and not moe_kernels.rows_usable(ids, h)


def test_a_double_backward_raises_instead_of_detaching() -> None:
    """The backwards are once_differentiable: a second derivative is an error, not zeros."""
    h = torch.randn(64, 256, requires_grad=True)
    w = torch.randn(64, 128, requires_grad=True)  # so that g has a graph to differentiate
    (g,) = torch.autograd.grad((swiglu(h) * w).sum(), h, create_graph=True)
    with pytest.raises(RuntimeError, match=r"differentiate twice|once_differentiable"):
        g.sum().backward()


@pytest.mark.parametrize("tokens", [2, 5, 16])
def test_a_few_decoded_tokens_combine_in_c_as_the_per_expert_loop(monkeypatch, tokens) -> None:
    """The selected path for 2..16 decoded tokens sums their experts by one C combine: the same
    numbers as the per-expert index_add_ loop; with gradients on it keeps the loop (and them)."""
    cfg = MoEConfig(d_model=32, d_expert=16, n_experts=8, top_k=3, n_shared_experts=1, d_shared=16)
    torch.manual_seed(0)
    layer = MoELayer(cfg).eval()
    x = torch.randn(tokens, 1, 32)
    with torch.no_grad():
        y_c, _ = layer(x, with_aux=False, decoding=True)
        monkeypatch.setattr(moe_kernels, "rows_usable", lambda *t: False)
        y_loop, _ = layer(x, with_aux=False, decoding=True)
    assert torch.equal(y_c, y_loop)
    monkeypatch.undo()
    x.requires_grad_()
    y, _ = layer(x, with_aux=False, decoding=True)
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
