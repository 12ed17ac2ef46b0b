"""Speculative decoding from a run: with its experts offloaded (greedy tokens unchanged) and from
`moekit generate RUN --speculative=mtp --draft_tokens=N` (statistics at the end, one clear error
for a model without an MTP head)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moekit import ModelConfig, MoETransformer
from moekit.cli import main
from moekit.data import byte_tokenizer
from moekit.inference import apply_decode_kernels
from moekit.inference.offloaded_experts import OffloadedExperts
from moekit.interop.convert import hf_run_config
from moekit.loading import load
from moekit.model.generation import generate
from moekit.model.speculative import SpeculativeStats
from moekit.train.checkpoint import write_new_run

TINY = ModelConfig.preset("tiny").replace(vocab_size=257)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, tuple[MoETransformer, Path]]:
    """Tiny runs (step 0, byte tokenizer) with mtp_depth 1 and 0."""
    work = tmp_path_factory.mktemp("speculative")
    byte_tokenizer().save(str(work / "tokenizer.json"))
    made = {}
    for depth in (1, 0):
        cfg = TINY.replace(mtp_depth=depth)
        torch.manual_seed(0)
        model = MoETransformer(cfg).eval()
        tokenizer = work / "tokenizer.json"
        run = write_new_run(work / f"run{depth}", hf_run_config(cfg), model, tokenizer)
        made[depth] = model, run
    return made


@pytest.mark.parametrize("budget", [2, "50%"])
@pytest.mark.parametrize("kernels", [False, True])
def test_offloaded_speculative_greedy_equals_resident_plain_greedy(runs, budget, kernels) -> None:
    """One verification runs its tokens' experts through the offloaded decode path, a draft its
    MTP block's: every MoE layer's experts, the MTP block's too, are offloaded."""
    model, run = runs[1]
    prompt = torch.randint(0, 257, (1, 9), generator=torch.Generator().manual_seed(4))
    expected = generate(model, prompt, 21)
    loaded = load(run, experts=budget)
    try:
        layers = loaded.model.moe_layers(with_mtp=True)
        assert len(layers) == len(loaded.model.moe_layers()) + 1
        assert all(isinstance(layer.experts, OffloadedExperts) for layer in layers)
        if kernels:
            apply_decode_kernels(loaded.model)
        for n in (1, 2, 4):
            got = generate(loaded.model, prompt, 21, speculative="mtp", draft_tokens=n)
            assert torch.equal(got, expected), n
        assert loaded.offload.stats()["misses"] > 0
    finally:
        loaded.offload.close()


def test_generate_speculative_prints_its_statistics_and_the_plain_text(runs, capsys) -> None:
    _, run = runs[1]
    args = ["generate", str(run), "--prompt=def f(", "--max_new_tokens=14", "--temperature=0"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main([*args, "--speculative=mtp", "--draft_tokens=3", "--offload.budget=50%"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith(plain) and "expert cache" in out.out[len(plain) :]
    stats = out.err.splitlines()[-1]
    assert stats.startswith("speculative (mtp, 3 drafts): acceptance by position [") and (
        "tokens per verification" in stats and "tokens/s" in stats
    )
    assert main([*args, "--speculative=mtp", "--temperature=0.8"]) == 0  # sampling runs too
    assert "speculative (mtp, 2 drafts)" in capsys.readouterr().err


def test_generate_speculative_without_an_mtp_head_is_one_line_saying_how(runs, capsys) -> None:
    _, run = runs[0]
    assert main(["generate", str(run), "--prompt=x", "--speculative=mtp"]) == 2
    out = capsys.readouterr()
    assert out.out == ""  # refused before any text
    (line,) = [line for line in out.err.splitlines() if "error" in line]
    assert "mtp_depth=0: train one with --model.mtp_depth=1" in line
    assert "--train.init_from=RUN --model.mtp_depth=1 --train.freeze=model" in line
    assert main(["generate", str(run), "--speculative=mtp", "--draft_tokens=0"]) == 2
    assert "draft_tokens" in capsys.readouterr().err


def test_stats_report_what_a_call_measured() -> None:
    stats = SpeculativeStats()
    stats.start(3)
    for n, n_ok in [(3, 3), (3, 1), (2, 0)]:
        stats.count(n, n_ok)
    stats.new_tokens, stats.seconds = 7, 0.5
    assert stats.acceptance_rates == [2 / 3, 1 / 3, 1 / 2]
    assert stats.mean_accepted_length == 1 + 4 / 3 and stats.tokens_per_s == 14.0
    assert "acceptance by position [66.7%, 33.3%, 50.0%]" in stats.format()
