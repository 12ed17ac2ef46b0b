"""The decode step's fast paths against their references: the single-token expert path of
`selected_experts_forward`, the C glue of `moekit.inference.decode_glue` (RMSNorm, one position's
attention) against nn.RMSNorm and `cached_attention`, and whole cached decodes with them."""

from __future__ import annotations

import copy
import os
import shutil
import threading

import pytest
import torch
from torch import nn

from moekit import ModelConfig, MoETransformer
from moekit.config import MoEConfig
from moekit.experts.experts import selected_experts_forward
from moekit.inference import decode_glue
from moekit.inference.decode_glue import (
    GlueRMSNorm,
    apply_decode_glue,
    glue_cached_attention,
    remove_decode_glue,
    rms_norm,
)
from moekit.inference.decode_kernels import apply_decode_kernels
from moekit.model.attention import AttentionMask, LayerKVCache, attention_mask, cached_attention
from moekit.model.generation import KVCache, generate
from moekit.model.rope import rope_angles


def _cfg(**overrides) -> ModelConfig:
    d = 32
    moe = MoEConfig(d_model=d, d_expert=16, n_experts=6, top_k=2)
    args = dict(vocab_size=97, d_model=d, n_layers=2, n_heads=4, n_kv_heads=2, moe=moe)
    args.update(max_seq_len=64)
    args.update(overrides)
    return ModelConfig(**args)


def _why_no_glue() -> str | None:
    if os.environ.get("MOEKIT_NO_KERNELS"):
        return "MOEKIT_NO_KERNELS is set: the C glue is off"
    if not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")):
        return "no C compiler here to build the C glue"
    return None


needs_glue = pytest.mark.skipif(_why_no_glue() is not None, reason=str(_why_no_glue()))


@needs_glue
def test_glue_is_built_here() -> None:
    """Where a compiler is found and the glue is not switched off, it must be live."""
    assert decode_glue._library() is not None


def test_single_token_experts_match_the_general_path() -> None:
    """T == 1 takes its own branch: it must equal the per-expert gather/scatter loop bit for bit
    (the loop's result for one row is what a two-row call gives its first row)."""
    g = torch.Generator().manual_seed(0)
    w_E = torch.randn(6, 8, 8, generator=g)

    def expert(e: int, x_ND: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x_ND @ w_E[e])

    for dtype in (torch.float32, torch.bfloat16):

        def run(e: int, x_ND: torch.Tensor, dtype: torch.dtype = dtype) -> torch.Tensor:
            return expert(e, x_ND.float()).to(dtype)

        x = torch.randn(2, 8, generator=g).to(dtype)
        ids = torch.tensor([[4, 1], [4, 2]])  # unsorted ids: the sum runs by increasing expert
        w = torch.rand(2, 2, generator=g)
        two = selected_experts_forward(x, ids, w, run)
        one = selected_experts_forward(x[:1], ids[:1], w[:1], run)
        assert one.dtype == dtype
        assert torch.equal(one[0], two[0])


@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("eps", [1e-6, None])
def test_rms_norm_matches_torch(rows: int, eps: float | None) -> None:
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 1, 96, generator=g) * 3
    w = torch.randn(96, generator=g)
    torch.testing.assert_close(rms_norm(x, w, eps), torch.rms_norm(x, (96,), w, eps))


def test_rms_norm_falls_back_to_torch() -> None:
    """Gradients, many rows, other dtypes and no weight run torch.rms_norm itself."""
    x = torch.randn(40, 8)
    w = torch.randn(8, requires_grad=True)
    y = rms_norm(x, w, 1e-6)
    assert y.grad_fn is not None
    y.sum().backward()
    assert w.grad is not None
    with torch.no_grad():
        assert torch.equal(rms_norm(x, w, 1e-6), torch.rms_norm(x, (8,), w, 1e-6))  # 40 rows
        xb = x[:1].bfloat16()
        assert torch.equal(
            rms_norm(xb, w.bfloat16(), 1e-6), torch.rms_norm(xb, (8,), w.bfloat16(), 1e-6)
        )
        assert torch.equal(rms_norm(x[:1], None, 1e-6), torch.rms_norm(x[:1], (8,), None, 1e-6))


def test_glue_rms_norm_module_shares_its_weight() -> None:
    plain = nn.RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        plain.weight.normal_()
    glue = GlueRMSNorm.sharing(plain)
    assert glue.weight is plain.weight
    x = torch.randn(1, 1, 16)
    with torch.no_grad():
        torch.testing.assert_close(glue(x), plain(x))
    assert glue.state_dict().keys() == plain.state_dict().keys()


