"""Parameter counts: every preset reproduces its published figures; the breakdown adds up."""

from __future__ import annotations

import functools
import re

import pytest
import torch

from moekit import ModelConfig, MoETransformer
from moekit.config import MODEL_PRESETS, MoEConfig, ParallelConfig
from moekit.distributed.costs import activation_bytes, device_costs
from moekit.model.params import PARTS, format_count, parameter_breakdown, parameter_table

# (total, active) to 3 significant figures. Published: Mixtral-8x7B 46.7B / 12.9B (Jiang et al.
# 2024); Mixtral-8x22B 141B / 39B (Mistral AI); Qwen3-30B-A3B 30.5B / 3.3B (model card; 3.35B
# counts the 48 routers, 12.6M, as active: they run for every token); OLMoE-1B-7B 6.92B / 1.28B
# (Muennighoff et al. 2024, "6.9B / 1.3B"); DeepSeek-V3 671B without its MTP module / 37.6B
# (DeepSeek-AI 2024 says 37B: see the test of the input embedding below); GPT-OSS-20B 20.9B / 4.19B
# (OpenAI's model card: 20.91B / 3.61B, likewise); Qwen1.5-MoE-A2.7B 14.3B / 2.7B (model card);
# Moonlight-16B-A3B "16B / 3B" (model card; to two figures).
PUBLISHED = {
    "mixtral-8x7b": ("46.7B", "12.9B"),
    "mixtral-8x22b": ("141B", "39.2B"),
    "qwen3-30b-a3b": ("30.5B", "3.35B"),
    "qwen1.5-moe-a2.7b": ("14.3B", "2.69B"),
    "olmoe-1b-7b": ("6.92B", "1.28B"),
    "deepseek-v3": ("671B", "37.6B"),
    "gpt-oss-20b": ("20.9B", "4.19B"),
    "moonlight-16b-a3b": ("16.0B", "2.91B"),
}


@functools.cache  # a preset's meta model is built once (DeepSeek-V3's ~0.5 s); tests only read it
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


# Published config.json files (the entries moekit reads): Qwen/Qwen1.5-MoE-A2.7B's and
# moonshotai/Moonlight-16B-A3B's.
PUBLISHED_CONFIGS = {
    "qwen1.5-moe-a2.7b": {
        "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
        "decoder_sparse_step": 1, "hidden_act": "silu", "hidden_size": 2048,
        "intermediate_size": 5632, "max_position_embeddings": 8192, "max_window_layers": 21,
        "moe_intermediate_size": 1408, "norm_topk_prob": False, "num_attention_heads": 16,
        "num_experts": 60, "num_experts_per_tok": 4, "num_hidden_layers": 24,
        "num_key_value_heads": 16, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.001, "shared_expert_intermediate_size": 5632,
        "sliding_window": 32768, "tie_word_embeddings": False, "use_sliding_window": False,
        "vocab_size": 151936,
    },
    "moonlight-16b-a3b": {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "attention_bias": False, "aux_loss_alpha": 0.001, "first_k_dense_replace": 1,
        "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 11264,
        "kv_lora_rank": 512, "max_position_embeddings": 8192, "moe_intermediate_size": 1408,
        "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2,
        "norm_topk_prob": True, "num_attention_heads": 16, "num_experts_per_tok": 6,
        "num_hidden_layers": 27, "num_key_value_heads": 16, "num_nextn_predict_layers": 0,
        "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
        "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 50000.0,
        "routed_scaling_factor": 2.446, "scoring_func": "sigmoid", "seq_aux": True,
        "tie_word_embeddings": False, "topk_group": 1, "topk_method": "noaux_tc",
        "v_head_dim": 128, "vocab_size": 163840,
    },
}  # fmt: skip


