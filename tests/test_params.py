"""Parameter counts: every preset reproduces its published figures; the breakdown adds up."""

from __future__ import annotations

import pytest
import torch

from moekit import ModelConfig, MoETransformer
from moekit.config import MODEL_PRESETS
from moekit.model.params import PARTS, format_count, parameter_breakdown, parameter_table

# (total, active) to 3 significant figures. Published: Mixtral-8x7B 46.7B / 12.9B (Jiang et al.
# 2024); Mixtral-8x22B 141B / 39B (Mistral AI); Qwen3-30B-A3B 30.5B / 3.3B (model card; 3.35B
# counts the 48 routers, 12.6M, as active: they run for every token); OLMoE-1B-7B 6.92B / 1.28B
# (Muennighoff et al. 2024, "6.9B / 1.3B"); DeepSeek-V3 671B without its MTP module / 37.6B
# (DeepSeek-AI 2024 says 37B: see the test of the input embedding below); GPT-OSS-20B 20.9B / 4.19B
# (OpenAI's model card: 20.91B / 3.61B, likewise).
PUBLISHED = {
    "mixtral-8x7b": ("46.7B", "12.9B"),
    "mixtral-8x22b": ("141B", "39.2B"),
    "qwen3-30b-a3b": ("30.5B", "3.35B"),
    "olmoe-1b-7b": ("6.92B", "1.28B"),
    "deepseek-v3": ("671B", "37.6B"),
    "gpt-oss-20b": ("20.9B", "4.19B"),
}


def meta_model(name: str) -> MoETransformer:
    with torch.device("meta"):
        return MoETransformer(ModelConfig.preset(name))


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_preset_reproduces_published_counts(name: str) -> None:
    model = meta_model(name)
    main = (model.num_parameters(mtp=False), model.num_parameters(active=True, mtp=False))
    got = (format_count(main[0]), format_count(main[1]))
    assert got == PUBLISHED[name]


@pytest.mark.parametrize(
    ("name", "published_active"), [("deepseek-v3", "36.6B"), ("gpt-oss-20b", "3.61B")]
)
def test_deepseek_and_openai_count_active_without_the_input_embedding(
    name: str, published_active: str
) -> None:
    """moekit counts the input embedding as active (Mistral, Qwen and OLMoE do); DeepSeek-V3's
    "37B" (36.6B to 3 s.f.) and OpenAI's 3.61B leave that lookup table out."""
    cfg = ModelConfig.preset(name)
    model = meta_model(name)
    active = model.num_parameters(active=True, mtp=False) - cfg.vocab_size * cfg.d_model
    assert format_count(active) == published_active


def test_deepseek_v3_attention_is_latent_and_its_first_three_layers_dense() -> None:
    counts = parameter_breakdown(ModelConfig.preset("deepseek-v3"))
    d, h = 7168, 128
    per_layer = d * 1536 + 1536 * h * 192 + d * (512 + 64) + 512 * h * 256 + h * 128 * d
    assert counts["attention"] == 61 * per_layer
    assert counts["dense_ffn"] == 3 * 3 * d * 18432
    assert counts["routed_experts"] == 58 * 256 * 3 * d * 2048
    assert counts["shared_experts"] == 58 * 3 * d * 2048


def test_mixtral_8x7b_exact_count_from_its_config() -> None:
    d, f, v, layers, kv = 4096, 14336, 32000, 32, 1024
    attention = 2 * d * d + 2 * d * kv
    per_layer = attention + 8 * 3 * d * f + 8 * d + 2 * d
    expected_total = layers * per_layer + 2 * v * d + d
    expected_active = expected_total - layers * 6 * 3 * d * f
    model = meta_model("mixtral-8x7b")
    assert model.num_parameters() == expected_total
    assert model.num_parameters(active=True) == expected_active


