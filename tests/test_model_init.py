"""Seeded initial weights are pinned. Every seeded result (the demo's, the benchmarks', a resumed
run's) starts from them, and the order of the random draws follows each module's `__init__`
(`model/init.py`), which a refactor can change without any other test noticing. The figures are
each weight's first and last numbers and its mean absolute value, to 1e-6: the draw order and the
scale, but not the last bits (torch draws normals with other roundings on CPUs without AVX2).

After a deliberate change of initialisation, regenerate them with `python -m tests.test_model_init`
and say so: committed results trained from the old weights no longer reproduce bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moekit import ModelConfig, MoEConfig, MoETransformer
from moekit.config import MLAConfig, RopeScaling

GOLDEN = Path(__file__).with_name("golden") / "init_figures.json"
MOE = MoEConfig(
    d_model=32, d_expert=16, n_experts=4, top_k=2, n_shared_experts=1, d_shared=8,
    shared_gate=True, expert_bias=True, router_bias=True,
)  # fmt: skip
LATENT = MLAConfig(
    q_lora_rank=12, kv_lora_rank=10, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5
)
BASE = ModelConfig(vocab_size=50, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, moe=MOE)
CONFIGS = {
    "tiny": ModelConfig.preset("tiny"),
    "attention variants, mtp": BASE.replace(
        attn_bias=True, qk_norm="head", attn_sinks=True, first_dense=1, d_ff=24, mtp_depth=1
    ),
    "latent attention, mtp": BASE.replace(
        mla=LATENT,
        n_kv_heads=None,
        rope_scaling=RopeScaling(factor=2.0, original_max_seq_len=8),
        tie_embeddings=True,
        mtp_depth=1,
    ),
}


def figures(cfg: ModelConfig) -> dict[str, list[float]]:
    """Each weight of the model seeded with 0: [first, last, mean |w|], rounded to 1e-7."""
    torch.manual_seed(0)
    model = MoETransformer(cfg)
    return {
        name: [round(float(v), 7) for v in (t.flatten()[0], t.flatten()[-1], t.abs().mean())]
        for name, t in model.state_dict().items()
        if t.is_floating_point()
    }


@pytest.mark.parametrize("name", list(CONFIGS))
def test_seeded_initial_weights_are_the_pinned_ones(name: str) -> None:
    golden = json.loads(GOLDEN.read_text())[name]
    now = figures(CONFIGS[name])
    assert list(now) == list(golden)  # the same weights, in the same order
    changed = [k for k in now if now[k] != pytest.approx(golden[k], abs=1e-6)]
    assert not changed, f"initial weights changed: {changed[:5]} (see this module's docstring)"


if __name__ == "__main__":
    GOLDEN.parent.mkdir(exist_ok=True)
    blocks = []  # one line a weight
    for name, cfg in CONFIGS.items():
        rows = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in figures(cfg).items()]
        blocks.append(f" {json.dumps(name)}: {{\n" + ",\n".join(rows) + "\n }")
    GOLDEN.write_text("{\n" + ",\n".join(blocks) + "\n}\n")
    print(f"wrote {GOLDEN}")