def _attention_case(B: int, H: int, KV: int, hd: int, filled: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    max_len = filled + 3
    k_cache = torch.zeros(B, KV, max_len, hd)
    k_cache[:, :, :filled] = torch.randn(B, KV, filled, hd, generator=g)
    v_cache = torch.zeros(B, KV, max_len, hd)
    v_cache[:, :, :filled] = torch.randn(B, KV, filled, hd, generator=g)
    q = torch.randn(B, 1, H, hd, generator=g).transpose(1, 2)  # as Attention._project's views
    k = torch.randn(B, 1, KV, hd, generator=g).transpose(1, 2)
    v = torch.randn(B, 1, KV, hd, generator=g).transpose(1, 2)
    rope = rope_angles(torch.tensor([filled]), hd, 10000.0)

    def cache() -> LayerKVCache:
        c = LayerKVCache(k_cache.clone(), v_cache.clone())
        c.length = filled
        return c

    return q, k, v, rope, cache


@needs_glue
@pytest.mark.parametrize(
    ("B", "H", "KV", "hd", "filled"),
    [(1, 4, 2, 16, 0), (1, 4, 2, 16, 37), (2, 8, 8, 64, 5), (1, 12, 4, 64, 700), (3, 2, 1, 6, 9)],
)
def test_glue_attention_matches_cached_attention(B, H, KV, hd, filled) -> None:
    q, k, v, rope, cache = _attention_case(B, H, KV, hd, filled)
    mask = attention_mask(filled, 1, None)
    fast_cache = cache()
    assert decode_glue._attention_qualifies(q, k, v, rope, mask, fast_cache, None)
    ref_cache = cache()
    ref = cached_attention(q, k, v, rope, mask, ref_cache)
    out = glue_cached_attention(q, k, v, rope, mask, fast_cache)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert fast_cache.length == ref_cache.length == filled + 1
    # The rotary embedding rounds as torch's: the cached keys are bit-identical.
    assert torch.equal(fast_cache.k_BKLd, ref_cache.k_BKLd)
    assert torch.equal(fast_cache.v_BKLd, ref_cache.v_BKLd)


def test_glue_attention_falls_back() -> None:
    """An explicit mask (a sliding window that bites), sinks, several positions, a full cache and
    gradients all run `cached_attention`."""
    q, k, v, rope, cache = _attention_case(1, 4, 2, 8, 6)
    windowed = attention_mask(6, 1, 3)
    assert windowed.mask_SL is not None
    sinks = torch.zeros(4)
    for mask, s in ((windowed, None), (AttentionMask(None, False), sinks)):
        ref = cached_attention(q, k, v, rope, mask, cache(), s)
        assert torch.equal(glue_cached_attention(q, k, v, rope, mask, cache(), s), ref)
    full = cache()
    full.length = full.k_BKLd.shape[2]
    with pytest.raises(ValueError, match="overflow"):
        glue_cached_attention(q, k, v, rope, AttentionMask(None, False), full)
    qg = q.clone().requires_grad_()
    out = glue_cached_attention(qg, k, v, rope, AttentionMask(None, False), cache())
    assert out.grad_fn is not None


def _decode(model: MoETransformer, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    cache = KVCache.for_model(model, ids.shape[0], ids.shape[1])
    with torch.no_grad():
        out = [model(ids[:, :prefill], kv_cache=cache, with_aux=False).logits]
        for i in range(prefill, ids.shape[1]):
            out.append(model(ids[:, i : i + 1], kv_cache=cache, with_aux=False).logits)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"qk_norm": "head", "n_kv_heads": 4}, {"sliding_window": 5, "n_layers": 3}],
)
@pytest.mark.parametrize("batch", [1, 2])
def test_decode_with_glue_matches_plain_decode(overrides: dict, batch: int) -> None:
    torch.manual_seed(0)
    model = MoETransformer(_cfg(**overrides)).eval()
    ids = torch.randint(0, 97, (batch, 24))
    ref = _decode(model, ids, 5)
    apply_decode_kernels(model)  # which applies the glue too
    assert any(isinstance(m, GlueRMSNorm) for m in model.modules())
    torch.testing.assert_close(_decode(model, ids, 5), ref, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        full = model(ids).logits  # a prefill-only forward runs the references
    torch.testing.assert_close(full, ref, rtol=1e-4, atol=1e-5)
    remove_decode_glue(model)
    assert not any(isinstance(m, GlueRMSNorm) for m in model.modules())
    assert all(type(m) is not GlueRMSNorm for m in model.modules())


def test_generate_with_glue_gives_the_same_tokens() -> None:
    torch.manual_seed(1)
    model = MoETransformer(_cfg()).eval()
    prompt = torch.randint(0, 97, (1, 6))
    ref = generate(model, prompt, 20)
    apply_decode_glue(model)
    assert torch.equal(generate(model, prompt, 20), ref)


def test_training_through_the_glued_model_keeps_gradients() -> None:
    torch.manual_seed(2)
    model = apply_decode_glue(MoETransformer(_cfg()))
    ids = torch.randint(0, 97, (2, 10))
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "norm" in n)


