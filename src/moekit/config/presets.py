"""Presets: functions returning configs, by name (`ModelConfig.preset`, `RunConfig.preset`).

Written one config to a few lines, as a table of sizes is read (hence `fmt: off`).
"""

from __future__ import annotations

from collections.abc import Callable

from moekit.config.model import MLAConfig, ModelConfig, RopeScaling, dense_twin
from moekit.config.moe import MoEConfig
from moekit.config.run import CheckpointConfig, DataConfig, EvalConfig, RunConfig, TrainConfig

# fmt: off


def tiny_model() -> ModelConfig:
    """For tests: 2 layers, d_model 48, 3 query heads of 16 sharing 1 kv head, 6 experts of
    width 40 top-2, a dense FFN of 56 (dense layers), vocabulary 256. Every size differs from the
    others, so a test of the model fails when two axes are swapped (D and F above all)."""
    moe = MoEConfig(d_model=48, d_expert=40, n_experts=6, top_k=2, aux_loss_coef=0.01)
    return ModelConfig(vocab_size=256, d_model=48, n_layers=2, n_heads=3, n_kv_heads=1, d_ff=56,
                       moe=moe, max_seq_len=128)


def small_model() -> ModelConfig:
    """The demo model: trains on 2 CPU cores in minutes. 8 experts top-2, tied embeddings."""
    moe = MoEConfig(d_model=256, d_expert=512, n_experts=8, top_k=2, aux_loss_coef=0.01,
                    z_loss_coef=1e-3)
    return ModelConfig(vocab_size=4096, d_model=256, n_layers=4, n_heads=4, moe=moe,
                       max_seq_len=256, tie_embeddings=True)


def dense_small_model() -> ModelConfig:
    """`small` with a dense FFN of width top_k * d_expert: the same active parameters but the
    routers'."""
    return dense_twin(small_model())


def mixtral_8x7b() -> ModelConfig:
    """Mixtral-8x7B (Jiang et al. 2024; mistralai/Mixtral-8x7B-v0.1): 46.7B total, 12.9B active."""
    moe = MoEConfig(d_model=4096, d_expert=14336, n_experts=8, top_k=2, aux_loss_coef=0.02)
    return ModelConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                       head_dim=128, d_ff=14336, moe=moe, max_seq_len=32768, rope_theta=1e6)


def mixtral_8x22b() -> ModelConfig:
    """Mixtral-8x22B (mistralai/Mixtral-8x22B-v0.1): 141B total, 39B active."""
    moe = MoEConfig(d_model=6144, d_expert=16384, n_experts=8, top_k=2, aux_loss_coef=0.001)
    return ModelConfig(vocab_size=32768, d_model=6144, n_layers=56, n_heads=48, n_kv_heads=8,
                       head_dim=128, d_ff=16384, moe=moe, max_seq_len=65536, rope_theta=1e6)


def qwen3_30b_a3b() -> ModelConfig:
    """Qwen3-30B-A3B (Qwen/Qwen3-30B-A3B): 30.5B total, 3.3B active; per-head q/k norm."""
    moe = MoEConfig(d_model=2048, d_expert=768, n_experts=128, top_k=8, aux_loss_coef=0.001)
    return ModelConfig(vocab_size=151936, d_model=2048, n_layers=48, n_heads=32, n_kv_heads=4,
                       head_dim=128, d_ff=6144, moe=moe, max_seq_len=40960, rope_theta=1e6,
                       qk_norm="head", norm_eps=1e-6)


def qwen15_moe_a27b() -> ModelConfig:
    """Qwen1.5-MoE-A2.7B (Qwen/Qwen1.5-MoE-A2.7B): 14.3B total, 2.7B active; 60 experts top-4
    (unnormalised weights) and one shared expert of width 5632 behind a sigmoid gate, q/k/v
    biases."""
    moe = MoEConfig(d_model=2048, d_expert=1408, n_experts=60, top_k=4, normalize=False,
                    n_shared_experts=1, d_shared=5632, shared_gate=True, aux_loss_coef=0.001)
    return ModelConfig(vocab_size=151936, d_model=2048, n_layers=24, n_heads=16, n_kv_heads=16,
                       head_dim=128, d_ff=5632, moe=moe, max_seq_len=8192, rope_theta=1e6,
                       norm_eps=1e-6, attn_bias="qkv")


def olmoe_1b_7b() -> ModelConfig:
    """OLMoE-1B-7B (Muennighoff et al. 2024; allenai/OLMoE-1B-7B-0924): 6.9B total, 1.3B active;
    q/k norm over the full projections, unnormalised top-8 weights."""
    moe = MoEConfig(d_model=2048, d_expert=1024, n_experts=64, top_k=8, normalize=False,
                    aux_loss_coef=0.01, z_loss_coef=0.001)
    return ModelConfig(vocab_size=50304, d_model=2048, n_layers=16, n_heads=16, moe=moe,
                       max_seq_len=4096, qk_norm="full")


def deepseek_v3() -> ModelConfig:
    """DeepSeek-V3 (DeepSeek-AI 2024; deepseek-ai/DeepSeek-V3): 671B total, 37B active, without
    its multi-token-prediction module (one depth: 11.6B more of its own; the checkpoint's 685B
    also holds that layer's copies of the embedding and head, 1.85B). Latent attention with
    YaRN (factor 40), 3 dense layers, then 256 routed experts (8 per token, 4 of 8 groups,
    sigmoid, scaling 2.5) and one shared; the paper's bias update speed 0.001 and sequence-wise
    balance loss 0.0001."""
    moe = MoEConfig(d_model=7168, d_expert=2048, n_experts=256, top_k=8, score="sigmoid",
                    routed_scaling=2.5, n_groups=8, topk_groups=4, n_shared_experts=1,
                    bias_update_rate=0.001, aux_loss_coef=0.0001, aux_loss_scope="sequence")
    mla = MLAConfig(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                    qk_rope_head_dim=64, v_head_dim=128)
    yarn = RopeScaling(factor=40.0, original_max_seq_len=4096, mscale=1.0, mscale_all_dim=1.0,
                       truncate=True)
    return ModelConfig(vocab_size=129280, d_model=7168, n_layers=61, n_heads=128, d_ff=18432,
                       moe=moe, first_dense=3, max_seq_len=163840, rope_scaling=yarn, mla=mla,
                       norm_eps=1e-6, mtp_depth=1)


