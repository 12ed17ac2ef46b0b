"""The attention variants that real MoE checkpoints need: YaRN RoPE, attention sinks, per-layer
sliding/full attention, q/k/v-only biases, clip_qkv and multi-head latent attention."""

from __future__ import annotations

import math

import pytest
import torch

from moekit import ModelConfig, MoEConfig, MoETransformer
from moekit.config import MLAConfig, RopeScaling
from moekit.model import KVCache
from moekit.model.attention import Attention, attention_mask
from moekit.model.rope import rope_angles, yarn_attention_factor, yarn_inv_freq

MOE = MoEConfig(d_model=32, d_expert=16, n_experts=4, top_k=2)
BASE = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, moe=MOE)
MLA = MLAConfig(
    q_lora_rank=12, kv_lora_rank=10, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5
)


def test_yarn_with_factor_one_is_plain_rope() -> None:
    positions = torch.arange(9)
    plain = rope_angles(positions, 16, 1e4)
    same = rope_angles(positions, 16, 1e4, RopeScaling(factor=1.0, original_max_seq_len=8))
    torch.testing.assert_close(same, plain, rtol=0, atol=0)


@pytest.mark.parametrize(
    "params",
    [
        dict(factor=40.0, mscale=1.0, mscale_all_dim=1.0),  # DeepSeek-V3
        dict(factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False),  # GPT-OSS
        dict(factor=4.0, mscale=0.7, mscale_all_dim=0.3, beta_fast=16.0, beta_slow=2.0),
    ],
)
def test_yarn_equals_transformers(params: dict) -> None:
    modeling_rope_utils = pytest.importorskip("transformers.modeling_rope_utils")
    transformers = pytest.importorskip("transformers")
    rope = {"rope_type": "yarn", "rope_theta": 5e4, "original_max_position_embeddings": 64}
    hf = transformers.LlamaConfig(
        hidden_size=64,
        num_attention_heads=2,
        head_dim=32,
        max_position_embeddings=64 * int(params["factor"]),
        rope_parameters={**rope, **params},
    )
    want_freq, want_factor = modeling_rope_utils.ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    ours = RopeScaling(original_max_seq_len=64, **params)
    assert torch.equal(yarn_inv_freq(32, 5e4, ours), want_freq)
    assert yarn_attention_factor(ours) == pytest.approx(want_factor, rel=1e-12)


def test_yarn_ramp_keeps_fast_dimensions_and_interpolates_slow_ones() -> None:
    s = RopeScaling(factor=8.0, original_max_seq_len=64)
    freq = yarn_inv_freq(32, 1e4, s)
    plain = 1.0 / (1e4 ** (torch.arange(0, 32, 2).float() / 32))
    assert freq[0] == plain[0] and torch.allclose(freq[-1], plain[-1] / 8)
    assert yarn_attention_factor(s) == pytest.approx(0.1 * math.log(8) + 1)


def _attention(cfg: ModelConfig) -> Attention:
    torch.manual_seed(0)
    attn = Attention(cfg)
    attn.init_weights(0.3, 0.3)
    return attn


def test_sinks_of_minus_infinity_are_plain_attention() -> None:
    cfg = BASE.replace(attn_sinks=True)
    attn, plain = _attention(cfg), _attention(BASE)
    plain.load_state_dict({k: v for k, v in attn.state_dict().items() if k != "sinks"})
    with torch.no_grad():
        attn.sinks.fill_(-1e30)
    x = torch.randn(2, 7, 32)
    rope = rope_angles(torch.arange(7), cfg.d_head, cfg.rope_theta)
    mask = attention_mask(0, 7, None)
    torch.testing.assert_close(attn(x, rope, mask), plain(x, rope, mask))


def test_a_sink_takes_its_share_of_the_first_tokens_attention() -> None:
    """At position 0 a head sees one key: weight 1 / (1 + exp(sink - score)) on its value."""
    cfg = BASE.replace(attn_sinks=True, n_kv_heads=None)
    attn = _attention(cfg)
    with torch.no_grad():
        attn.sinks.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    x = torch.randn(1, 1, 32)
    rope = rope_angles(torch.arange(1), cfg.d_head, cfg.rope_theta)
    q, k, v = attn._project(x)
    score = (q * k).sum(-1) / math.sqrt(cfg.d_head)  # rotation at position 0 is the identity
    weight = torch.sigmoid(score - attn.sinks.view(1, 4, 1))
    expected = attn.o_proj((weight.unsqueeze(-1) * v).transpose(1, 2).reshape(1, 1, 32))
    torch.testing.assert_close(attn(x, rope, attention_mask(0, 1, None)), expected)


def test_layer_types_window_only_the_sliding_layers() -> None:
    cfg = BASE.replace(sliding_window=3, layer_types=("sliding", "full"))
    assert [cfg.layer_window(i) for i in range(2)] == [3, None]
    torch.manual_seed(0)
    mixed = MoETransformer(cfg).eval()
    windowed = MoETransformer(cfg.replace(layer_types=None)).eval()
    windowed.load_state_dict(mixed.state_dict())
    x = torch.randint(0, 50, (1, 9))
    with torch.no_grad():
        a, b = mixed(x).logits, windowed(x).logits
    torch.testing.assert_close(a[:, :3], b[:, :3])  # no token is farther back than the window
    assert not torch.allclose(a[:, 3:], b[:, 3:])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(layer_types=("full",)), r"layer_types=.*a tuple of 2"),
        (dict(layer_types=("sliding", "full")), "need a sliding_window"),
        (dict(attn_bias="qk"), "attn_bias='qk'"),
        (dict(mla=MLA, qk_norm="head"), "qk_norm='head' is invalid: is not supported with mla"),
        (dict(clip_qkv=0.0), "clip_qkv=0.0"),
    ],
)
def test_bad_attention_options_name_the_field(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BASE.replace(**changes)


def test_qkv_bias_leaves_the_output_projection_without_one() -> None:
    attn = Attention(BASE.replace(attn_bias="qkv"))
    assert all(p.bias is not None for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    assert attn.o_proj.bias is None


def test_clip_qkv_bounds_the_projections() -> None:
    attn = _attention(BASE.replace(clip_qkv=0.25))
    q, k, v = attn._project(torch.randn(2, 5, 32) * 10)
    assert max(t.abs().max().item() for t in (q, k, v)) == 0.25


@pytest.mark.parametrize("q_lora_rank", [12, None])
def test_latent_attention_decodes_with_its_latent_cache_as_a_full_forward(q_lora_rank) -> None:
    cfg = BASE.replace(
        mla=MLA.replace(q_lora_rank=q_lora_rank),
        n_kv_heads=None,
        rope_scaling=RopeScaling(factor=2.0, original_max_seq_len=8, mscale_all_dim=1.0),
    )
    torch.manual_seed(0)
    model = MoETransformer(cfg).eval()
    x = torch.randint(0, 50, (2, 10))
    cache = KVCache.for_model(model, 2, 10)
    assert cache.layers[0].k_BKLd.shape == (2, 1, 10, MLA.kv_lora_rank)
    with torch.no_grad():
        full = model(x).logits
        steps = [model(x[:, :6], kv_cache=cache).logits]
        steps += [model(x[:, t : t + 1], kv_cache=cache).logits for t in range(6, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_presets_round_trip_through_json() -> None:
    for name in ("deepseek-v3", "gpt-oss-20b"):
        cfg = ModelConfig.preset(name)
        assert ModelConfig.from_json(cfg.to_json()) == cfg
