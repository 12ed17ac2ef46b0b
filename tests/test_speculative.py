"""Self-speculative decoding with the MTP head: the MTP depth's own KV cache, greedy output equal
to plain greedy (rejections forced at every draft position), the sampling rule's distribution
equal to the model's, statistics, the decode kernels and bad input."""

from __future__ import annotations

import pytest
import torch

import moekit.model.speculative as speculative
from moekit import ModelConfig, MoETransformer
from moekit.config import MLAConfig
from moekit.inference import apply_decode_kernels
from moekit.inference.decode_kernels import kernel_expert_ffn
from moekit.model.generation import KVCache, generate, sampling_probs
from moekit.model.speculative import SpeculativeStats

TINY = ModelConfig.preset("tiny").replace(mtp_depth=1)
MLA = MLAConfig(q_lora_rank=12, kv_lora_rank=10, qk_nope_head_dim=8, qk_rope_head_dim=4,
                v_head_dim=6)  # fmt: skip
VARIANTS = {
    "gqa_moe": TINY,
    "mla_window_depth2": TINY.replace(mla=MLA, n_kv_heads=None, sliding_window=5, mtp_depth=2),
    "dense_tied": TINY.replace(moe=None, tie_embeddings=True),
}


def model_of(cfg: ModelConfig, seed: int = 0) -> MoETransformer:
    torch.manual_seed(seed)
    return MoETransformer(cfg).eval()


def prompt(length: int, seed: int = 0, vocab: int = 256) -> torch.Tensor:
    return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_mtp_step_on_its_cache_equals_the_full_forwards_first_depth(variant: str) -> None:
    """Prefill and decode in pieces, the MTP depth fed the main model's hidden states and the next
    tokens: its logits equal depth 1's in one forward, also after a crop and a recomputation."""
    model = model_of(VARIANTS[variant])
    x = prompt(14)
    with torch.no_grad():
        expected = model(x, mtp=True).mtp_logits[0][:, :13]  # position 13 has no next token
        cache = KVCache.for_model(model, 1, 14, mtp=True)
        got, start = [], 0
        for end in (6, 7, 8, 11, 14):
            hidden = model(x[:, start:end], kv_cache=cache).hidden
            stop = min(end, 13)
            h, ids = hidden[:, : stop - start], x[:, start + 1 : stop + 1]
            got.append(model.mtp_step(h, ids, cache)[0])
            start = end
        torch.testing.assert_close(torch.cat(got, 1), expected, rtol=0, atol=1e-5)
        cache.crop(9)
        cache.mtp.crop(9)
        hidden = model(x[:, 9:], kv_cache=cache).hidden
        assert cache.length == 14
        redone = model.mtp_step(hidden[:, :4], x[:, 10:], cache)[0]
    torch.testing.assert_close(redone, expected[:, 9:], rtol=0, atol=1e-5)


def test_a_cache_cannot_crop_beyond_what_it_holds() -> None:
    cache = KVCache(TINY, 1, 8, mtp=True)
    with pytest.raises(ValueError, match="cannot crop a KV cache of 0 positions to 3"):
        cache.crop(3)
    with pytest.raises(ValueError, match=r"KVCache\(mtp=True\) needs a model with multi-token"):
        KVCache(TINY.replace(mtp_depth=0), 1, 8, mtp=True)
    with pytest.raises(ValueError, match=r"a cached MTP depth runs through mtp_step"):
        model_of(TINY)(prompt(2), kv_cache=KVCache(TINY, 1, 8, mtp=True), mtp=True)
    with pytest.raises(ValueError, match="kv_cache has no MTP layer"):
        model_of(TINY).mtp_step(torch.zeros(1, 1, 48), torch.zeros(1, 1, dtype=torch.long),
                                KVCache(TINY, 1, 8))  # fmt: skip


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("draft_tokens", [1, 2, 3, 5])
def test_greedy_speculative_equals_plain_greedy(variant: str, draft_tokens: int) -> None:
    """The model's own (untrained) MTP head: nearly every draft is rejected, at every position."""
    model = model_of(VARIANTS[variant])
    for seed, (length, new) in enumerate([(1, 9), (5, 17), (12, 30)]):
        x = prompt(length, seed)
        expected = generate(model, x, new)
        stats = SpeculativeStats()
        got = generate(model, x, new, speculative="mtp", draft_tokens=draft_tokens, stats=stats)
        assert torch.equal(got, expected), (seed, got, expected)
        assert stats.new_tokens == new and len(stats.acceptance_rates) == draft_tokens