@needs_glue
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize(("E", "K"), [(8, 2), (16, 4), (5, 1)])
def test_route_topk_matches_topk_route(score: str, normalize: bool, E: int, K: int) -> None:
    from moekit.routing.topk import topk_route

    cfg = MoEConfig(
        d_model=8,
        d_expert=8,
        n_experts=E,
        top_k=K,
        score=score,
        normalize=normalize,
        routed_scaling=2.5,
    )
    g = torch.Generator().manual_seed(E * 10 + K)
    for _ in range(20):
        logits = torch.randn(1, E, generator=g) * 3
        bias = torch.randn(E, generator=g) * 0.1
        ref = topk_route(logits, bias, cfg)
        scores, ids, weights = decode_glue._route_buffers(E, K)
        decode_glue._library().moekit_route_topk_f32(
            logits.data_ptr(),
            E,
            bias.data_ptr(),
            K,
            score == "sigmoid",
            normalize,
            2.5,
            scores,
            ids,
            weights,
        )
        assert list(ids) == ref.ids_TK[0].tolist()
        torch.testing.assert_close(torch.tensor(list(weights)), ref.weights_TK[0])


@pytest.mark.parametrize(
    "moe_overrides",
    [
        {},
        {"n_shared_experts": 1},
        {"score": "sigmoid", "routed_scaling": 2.0},
        {"expert_bias": True},
    ],
)
def test_glue_moe_forward_matches_moe_layer(moe_overrides: dict) -> None:
    torch.manual_seed(3)
    moe = MoEConfig(d_model=32, d_expert=16, n_experts=6, top_k=2, **moe_overrides)
    from moekit.moe import MoELayer

    layer = MoELayer(moe).eval()
    with torch.no_grad():
        layer.router.expert_bias.normal_(std=0.05)
        for p in layer.experts.parameters():
            p.normal_(std=0.1)
        x = torch.randn(1, 1, 32)
        ref, _ = layer(x, with_aux=False, decoding=True)
        y, aux = decode_glue.glue_moe_forward(layer, x, with_aux=False, decoding=True)
        assert aux is None
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
        # with aux, or several tokens, or not decoding: MoELayer.forward itself
        y_aux, aux = decode_glue.glue_moe_forward(layer, x, with_aux=True, decoding=True)
        assert aux is not None and torch.equal(y_aux, ref)
        x3 = torch.randn(1, 3, 32)
        ref3, _ = layer(x3, with_aux=False, decoding=True)
        y3, _ = decode_glue.glue_moe_forward(layer, x3, with_aux=False, decoding=True)
        assert torch.equal(y3, ref3)


def test_fused_qkv_shares_parameters_and_unfuses() -> None:
    """Opt-in (`fuse_qkv_weights`): q/k/v view one stacked tensor, undone by remove_decode_glue."""
    torch.manual_seed(4)
    model = MoETransformer(_cfg()).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_decode_glue(model, fuse_qkv_weights=True)
    attn = model.layers[0].attn
    fused = attn._glue_qkv_weight
    assert attn.q_proj.weight.data_ptr() == fused.data_ptr()
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    with torch.no_grad():
        attn.k_proj.weight.add_(1.0)  # an in-place update shows in the fused product's rows
    q_rows = attn.q_proj.weight.shape[0]
    assert torch.equal(fused[q_rows : q_rows + attn.k_proj.weight.shape[0]], attn.k_proj.weight)
    remove_decode_glue(model)
    assert "_glue_qkv_weight" not in attn.__dict__ and "forward" not in attn.__dict__
    assert attn.k_proj.weight.untyped_storage().nbytes() == attn.k_proj.weight.numel() * 4
    assert model.rope_memo is None