@pytest.mark.parametrize("name", list(MODEL_PRESETS))
def test_breakdown_parts_sum_to_the_total(name: str) -> None:
    counts = parameter_breakdown(ModelConfig.preset(name))
    model = meta_model(name)
    main = model.num_parameters(mtp=False)
    assert sum(counts[part] for part in PARTS) == counts["total"] == main
    assert counts["active"] == model.num_parameters(active=True, mtp=False)
    assert counts["total"] + counts["mtp"] == model.num_parameters()


def test_breakdown_of_olmoe_by_part() -> None:
    counts = parameter_breakdown(ModelConfig.preset("olmoe-1b-7b"))
    assert counts["embeddings"] == 2 * 50304 * 2048
    assert counts["attention"] == 16 * 4 * 2048 * 2048
    assert counts["routed_experts"] == 16 * 64 * 3 * 2048 * 1024
    assert counts["routed_experts_active"] == 16 * 8 * 3 * 2048 * 1024
    assert counts["router"] == 16 * 64 * 2048
    # Two block norms and q/k norms over the full projections per layer, plus the final norm.
    assert counts["norms"] == 16 * 4 * 2048 + 2048
    assert counts["shared_experts"] == counts["dense_ffn"] == 0


def test_shared_experts_and_dense_layers_are_counted_apart() -> None:
    moe = ModelConfig.preset("tiny").moe.replace(n_shared_experts=1, shared_gate=True)
    cfg = ModelConfig.preset("tiny").replace(moe=moe, n_layers=3, first_dense=1)
    counts = parameter_breakdown(MoETransformer(cfg))
    D, F_, E, K = cfg.d_model, moe.d_expert, moe.n_experts, moe.top_k
    assert counts["dense_ffn"] == 3 * D * cfg.d_ff  # one dense layer: gate, up, down
    assert counts["shared_experts"] == 2 * (3 * D * moe.shared_width + D)  # + the gate
    assert counts["active"] == counts["total"] - 2 * (E - K) * 3 * D * F_


def test_tied_embedding_counts_once() -> None:
    tiny = ModelConfig.preset("tiny")
    tied = parameter_breakdown(tiny.replace(tie_embeddings=True))
    untied = parameter_breakdown(tiny)
    assert tied["embeddings"] == tiny.vocab_size * tiny.d_model
    assert untied["total"] - tied["total"] == tiny.vocab_size * tiny.d_model


def test_dense_small_has_the_active_parameters_of_small_but_the_routers() -> None:
    small, dense = (
        parameter_breakdown(ModelConfig.preset("small")),
        parameter_breakdown(ModelConfig.preset("dense-small")),
    )
    assert dense["total"] == dense["active"] == small["active"] - small["router"]


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0"), (999, "999"), (1234, "1.23K"), (999_500, "1.00M"), (140_630_071_296, "141B")],
)
def test_format_count_keeps_3_significant_figures(n: int, text: str) -> None:
    assert format_count(n) == text


def test_table_shows_total_and_active_of_each_part() -> None:
    table = parameter_table(ModelConfig.preset("mixtral-8x7b"), title="mixtral-8x7b")
    lines = table.splitlines()
    assert lines[0] == "mixtral-8x7b"
    assert lines[-1].split() == ["total", "46,702,792,704", "46.7B", "12,879,925,248", "12.9B"]
    routed = next(line for line in lines if line.startswith("routed experts"))
    assert routed.split()[2:] == ["45,097,156,608", "45.1B", "11,274,289,152", "11.3B"]


@pytest.mark.parametrize(("name", "total"), [("deepseek-v3", "671B"), ("gpt-oss-20b", "20.9B")])
def test_params_command_shows_the_presets_of_the_checkpoint_architectures(
    name: str, total: str, capsys
) -> None:
    from moekit.cli import main

    assert main(["params", name]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert next(line for line in lines if line.startswith("total ")).split()[2] == total
    if name == "deepseek-v3":  # and its multi-token-prediction module apart
        assert lines[-2].split()[2:4] == ["11,610,067,968", "11.6B"]
        assert lines[-1].split()[:5] == ["total", "with", "mtp", "682,636,472,320", "683B"]
