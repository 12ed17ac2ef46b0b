"""The decode step's fast paths against their references: the single-token expert path of
`selected_experts_forward`, the C glue of `moekit.inference.decode_glue` (RMSNorm, one position's
attention) against nn.RMSNorm and `cached_attention`, and whole cached decodes with them (the
whole-layer calls of `decode_layers`: tests/test_decode_layers.py)."""

from __future__ import annotations

import pytest
import torch
from tests.c_kernels import decode_logits, needs_c_kernels
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
from moekit.model.generation import generate
from moekit.model.rope import rope_angles


def _cfg(**overrides) -> ModelConfig:
    d = 32
    moe = MoEConfig(d_model=d, d_expert=16, n_experts=6, top_k=2)
    args = dict(vocab_size=97, d_model=d, n_layers=2, n_heads=4, n_kv_heads=2, moe=moe)
    args.update(max_seq_len=64)
    args.update(overrides)
    return ModelConfig(**args)


needs_glue = needs_c_kernels


@needs_glue
def test_glue_is_built_here() -> None:
    """Where a compiler is found and the glue is not switched off, it must be live."""
    assert decode_glue._library() is not None


def test_single_token_experts_match_the_general_path() -> None:
    """T == 1 takes its own branch: it must equal the general path bit for bit (the per-expert
    gather/scatter loop, or in float32 on CPU its one C combine; the general path's result for
    one row is what a two-row call gives its first row)."""
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


def test_rms_norm_of_a_split_runs_in_c(monkeypatch) -> None:
    """Rows that are a split's (latent attention's latent of a few positions: each row
    contiguous, the rows strided) run in C too, with the contiguous rows' numbers."""
    x = torch.randn(2, 3, 96 + 16, generator=torch.Generator().manual_seed(5))
    latent = x.split([96, 16], dim=-1)[0]
    w = torch.randn(96)
    want = rms_norm(latent.contiguous(), w, 1e-6)
    monkeypatch.setattr(torch, "rms_norm", None)  # the fallback would fail
    assert torch.equal(rms_norm(latent, w, 1e-6), want)


def test_rms_norm_falls_back_to_torch() -> None:
    """Gradients, many rows, other dtypes and no weight run torch.rms_norm itself."""
    x = torch.randn(decode_glue.MAX_NORM_NUMBERS // 8 + 1, 8)
    w = torch.randn(8, requires_grad=True)
    y = rms_norm(x, w, 1e-6)
    assert y.grad_fn is not None
    y.sum().backward()
    assert w.grad is not None
    with torch.no_grad():
        assert torch.equal(rms_norm(x, w, 1e-6), torch.rms_norm(x, (8,), w, 1e-6))  # many
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
@pytest.mark.parametrize(
    ("with_sinks", "window"), [(False, None), (True, None), (False, 4), (True, 4)]
)
def test_glue_attention_matches_cached_attention(B, H, KV, hd, filled, with_sinks, window) -> None:
    """Sinks (GPT-OSS) large enough to take most of the probability of some heads and none of
    others; a sliding window of 4 keys (biting once 4 positions are cached)."""
    q, k, v, rope, cache = _attention_case(B, H, KV, hd, filled)
    sinks = torch.linspace(-4.0, 4.0, H) if with_sinks else None
    mask = attention_mask(filled, 1, window)
    fast_cache = cache()
    assert decode_glue._attention_qualifies(q, k, v, rope, mask, fast_cache, sinks)
    ref_cache = cache()
    ref = cached_attention(q, k, v, rope, mask, ref_cache, sinks)
    out = glue_cached_attention(q, k, v, rope, mask, fast_cache, sinks)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert fast_cache.length == ref_cache.length == filled + 1
    # The rotary embedding rounds as torch's: the cached keys are bit-identical.
    assert torch.equal(fast_cache.k_BKLd, ref_cache.k_BKLd)
    assert torch.equal(fast_cache.v_BKLd, ref_cache.v_BKLd)


def test_glue_attention_falls_back() -> None:
    """An explicit mask other than a sliding window's, sinks wanting a gradient, several
    positions, a full cache and gradients all run `cached_attention`."""
    q, k, v, rope, cache = _attention_case(1, 4, 2, 8, 6)
    windowed = attention_mask(6, 1, 3)
    windowed = AttentionMask(windowed.mask_SL, is_causal=False)  # (not said to be a window's)
    sinks = torch.zeros(4, requires_grad=True)
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


@pytest.mark.parametrize(
    "overrides",
    [{}, {"qk_norm": "head", "n_kv_heads": 4}, {"sliding_window": 5, "n_layers": 3}],
)
@pytest.mark.parametrize("batch", [1, 2])
def test_decode_with_glue_matches_plaindecode_logits(overrides: dict, batch: int) -> None:
    torch.manual_seed(0)
    model = MoETransformer(_cfg(**overrides)).eval()
    ids = torch.randint(0, 97, (batch, 24))
    ref = decode_logits(model, ids, 5)
    apply_decode_kernels(model)  # which applies the glue too
    assert any(isinstance(m, GlueRMSNorm) for m in model.modules())
    torch.testing.assert_close(decode_logits(model, ids, 5), ref, rtol=1e-4, atol=1e-5)
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


def test_decode_benchmarks_contenders_leave_the_callers_model_alone() -> None:
    """benchmarks/decode.py's moekit side: its fp32 copy shares the caller's weights and must
    change none of them (the caller's model runs llama.cpp's comparison)."""
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
    torch.testing.assert_close(
        decode_logits(fp32, ids, 4), decode_logits(model, ids, 4), rtol=1e-4, atol=1e-5
    )