def _count_glue_calls(monkeypatch) -> dict[str, int]:
    """From now on, count the C attention and routing calls made through the glue's library."""
    calls = {"attend": 0, "route": 0}
    lib = decode_glue._library()

    class Counting:
        def __getattr__(self, name):
            fn = getattr(lib, name)
            key = {"moekit_attend_one_f32": "attend", "moekit_route_topk_f32": "route"}.get(name)
            if key is None:
                return fn

            def counted(*args):
                calls[key] += 1
                return fn(*args)

            return counted

    monkeypatch.setattr(decode_glue, "_library", lambda: Counting())
    return calls


@needs_glue
def test_glue_decode_runs_the_fast_paths(monkeypatch) -> None:
    """The decode steps of a glued model run the C attention and routing (not silently the
    references): counted through the library."""
    torch.manual_seed(5)
    model = apply_decode_glue(apply_decode_kernels(MoETransformer(_cfg()).eval()), True, True)
    calls = _count_glue_calls(monkeypatch)
    _decode(model, torch.randint(0, 97, (1, 8)), 4)
    n_steps, n_layers = 4, 2
    assert calls == {"attend": n_steps * n_layers, "route": n_steps * n_layers}


@needs_glue
@pytest.mark.parametrize("where", ["router", "experts", "q_proj", "o_proj", "global"])
def test_hooks_make_the_glue_run_the_reference(monkeypatch, where: str) -> None:
    """A forward hook the glue would bypass (it runs the router's, experts' and projections'
    products itself) sends the step through the reference, which calls the module: the hook
    sees every decode step. Removed, the fast paths run again."""
    torch.manual_seed(8)
    model = apply_decode_glue(apply_decode_kernels(MoETransformer(_cfg()).eval()), True, True)
    ids = torch.randint(0, 97, (1, 8))
    ref = _decode(model, ids, 4)
    calls, seen = _count_glue_calls(monkeypatch), []
    module = {
        "router": model.moe_layers()[0].router,
        "experts": model.moe_layers()[0].experts,
        "q_proj": model.layers[0].attn.q_proj,
        "o_proj": model.layers[0].attn.o_proj,
    }.get(where)
    if module is None:
        handle = nn.modules.module.register_module_forward_pre_hook(lambda m, a: seen.append(m))
    elif where == "experts":  # the reference runs forward_selected, no hook: only the fallback
        handle = module.register_forward_pre_hook(lambda m, a: seen.append(m))
    else:
        handle = module.register_forward_hook(lambda m, a, out: seen.append(m))
    try:
        torch.testing.assert_close(_decode(model, ids, 4), ref, rtol=1e-5, atol=1e-6)
    finally:
        handle.remove()
    layer_calls = {"router": 5, "q_proj": 5, "o_proj": 5, "experts": 0}  # prefill + 4 steps
    # (the reference attention still runs the C attention step: it calls no module)
    if where == "global":
        assert len(seen) > 100 and calls["route"] == 0
    else:
        assert len(seen) == layer_calls[where]
    if where in ("router", "experts"):
        assert calls["route"] == 4  # layer 1's steps only: layer 0's ran the reference
    before = dict(calls)
    _decode(model, ids, 4)
    assert calls == {k: v + 8 for k, v in before.items()}


@needs_glue
def test_route_buffers_are_each_threads_own() -> None:
    """The routing's scratch is written by a C call that releases the GIL: two threads decoding
    at once must not share it."""
    here = decode_glue._route_buffers(6, 2)
    assert decode_glue._route_buffers(6, 2) is here
    there = []
    thread = threading.Thread(target=lambda: there.append(decode_glue._route_buffers(6, 2)))
    thread.start()
    thread.join()
    assert all(a is not b for a, b in zip(there[0], here, strict=True))


def _plain_copy(model: MoETransformer) -> MoETransformer:
    plain = MoETransformer(model.cfg).eval()
    plain.load_state_dict(model.state_dict())
    return plain