@pytest.mark.parametrize("name", list(PUBLISHED_CONFIGS))
def test_preset_is_what_its_published_config_json_loads_as(name: str) -> None:
    """The published config.json, through its architecture's reader: the preset, field for
    field."""
    from moekit.interop.hf import hf_model_config

    assert hf_model_config(PUBLISHED_CONFIGS[name]) == ModelConfig.preset(name)


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
    [
        (0, "0"),
        (999, "999"),
        (1234, "1.23K"),
        (999_500, "1.00M"),
        (140_630_071_296, "141B"),
        (999_500_000_000_000, "1000T"),
        (12_345_678_000_000_000, "12300T"),
    ],
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


def test_table_keeps_counts_of_any_size_apart() -> None:
    """Counts wider than the column (here 280T) ran into the next column's."""
    tiny = ModelConfig.preset("tiny")
    huge = tiny.replace(d_model=4_800_000, n_heads=1, vocab_size=10_000_000,
                        moe=tiny.moe.replace(d_model=4_800_000))  # fmt: skip
    lines = parameter_table(huge).splitlines()
    assert lines[-1].split() == ["total", "280,326,993,600,000", "280T", "280,322,385,600,000",
                                 "280T"]  # fmt: skip
    for line in lines[1:-2]:  # each part: its label, then four fields two spaces apart or more
        assert re.fullmatch(r"[a-z ]+?( {2,}[\d,.]+[KMBT]?){4}", line), line


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


# Per-device memory and communication (moekit.distributed.costs, `moekit params --tp --ep
# --dp-shard`). A model small enough to count by hand: vocabulary 16 (tied), d_model 8, one MoE
# block of 2 heads and 4 experts of width 4 (top-1, swiglu): embedding 128, attention 4 * 64,
# norms 3 * 8, router 32, experts 4 * (8 * 8 + 8 * 4) = 384; 824 in all, 440 outside the experts.
HAND = ModelConfig(
    vocab_size=16,
    d_model=8,
    n_layers=1,
    n_heads=2,
    tie_embeddings=True,
    moe=MoEConfig(d_model=8, d_expert=4, n_experts=4, top_k=1),
)


def costs(cfg: ModelConfig, world: int, rank: int = 0, micro_batch: int = 1, seq: int = 4, **p):  # type: ignore[no-untyped-def]
    return device_costs(cfg, ParallelConfig(**p), world, micro_batch, seq, rank)


def test_hand_model_counts_as_the_parameter_counter_does() -> None:
    assert parameter_breakdown(HAND)["total"] == 824
    one = costs(HAND, 1)
    assert one.params == 824
    assert one.param_bytes == one.grad_bytes == 824 * 4 and one.optimizer_bytes == 2 * 824 * 4
    assert all(c.calls == 0 for c in one.comms.values())


def test_fsdp_over_two_halves_every_tensor_and_gathers_each_block_twice() -> None:
    c = costs(HAND, 2, dp_shard=2)
    assert c.params == 412  # every dim 0 is even
    gather, scatter = c.comms["fsdp_all_gather"], c.comms["fsdp_reduce_scatter"]
    # Two units: the root (embedding 16 x 8, final norm 8: 68 per half), gathered once (it stays
    # gathered for its backward), and the block (344), gathered again for its backward.
    assert gather.calls == 3 and gather.payload == (68 + 2 * 344) * 4
    assert gather.sent == gather.payload  # (n - 1) x the input, n = 2
    assert scatter.calls == 2 and scatter.payload == 2 * (68 + 344) * 4
    assert scatter.sent == scatter.payload / 2
    kept = costs(HAND, 2, dp_shard=2, reshard_after_forward=False)
    assert kept.comms["fsdp_all_gather"].calls == 2
    assert kept.gathered_bytes == 824 * 4 and c.gathered_bytes == 824 * 4  # root + the block
    bf16 = costs(HAND, 2, dp_shard=2, param_dtype="bfloat16")
    assert bf16.comms["fsdp_all_gather"].payload == gather.payload / 2
    assert bf16.comms["fsdp_reduce_scatter"].payload == scatter.payload  # reduced in float32
    assert bf16.param_bytes == c.param_bytes  # the float32 shard is the master copy