def oracle_drafts(truth: list[int], prompt_len: int, wrong_at):
    """A `_draft` that runs the real one (its cache work included) and then proposes the true
    greedy continuation, except at the positions `wrong_at(round, n)` returns."""
    real = speculative._draft
    rounds = []

    def drafts(model, cache, h, next_ids, n, *args):
        _, q, kept = real(model, cache, h, next_ids, n, *args)
        done = cache.length - prompt_len + 1  # tokens emitted so far: t_L is truth[done - 1]
        proposal = (truth[done : done + n] + [0] * n)[:n]
        for j in wrong_at(len(rounds), n):
            proposal[j] = (proposal[j] + 1) % 256
        rounds.append(n)
        return proposal, q, kept

    return drafts


WRONG_AT = {  # round r, n drafts (0 in a last round with room for one token) -> wrong positions
    "none": lambda r, n: [],
    "first": lambda r, n: [0][:n],
    "last": lambda r, n: [n - 1][:n],
    "alternating": lambda r, n: ([0] if r % 2 else [n - 1])[:n],
    "random": lambda r, n: [j for j in range(n) if (r * 7 + j * 3) % 5 == 0],
}


@pytest.mark.parametrize("wrong", list(WRONG_AT))
@pytest.mark.parametrize(("draft_tokens", "new"), [(1, 10), (2, 14), (3, 17), (4, 23)])
def test_greedy_rollback_after_rejections_anywhere(monkeypatch, wrong, draft_tokens, new) -> None:
    """Drafts right but for forced rejections (none, always the first, always the last, ...):
    the output is plain greedy's, both caches having rolled back past every rejection. new is
    not a multiple of draft_tokens + 1, so the last round drafts fewer."""
    model = model_of(VARIANTS["gqa_moe"])
    x = prompt(6, 3)
    expected = generate(model, x, new)
    truth = expected[0].tolist()
    monkeypatch.setattr(speculative, "_draft", oracle_drafts(truth, 6, WRONG_AT[wrong]))
    stats = SpeculativeStats()
    got = generate(model, x, new, speculative="mtp", draft_tokens=draft_tokens, stats=stats)
    assert torch.equal(got, expected)
    rates = stats.acceptance_rates
    if wrong == "none":
        assert rates == [1.0] * draft_tokens
        assert stats.verifications == -(-(new - 1) // (draft_tokens + 1))
    if wrong == "first":
        assert rates == [0.0] * draft_tokens and stats.mean_accepted_length == 1.0
    if wrong == "last":
        assert rates[-1] == 0.0


def test_eos_ends_the_output_as_plain_generate_does(monkeypatch) -> None:
    model = model_of(VARIANTS["gqa_moe"])
    x = prompt(4, 5)
    truth = generate(model, x, 20)[0].tolist()
    eos = truth[7]
    expected = generate(model, x, 20, eos_token_id=eos)
    assert expected[0].tolist() == truth[: truth.index(eos) + 1]
    streamed = []
    got = generate(model, x, 20, eos_token_id=eos, speculative="mtp", draft_tokens=3,
                   stream=lambda ids: streamed.append(int(ids[0])))  # fmt: skip
    assert torch.equal(got, expected) and streamed == expected[0].tolist()
    monkeypatch.setattr(speculative, "_draft", oracle_drafts(truth, 4, WRONG_AT["none"]))
    got = generate(model, x, 20, eos_token_id=eos, speculative="mtp", draft_tokens=3)
    assert torch.equal(got, expected)  # the EOS accepted mid-round ends it there


def test_greedy_speculative_with_the_decode_kernels() -> None:
    model = model_of(VARIANTS["gqa_moe"])
    x = prompt(5, 2)
    apply_decode_kernels(model)
    assert model.mtp[0].block.ffn.experts.expert_ffn is kernel_expert_ffn  # the MTP block's too
    for n in (1, 3):
        expected = generate(model, x, 19)
        assert torch.equal(generate(model, x, 19, speculative="mtp", draft_tokens=n), expected)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"draft_tokens": 0}, r"draft_tokens=0 is invalid: must be an integer >= 1"),
        ({"speculative": "eagle"}, r"speculative='eagle' is invalid: must be 'mtp' or None"),
        ({"stats": SpeculativeStats()}, r"speculative=None is invalid: must be 'mtp' or None"),
    ],
)
def test_bad_speculative_arguments_are_one_clear_error(kwargs, message) -> None:
    model = model_of(VARIANTS["dense_tied"])
    kwargs = {"speculative": "mtp", **kwargs} if "stats" not in kwargs else kwargs
    with pytest.raises(ValueError, match=message):
        generate(model, prompt(3), 4, **kwargs)