def test_deepcopy_of_a_glued_model_follows_its_own_weights() -> None:
    """A deepcopy clones each parameter: the copy's q/k/v no longer view the fused tensor it also
    copied, so the glue must run its projections' own (changed) weights, not the stale fusion."""
    torch.manual_seed(9)
    model = apply_decode_glue(apply_decode_kernels(MoETransformer(_cfg()).eval()), True)
    ids = torch.randint(0, 97, (1, 10))
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for layer in clone.layers:
            layer.attn.q_proj.weight.mul_(-2.0)
            layer.attn.v_proj.weight.add_(0.1)
    expected = _decode(_plain_copy(clone), ids, 4)
    torch.testing.assert_close(_decode(clone, ids, 4), expected, rtol=1e-4, atol=1e-5)
    # the original still runs its own weights, unchanged
    torch.testing.assert_close(
        _decode(model, ids, 4), _decode(_plain_copy(model), ids, 4), rtol=1e-4, atol=1e-5
    )


def test_replaced_qkv_data_is_not_read_from_the_stale_fusion() -> None:
    """`param.data = ...` gives a projection other memory: the glue runs it, not the fusion."""
    torch.manual_seed(10)
    model = apply_decode_glue(
        apply_decode_kernels(MoETransformer(_cfg(attn_bias=True)).eval()), True
    )
    ids = torch.randint(0, 97, (1, 10))
    for layer in model.layers:
        k = layer.attn.k_proj
        k.weight.data = torch.randn_like(k.weight) * 0.2
        k.bias.data = torch.randn_like(k.bias)
    torch.testing.assert_close(
        _decode(model, ids, 4), _decode(_plain_copy(model), ids, 4), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize(
    "overrides",
    [
        {"mtp_depth": 1},
        {"mtp_depth": 1, "moe": None, "d_ff": 48, "tie_embeddings": True},
        {"mtp_depth": 1, "attn_bias": True, "n_kv_heads": 1},
    ],
)
def test_speculative_decoding_with_glue_gives_greedys_tokens(overrides: dict) -> None:
    """Speculative decoding (verification forwards of several positions, the MTP depth's own
    cache) on a glued model still gives plain greedy's tokens."""
    torch.manual_seed(6)
    model = MoETransformer(_cfg(**overrides)).eval()
    x = torch.randint(0, 97, (1, 7))
    expected = generate(model, x, 24)
    apply_decode_kernels(model)  # which applies the glue too
    assert torch.equal(generate(model, x, 24), expected)
    assert torch.equal(generate(model, x, 24, speculative="mtp", draft_tokens=2), expected)


def test_glue_moe_forward_runs_other_experts_through_their_decode_path() -> None:
    """Experts of another class (offloaded, quantized) keep their own `forward_selected`."""
    from moekit.experts.experts import Experts
    from moekit.moe import MoELayer

    class OtherExperts(Experts):
        calls = 0

        def forward_selected(self, x_TD, ids_TK, weights_TK):
            OtherExperts.calls += 1
            return super().forward_selected(x_TD, ids_TK, weights_TK)

    torch.manual_seed(7)
    cfg = MoEConfig(d_model=32, d_expert=16, n_experts=6, top_k=2)
    layer = MoELayer(cfg).eval()
    other = OtherExperts(cfg)
    other.load_state_dict(layer.experts.state_dict())
    x = torch.randn(1, 1, 32)
    with torch.no_grad():
        ref, _ = layer(x, with_aux=False, decoding=True)
        layer.experts = other
        y, _ = decode_glue.glue_moe_forward(layer, x, with_aux=False, decoding=True)
    assert OtherExperts.calls == 1
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)


def test_decode_benchmarks_contenders_leave_the_callers_model_alone() -> None:
    """benchmarks/decode.py's moekit side: its fp32 copy shares the caller's weights, but fusing
    q/k/v must re-point only the copy's (the caller's model runs llama.cpp's comparison)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "decode.py"
    spec = importlib.util.spec_from_file_location("benchmark_decode_contenders", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    torch.manual_seed(11)
    model = MoETransformer(_cfg(d_model=64, moe=MoEConfig(d_model=64, d_expert=32, n_experts=4)))
    model.eval()
    before = {n: (p.data_ptr(), p.untyped_storage().nbytes()) for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    contenders = dict(bench.moekit_contenders(model))
    after = {n: (p.data_ptr(), p.untyped_storage().nbytes()) for n, p in model.named_parameters()}
    assert after == before
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    fp32 = contenders["moekit_fp32"]
    assert fp32.norm.weight is model.norm.weight  # what the glue leaves alone stays shared
    ids = torch.randint(0, 97, (1, 8))
    torch.testing.assert_close(_decode(fp32, ids, 4), _decode(model, ids, 4), rtol=1e-4, atol=1e-5)