def test_tensor_parallel_splits_attention_and_expert_widths_and_all_reduces_activations() -> None:
    c = costs(HAND, 2, tp=2)
    # attention 256 / 2, experts 384 / 2 on their hidden width; embedding, norms, router whole
    assert c.params == 128 + 128 + 24 + 32 + 192
    tp = c.comms["tp_all_reduce"]
    # T = 4 tokens of 8 float32: attention 1 forward + 1 backward (q, k, v share one input),
    # experts 1 + 1 (R = T * top_k = 4 rows)
    assert tp.calls == 4 and tp.payload == 4 * 4 * 8 * 4
    assert tp.sent == tp.payload  # 2 (n - 1) / n = 1 for n = 2
    assert costs(HAND, 2, tp=2, dp_shard=1).comms["fsdp_all_gather"].calls == 0


def test_expert_parallel_splits_experts_and_all_to_alls_rows() -> None:
    c = costs(HAND, 2, ep=2)  # DDP: dp_shard = tp = 1
    assert c.params == 440 + 192
    assert c.grad_bytes == (440 + 192) * 4 + 440 * 4  # DDP's buckets copy what it reduces
    ddp = c.comms["dp_all_reduce"]
    assert ddp.calls == 1 and ddp.payload == 440 * 4 and ddp.sent == ddp.payload
    a2a = c.comms["ep_all_to_all"]
    # the counts (4 int64) and 4 exchanges of T * top_k = 4 rows of 8 float32
    assert a2a.calls == 5 and a2a.payload == 4 * 8 + 4 * 4 * 8 * 4
    assert a2a.sent == a2a.payload / 2


def test_each_collective_sends_its_own_share_on_a_group_of_four() -> None:
    """On groups of 2 the ring shares pair up (all-reduce and all-gather 1, reduce-scatter and
    all-to-all 1/2); on 4 each is its own: all-gather 3, all-reduce 3/2, the others 3/4."""
    fsdp, ep = costs(HAND, 4, dp_shard=4).comms, costs(HAND, 4, ep=4).comms
    assert fsdp["fsdp_all_gather"].sent == 3 * fsdp["fsdp_all_gather"].payload
    assert fsdp["fsdp_reduce_scatter"].sent == 3 / 4 * fsdp["fsdp_reduce_scatter"].payload
    assert ep["dp_all_reduce"].sent == 3 / 2 * ep["dp_all_reduce"].payload
    assert ep["ep_all_to_all"].sent == 3 / 4 * ep["ep_all_to_all"].payload


def test_uneven_fsdp_chunks_are_ceil_sized_and_padded() -> None:
    c = [costs(HAND, 3, rank, dp_shard=3) for rank in range(3)]
    assert sum(x.params for x in c) == 824
    assert c[0].params >= c[1].params >= c[2].params
    # every rank hands in the padded chunk: the embedding's 16 rows as 6, 6, 6
    assert len({x.comms["fsdp_all_gather"].payload for x in c}) == 1


# deepseek-v3 (61 layers of 256 experts, 12 s a layout on meta) left out for CI's time; its MTP
# block's split is held to the real collectives in tests/test_parallel_costs.py
@pytest.mark.parametrize("name", ["small", "mixtral-8x7b", "gpt-oss-20b"])
@pytest.mark.parametrize(
    "layout", [{"dp_shard": 8}, {"dp_shard": 8, "ep": 8}, {"dp_shard": 8, "ep": 4}]
)
def test_shards_over_the_devices_sum_to_the_model(name: str, layout: dict) -> None:
    cfg = ModelConfig.preset(name)
    total = meta_model(name).num_parameters()  # the MTP module's too
    shards = [costs(cfg, 8, rank, **layout).params for rank in range(8)]
    assert sum(shards) == total  # nothing held twice: ep x edp_shard = dp_shard = 8


@pytest.mark.parametrize("name", ["small", "mixtral-8x7b", "qwen3-30b-a3b"])
def test_tensor_parallel_copies_only_what_it_does_not_split(name: str) -> None:
    cfg = ModelConfig.preset(name)
    counts = parameter_breakdown(cfg)
    whole = counts["embeddings"] + counts["norms"] + counts["router"]
    tp = costs(cfg, 4, tp=4)
    assert tp.params * 4 == counts["total"] + 3 * whole  # every tp rank holds the whole pieces