def moonlight_16b_a3b() -> ModelConfig:
    """Moonlight-16B-A3B (Moonshot AI 2025, *Muon is Scalable for LLM Training*;
    moonshotai/Moonlight-16B-A3B): 16.0B total, 2.91B active ("3B"), DeepSeek-V3's architecture at a
    laptop's size. Latent attention without the low-rank query (16 heads, rank 512), one dense
    layer, then 64 routed experts (6 per token, sigmoid, scaling 2.446, one group) and two
    shared ones; auxiliary-loss-free, as its config.json loads."""
    moe = MoEConfig(d_model=2048, d_expert=1408, n_experts=64, top_k=6, score="sigmoid",
                    routed_scaling=2.446, n_shared_experts=2, aux_loss_coef=0.0)
    mla = MLAConfig(q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
                    qk_rope_head_dim=64, v_head_dim=128)
    return ModelConfig(vocab_size=163840, d_model=2048, n_layers=27, n_heads=16, d_ff=11264,
                       moe=moe, first_dense=1, max_seq_len=8192, rope_theta=50000.0, mla=mla,
                       norm_eps=1e-5)


def gpt_oss_20b() -> ModelConfig:
    """GPT-OSS-20B (OpenAI 2025; openai/gpt-oss-20b): 20.9B total, 3.6B active. Alternating
    128-token sliding-window and full attention with sinks, 32 experts top-4 with router and
    expert biases, clamped SwiGLU, YaRN (factor 32, untruncated ramp)."""
    moe = MoEConfig(d_model=2880, d_expert=2880, n_experts=32, top_k=4,
                    activation="clamped_swiglu", expert_bias=True, router_bias=True)
    yarn = RopeScaling(factor=32.0, original_max_seq_len=4096, truncate=False)
    return ModelConfig(vocab_size=201088, d_model=2880, n_layers=24, n_heads=64, n_kv_heads=8,
                       head_dim=64, moe=moe, max_seq_len=131072, rope_theta=150000.0,
                       rope_scaling=yarn, sliding_window=128,
                       layer_types=("sliding", "full") * 12, attn_bias=True, attn_sinks=True)


def tiny_run() -> RunConfig:
    """A run of seconds: the tiny model (vocabulary 512) on 40 standard-library files."""
    train = TrainConfig(steps=30, batch_size=8, seq_len=64, lr=3e-3, warmup_steps=5, log_every=5,
                        data=DataConfig(max_files=40), eval=EvalConfig(every=10, batches=2),
                        checkpoint=CheckpointConfig(every=10))
    return RunConfig(model=ModelConfig.preset("tiny").replace(vocab_size=512), train=train)


def experiment_run() -> RunConfig:
    """The base run of `moekit experiment`, sized by tokens per parameter rather than by
    parameters (263K active with the 2048-token BPE's tied embeddings). Each experiment sets its
    own train.steps (2,600 steps: 20 tokens per active parameter, where a model is held back by
    its capacity and not only by optimisation). One final checkpoint per arm: the report
    measures its router logits."""
    moe = MoEConfig(d_model=64, d_expert=128, n_experts=8, top_k=2, aux_loss_coef=0.01)
    model = ModelConfig(vocab_size=2048, d_model=64, n_layers=2, n_heads=2, d_ff=256, moe=moe,
                        max_seq_len=128, tie_embeddings=True)
    train = TrainConfig(steps=2600, batch_size=16, seq_len=128, warmup_steps=30, log_every=50,
                        tensorboard=False, eval=EvalConfig(every=200, batches=4),
                        checkpoint=CheckpointConfig(every=0, keep=1))
    return RunConfig(model=model, train=train)


def demo_run() -> RunConfig:
    """The run `moekit demo` trains beside its dense twin, sized for the compute 2 CPU cores give
    in minutes rather than for its parameters: the `experiment` run with 32 experts of 128 top-2
    (active width 256; 1.74M parameters, 267K active with the embeddings), for 4,000 steps of
    16 x 128 tokens: 31 tokens per active parameter, where a model is held back by its capacity,
    which is what experts add."""
    base = experiment_run()
    assert base.model.moe is not None
    model = base.model.replace(d_ff=None, moe=base.model.moe.replace(n_experts=32))
    return RunConfig(model=model, train=base.train.replace(steps=4000))


# fmt: on

MODEL_PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "tiny": tiny_model,
    "small": small_model,
    "dense-small": dense_small_model,
    "mixtral-8x7b": mixtral_8x7b,
    "mixtral-8x22b": mixtral_8x22b,
    "qwen3-30b-a3b": qwen3_30b_a3b,
    "qwen1.5-moe-a2.7b": qwen15_moe_a27b,
    "olmoe-1b-7b": olmoe_1b_7b,
    "deepseek-v3": deepseek_v3,
    "gpt-oss-20b": gpt_oss_20b,
    "moonlight-16b-a3b": moonlight_16b_a3b,
}
RUN_PRESETS: dict[str, Callable[[], RunConfig]] = {
    "tiny": tiny_run,
    "experiment": experiment_run,
    "demo": demo_run,
}