def test_speculative_needs_an_mtp_head_and_one_sequence() -> None:
    with pytest.raises(ValueError, match=r"mtp_depth=0: train one with --model.mtp_depth=1, or"):
        generate(model_of(TINY.replace(mtp_depth=0)), prompt(3), 4, speculative="mtp")
    with pytest.raises(ValueError, match=r"one sequence at a time, got a batch of 2"):
        generate(model_of(TINY), prompt(3).repeat(2, 1), 4, speculative="mtp")


def exact_distribution(model, x, temperature, top_k, top_p) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's exact distribution of its first three new tokens (V, V, V) and of the fourth
    (V,), from full forwards over every continuation."""
    V, S = model.cfg.vocab_size, x.shape[1]
    grid = torch.cartesian_prod(*[torch.arange(V)] * 3)  # (V^3, 3)
    with torch.no_grad():
        logits = model(torch.cat([x.expand(len(grid), S), grid], 1)).logits[:, S - 1 :]
    p = sampling_probs(logits.reshape(-1, V), temperature, top_k, top_p).view(len(grid), 4, V)
    a, b, c = grid.T
    joint3 = p[:, 0, :].gather(1, a[:, None])[:, 0] * p[:, 1].gather(1, b[:, None])[:, 0]
    joint3 = joint3 * p[:, 2].gather(1, c[:, None])[:, 0]  # P(a, b, c), one row per (a, b, c)
    fourth = (joint3[:, None] * p[:, 3]).sum(0)
    return joint3.view(V, V, V), fourth


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(1.0, None, None), (0.7, 3, 0.9)])
def test_sampled_speculative_output_follows_the_models_distribution(temperature, top_k, top_p):
    """With 2 drafts a round and 4 tokens, tokens 2-3 are drafts accepted or resampled and token 4
    a bonus or a correction. Their empirical distribution over 1000 seeds is within total
    variation 0.06 of the exact one (measured: 0.003-0.023; at 2000 seeds 0.004-0.02, as plain
    sampling's 0.004-0.016), while accepting every draft lands over 0.5 away (measured: 0.9-1.0):
    the bound has power."""
    cfg = TINY.replace(vocab_size=4, moe=None)
    model = model_of(cfg, seed=1)
    model.init_weights(std=0.4)  # peaked, different main and draft distributions
    x = prompt(3, 0, vocab=4)
    joint3, fourth = exact_distribution(model, x, temperature, top_k, top_p)
    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
    stats = SpeculativeStats()

    def empirical(n: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        counts3, counts4, accepted_first = torch.zeros(4, 4, 4), torch.zeros(4), 0.0
        for seed in range(n):
            g = torch.Generator().manual_seed(seed)
            ids = generate(model, x, 4, **sampling, generator=g, speculative="mtp",
                           draft_tokens=2, stats=stats)[0].tolist()  # fmt: skip
            counts3[ids[0], ids[1], ids[2]] += 1
            counts4[ids[3]] += 1
            accepted_first += stats.acceptance_rates[0]
        return counts3 / n, counts4 / n, accepted_first / n

    got3, got4, accepted_first = empirical(1000)
    tv3, tv4 = 0.5 * (got3 - joint3).abs().sum(), 0.5 * (got4 - fourth).abs().sum()
    assert tv3 < 0.06 and tv4 < 0.06, (tv3, tv4)
    assert 0.1 < accepted_first < 0.9  # both branches of the rule ran

    def accept_all(drafts, p, q, generator):
        return len(drafts), int(torch.multinomial(p[len(drafts)], 1, generator=generator))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(speculative, "_accept_sampled", accept_all)
        naive3, _, _ = empirical(200)
    assert 0.5 * (naive3 - joint3).abs().sum() > 0.5