@pytest.mark.parametrize("name", list(MODEL_PRESETS))
def test_one_process_holds_the_whole_model_and_sends_nothing(name: str) -> None:
    cfg = ModelConfig.preset(name)
    one = costs(cfg, 1)
    assert one.params == meta_model(name).num_parameters()
    assert one.gathered_bytes == 0 and all(c.calls == 0 for c in one.comms.values())


def saved_tensor_bytes(model: MoETransformer, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for the backward of model(x) (each storage once,
    the parameters left out)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, labels=x)
    return sum(saved.values())


@pytest.mark.parametrize(("name", "floor"), [("tiny", 0.97), ("small", 0.99)])
def test_activation_estimate_is_within_a_few_percent_of_what_autograd_saves(
    name: str, floor: float
) -> None:
    """The estimate against the bytes torch saves for the backward on CPU, float32, 2 x 64
    tokens: 97.5% of them for tiny, 99.6% for small (left out: norm statistics, indices,
    routing weights)."""
    cfg = ModelConfig.preset(name)
    torch.manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (2, 64))
    measured = saved_tensor_bytes(MoETransformer(cfg), x)
    estimate = activation_bytes(cfg, ParallelConfig().sizes(1), 2 * 64, 4)
    assert floor <= estimate / measured <= 1.0


def test_params_command_prints_per_device_memory_and_communication(capsys) -> None:
    from moekit.cli import main

    args = ["params", "mixtral-8x7b", "--tp", "8", "--ep", "8", "--dp-shard", "8"]
    assert main([*args, "--param-dtype", "bfloat16", "--seq-len", "4096"]) == 0
    out = capsys.readouterr().out
    assert "per device of 64: dp_replicate 1 x dp_shard 8 x tp 8, ep 8" in out
    expected = costs(ModelConfig.preset("mixtral-8x7b"), 64, 0, 1, 4096, dp_replicate=1,
                     dp_shard=8, ep=8, tp=8, param_dtype="bfloat16")  # fmt: skip
    total = [line for line in out.splitlines() if line.startswith("total ")][-1]
    assert total.split()[-1] == f"{expected.memory_bytes / 1e9:,.3f}"
    for name in ("FSDP all-gather", "FSDP reduce-scatter", "TP all-reduce", "EP all-to-all"):
        assert any(line.startswith(name) for line in out.splitlines())
    # sequence parallelism: its all-gathers and reduce-scatters over the tp group, said
    assert main([*args, "--parallel.sequence_parallel=true"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("per device of 64") and line.endswith(", sequence_parallel")
               for line in lines)  # fmt: skip
    for name in ("TP all-gather", "TP reduce-scatter"):
        assert any(line.startswith(name) for line in lines)
    # ep alone takes the replicas it needs: 4 data-parallel processes
    assert main(["params", "small", "--ep", "4"]) == 0
    assert "per device of 4: dp_replicate 4 x dp_shard 1 x tp 1, ep 4" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--ep", "3"], "parallel.ep=3 is invalid: must divide model.moe.n_experts (8)"),
        (["--tp", "3"], "parallel.tp=3 is invalid: must divide model.n_heads (4)"),
        (["--param-dtype", "bfloat16"], "parallel.param_dtype='bfloat16' is invalid"),
        (
            ["--ep", "4", "--dp-shard", "8", "--dp-replicate", "1", "--parallel.ep=3"],
            "parallel.ep=3",
        ),
        (["--parallel.nope=1"], "nope"),
        (["--model.moe.top_k=99"], "model.moe.top_k=99 is invalid: must be <= n_experts"),
        (["--model.n_layers=x"], "--model.n_layers='x': expected int"),
    ],
)
def test_params_command_rejects_a_bad_layout_in_one_line(args: list, says: str, capsys) -> None:
    from moekit.cli import main

    assert main(["params", "small", *args]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moekit params: error:") and says in err[0]
    assert captured.out == ""
