"""KV-cache decoding and sampling."""

from __future__ import annotations

import copy

import pytest
import torch

from moekit import ModelConfig, MoETransformer
from moekit.model.generation import KVCache, generate, sample_next, sampling_probs

TINY = ModelConfig.preset("tiny")


def prompt(batch: int = 2, seq: int = 5) -> torch.Tensor:
    return torch.randint(0, TINY.vocab_size, (batch, seq))


@pytest.mark.parametrize(("window", "prefill"), [(None, 6), (None, 1), (4, 6), (3, 2)])
def test_cached_decoding_equals_full_forward(window: int | None, prefill: int) -> None:
    model = MoETransformer(TINY.replace(sliding_window=window, qk_norm="head")).eval()
    x = prompt(2, 14)
    full = model(x).logits
    cache = KVCache.for_model(model, batch_size=2, max_len=14)
    pieces = [model(x[:, :prefill], kv_cache=cache).logits]
    for t in range(prefill, 14):
        pieces.append(model(x[:, t : t + 1], kv_cache=cache).logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5)


def test_chunked_prefill_equals_full_forward() -> None:
    model = MoETransformer(TINY.replace(sliding_window=5)).eval()
    x = prompt(1, 12)
    cache = KVCache.for_model(model, batch_size=1, max_len=12)
    chunks = [model(x[:, i : i + 4], kv_cache=cache).logits for i in range(0, 12, 4)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), model(x).logits, rtol=0, atol=1e-5)


def test_logits_to_keep_is_the_last_positions_logits() -> None:
    """The head on the last positions only (generation's prefill), as the full forward's; with
    labels, or below 1, refused."""
    model = MoETransformer(TINY.replace(mtp_depth=1)).eval()
    x = prompt(2, 9)
    full = model(x)
    for keep in (1, 3, 9):
        kept = model(x, logits_to_keep=keep)
        assert kept.logits.shape == (2, keep, TINY.vocab_size)
        torch.testing.assert_close(kept.logits, full.logits[:, -keep:], rtol=0, atol=1e-6)
        assert torch.equal(kept.hidden, full.hidden)
    for bad in ({"labels": x, "logits_to_keep": 1}, {"logits_to_keep": 0}):
        with pytest.raises(ValueError, match="logits_to_keep"):
            model(x, **bad)


def test_a_cache_grows_keeping_what_it_holds() -> None:
    """KVCache.reserve reallocates every layer, the MTP one too, and keeps the filled positions:
    decoding on from the grown cache gives the logits of one that was large from the start."""
    model = MoETransformer(TINY.replace(mtp_depth=1)).eval()
    x = prompt(1, 12)
    small, large = (KVCache.for_model(model, 1, n, mtp=True) for n in (6, 12))
    with torch.no_grad():
        for cache in (small, large):
            model(x[:, :6], kv_cache=cache)
        small.reserve(12)
        assert small.max_len == 12 == small.mtp.k_BKLd.shape[2] and small.length == 6
        grown, whole = (model(x[:, 6:], kv_cache=c).logits for c in (small, large))
    torch.testing.assert_close(grown, whole, rtol=0, atol=0)


def test_greedy_is_deterministic_and_follows_the_argmax() -> None:
    model = MoETransformer(TINY)
    x = prompt()
    new = generate(model, x, 6)
    assert torch.equal(new, generate(model, x, 6))
    logits = model.eval()(torch.cat([x, new], dim=1)).logits
    assert torch.equal(logits[:, x.shape[1] - 1 : -1].argmax(-1), new)


def test_generate_restores_training_mode() -> None:
    model = MoETransformer(TINY).train()
    generate(model, prompt(), 2)
    assert model.training


def test_top_k_samples_only_the_k_best() -> None:
    logits = torch.randn(4, 50)
    allowed = logits.topk(3, dim=-1).indices
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(logits, 1.0, top_k=3, generator=g) for _ in range(300)], 1)
    assert (draws[:, :, None] == allowed[:, None, :]).any(-1).all()
    assert all(len(row.unique()) == 3 for row in draws)


def test_top_p_samples_only_the_nucleus() -> None:
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([sample_next(probs.log(), 1.0, top_p=0.7, generator=g) for _ in range(300)])
    assert set(draws.tolist()) == {1, 3}


def test_temperature_sampling_reaches_beyond_the_argmax() -> None:
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5]])
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([sample_next(logits, 1.0, generator=g) for _ in range(300)])
    assert set(draws.tolist()) == {0, 1, 2, 3}


def test_temperature_divides_the_logits_before_top_k_and_top_p() -> None:
    """sampling_probs (what sample_next draws from) at temperature T is softmax(logits / T),
    restricted after the division: probabilities (0.5, 0.3, 0.15, 0.05) at T = 0.25 become
    p^4 renormalised, (0.877, 0.114, 0.007, 0.000), so a top_p of 0.7 keeps the best token
    alone (at T = 1 it keeps two), and the draws follow the sharpened distribution."""
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = p.log()
    sharp = p**4 / (p**4).sum()
    torch.testing.assert_close(sampling_probs(logits, 0.25), sharp)
    flat = p**0.5 / (p**0.5).sum()  # T = 2
    torch.testing.assert_close(sampling_probs(logits, 2.0), flat)
    assert sampling_probs(logits, 1.0, top_p=0.7).nonzero()[:, 1].tolist() == [0, 1]
    assert sampling_probs(logits, 0.25, top_p=0.7).tolist() == [[1.0, 0.0, 0.0, 0.0]]
    top2 = sampling_probs(logits, 2.0, top_k=2)
    torch.testing.assert_close(
        top2, torch.cat([flat[:, :2] / flat[:, :2].sum(), torch.zeros(1, 2)], 1)
    )
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([sample_next(logits, 0.25, generator=g) for _ in range(2000)])
    share = torch.bincount(draws, minlength=4).float() / 2000
    assert (share - sharp[0]).abs().max() < 0.03  # about 4 standard errors


def test_sampling_is_reproducible_with_a_generator() -> None:
    model = MoETransformer(TINY)
    x = prompt()

    def run() -> torch.Tensor:
        return generate(model, x, 8, temperature=1.0, generator=torch.Generator().manual_seed(3))

    assert torch.equal(run(), run())


def test_eos_stops_a_sequence_and_pads_it() -> None:
    model = MoETransformer(TINY)
    x = prompt(2, 5)
    free = generate(model, x, 8)
    eos = int(free[0, 2])
    stopped = generate(model, x, 8, eos_token_id=eos, pad_token_id=-1)
    first = int((free[0] == eos).nonzero()[0])
    assert torch.equal(stopped[0, : first + 1], free[0, : first + 1])
    assert (stopped[0, first + 1 :] == -1).all()
    row1_end = int((free[1] == eos).nonzero()[0]) + 1 if (free[1] == eos).any() else 8
    assert torch.equal(stopped[1, :row1_end], free[1, :row1_end])


def test_generation_ends_when_every_sequence_has_ended() -> None:
    model = MoETransformer(TINY)
    x = prompt(1, 5)
    free = generate(model, x, 8)
    stopped = generate(model, x, 8, eos_token_id=int(free[0, 1]))
    first = int((free[0] == free[0, 1]).nonzero()[0])
    assert torch.equal(stopped, free[:, : first + 1])


def test_stream_receives_every_new_column() -> None:
    model = MoETransformer(TINY)
    seen: list[torch.Tensor] = []
    new = generate(model, prompt(), 4, stream=seen.append)
    assert torch.equal(torch.stack(seen, dim=1), new)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(max_new_tokens=200), "max_seq_len=128"),
        (dict(max_new_tokens=2, temperature=-1.0), "temperature=-1.0"),
        (dict(max_new_tokens=2, temperature=1.0, top_k=0), "top_k=0"),
        (dict(max_new_tokens=2, temperature=1.0, top_p=1.5), "top_p=1.5"),
    ],
)
def test_bad_generation_arguments_are_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate(MoETransformer(TINY), prompt(), **kwargs)


def test_expert_choice_models_cannot_generate() -> None:
    moe = TINY.moe.replace(router="expert_choice", capacity_factor=1.0, aux_loss_coef=0.0)
    with pytest.raises(ValueError, match="not causal"):
        generate(MoETransformer(TINY.replace(moe=moe)), prompt(), 2)


def greedy_logits(model: MoETransformer, x: torch.Tensor, n: int) -> torch.Tensor:
    """The logits (B, n, V) of n greedy steps after the prompt x (B, S)."""
    cache = KVCache.for_model(model, x.shape[0], x.shape[1] + n)
    steps = []
    with torch.no_grad():
        step = model(x, kv_cache=cache).logits[:, -1]
        for _ in range(n):
            steps.append(step)
            step = model(step.argmax(-1)[:, None], kv_cache=cache).logits[:, -1]
    return torch.stack(steps, 1)


def test_selected_experts_decode_path_gives_the_dispatch_tokens_and_logits(monkeypatch) -> None:
    model = MoETransformer(TINY).eval()
    x = prompt(3, 20)  # the prefill (60 tokens) takes the dispatch, each decode step (3) does not
    with torch.no_grad():
        assert model.moe_layers()[0].selected_path(3, decoding=True)
    fast_ids, fast_logits = generate(model, x, 8), greedy_logits(model, x, 8)
    monkeypatch.setattr("moekit.moe.SELECTED_MAX_TOKENS", 0)
    assert torch.equal(generate(model, x, 8), fast_ids)
    torch.testing.assert_close(greedy_logits(model, x, 8), fast_logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 4])
def test_decode_kernels_give_the_reference_tokens_and_logits(batch: int) -> None:
    """The decode steps' products through moekit.inference.decode_kernels against torch's
    F.linear (the model as built)."""
    from moekit.inference import decode_kernels

    assert decode_kernels.available()
    model = MoETransformer(TINY).eval()
    x = prompt(batch, 6)
    fast = decode_kernels.apply_decode_kernels(copy.deepcopy(model))
    fast_ids, fast_logits = generate(fast, x, 10), greedy_logits(fast, x, 10)
    assert torch.equal(generate(model, x, 10), fast_ids)
    torch.testing.assert_close(greedy_logits(model, x, 10), fast_logits, rtol=0, atol=1e-5)


def test_the_decode_path_is_chosen_by_the_kv_cache_not_by_grad_mode() -> None:
    """A forward without a cache runs the dispatch, with or without autograd; a decode step with
    a cache runs only the chosen experts (`Experts.forward_selected`), with or without it."""
    model = MoETransformer(TINY).eval()
    layer = model.moe_layers()[0]
    x = prompt(1, 3)
    calls: list[str] = []
    layer.experts.register_forward_pre_hook(lambda module, args: calls.append("dispatch"))
    with torch.no_grad():
        model(x)
    assert calls == ["dispatch"]
    calls.clear()
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            model(x, kv_cache=KVCache.for_model(model, 1, 3))
    assert calls == []


def test_sampling_from_logits_that_are_not_finite_is_one_error() -> None:
    """torch.multinomial's "probability tensor contains either inf, nan or element < 0" was a
    traceback (an upcycle with --noise=1e30, say)."""
    logits = torch.tensor([[0.0, float("nan"), 1.0]])
    with pytest.raises(ValueError, match="the model's logits are not finite"):
        sample_next(logits, temperature=0.8, generator=torch.Generator())
