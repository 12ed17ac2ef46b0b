"""MoETransformer: shapes, causality, sliding window, layering, losses, meta build, gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moekit import ModelConfig, MoELayer, MoETransformer
from moekit.model.attention import attention_mask
from moekit.model.block import DenseFFN

TINY = ModelConfig.preset("tiny")


def ids(batch: int = 2, seq: int = 12, vocab: int = TINY.vocab_size) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq))


def test_forward_shapes() -> None:
    model = MoETransformer(TINY)
    out = model(ids(3, 10), labels=ids(3, 10))
    assert out.logits.shape == (3, 10, TINY.vocab_size)
    assert out.lm_loss.shape == out.aux_loss.shape == out.loss.shape == ()


def test_aux_has_one_entry_per_moe_layer() -> None:
    cfg = TINY.replace(n_layers=5, moe_layers=2)
    out = MoETransformer(cfg)(ids())
    assert len(out.aux) == len(cfg.moe_layer_indices) == 2
    assert out.aux[0].counts.shape == (cfg.moe.n_experts,)


def test_no_labels_no_loss() -> None:
    out = MoETransformer(TINY)(ids())
    assert out.loss is None and out.lm_loss is None


@pytest.mark.parametrize("window", [None, 4])
def test_a_future_token_never_changes_an_earlier_logit(window: int | None) -> None:
    model = MoETransformer(TINY.replace(sliding_window=window)).eval()
    x = ids(2, 12)
    changed = x.clone()
    changed[:, 7] = (x[:, 7] + 1) % TINY.vocab_size
    a, b = model(x).logits, model(changed).logits
    # Not bit-equal: the experts' GEMMs group different rows, so earlier rows differ by rounding.
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-6)
    assert (a[:, 7] - b[:, 7]).abs().max() > 1e-3


def test_loss_is_lm_loss_plus_aux_loss() -> None:
    model = MoETransformer(TINY)
    x = ids()
    out = model(x, labels=x)
    assert out.aux_loss > 0
    assert torch.equal(out.loss, out.lm_loss + out.aux_loss)
    assert torch.equal(out.aux_loss, sum(a.loss for a in out.aux))


def test_labels_are_shifted_inside_and_minus_100_ignored() -> None:
    model = MoETransformer(TINY)
    x = ids(2, 8)
    labels = x.clone()
    labels[0, 3] = -100
    out = model(x, labels=labels)
    logits, targets = out.logits[:, :-1], labels[:, 1:]
    keep = targets != -100
    expected = F.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(out.lm_loss, expected)


def test_sliding_window_mask_equals_reference() -> None:
    window, start, n_new = 3, 5, 4
    mask = attention_mask(start, n_new, window).mask_SL
    expected = torch.tensor(
        [[0 <= q - k < window for k in range(start + n_new)] for q in range(start, start + n_new)]
    )
    assert torch.equal(mask, expected)


def test_sliding_window_attention_equals_reference_masked_softmax() -> None:
    window, S, hd = 3, 7, 8
    q, k, v = (torch.randn(1, 2, S, hd) for _ in range(3))
    mask = attention_mask(0, S, window).mask_SL
    got = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    for i in range(S):
        for j in range(S):
            if not 0 <= i - j < window:
                scores[..., i, j] = float("-inf")
    torch.testing.assert_close(got, scores.softmax(-1) @ v)


def test_one_layer_window_sees_exactly_window_tokens() -> None:
    window, t = 4, 9
    model = MoETransformer(TINY.replace(n_layers=1, sliding_window=window)).eval()
    x = ids(1, 12)

    def logit_at_t_after_changing(pos: int) -> torch.Tensor:
        changed = x.clone()
        changed[0, pos] = (x[0, pos] + 1) % TINY.vocab_size
        return model(changed).logits[0, t]

    base = model(x).logits[0, t]
    torch.testing.assert_close(logit_at_t_after_changing(t - window), base, rtol=0, atol=1e-6)
    assert (logit_at_t_after_changing(t - window + 1) - base).abs().max() > 1e-3


def test_first_dense_and_every_nth_layering() -> None:
    cfg = TINY.replace(n_layers=6, moe_layers=2, first_dense=2)
    model = MoETransformer(cfg)
    kinds = [type(block.ffn) for block in model.layers]
    assert kinds == [DenseFFN, DenseFFN, DenseFFN, MoELayer, DenseFFN, MoELayer]


def test_explicit_moe_layers() -> None:
    model = MoETransformer(TINY.replace(n_layers=4, moe_layers=(0, 2)))
    assert [isinstance(block.ffn, MoELayer) for block in model.layers] == [1, 0, 1, 0]


def test_dense_model_has_zero_aux_loss_and_no_aux() -> None:
    out = MoETransformer(ModelConfig.preset("tiny").replace(moe=None))(ids())
    assert out.aux == [] and out.aux_loss.item() == 0.0


def test_meta_build_then_init_weights_equals_a_cpu_build() -> None:
    with torch.device("meta"):
        meta = MoETransformer(TINY)
    meta.to_empty(device="cpu")
    torch.manual_seed(1)
    meta.init_weights()
    cpu = MoETransformer(TINY)
    torch.manual_seed(1)
    cpu.init_weights()
    for (name, a), b in zip(meta.state_dict().items(), cpu.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert torch.isfinite(meta(ids()).logits).all()


def test_init_scales_residual_projections() -> None:
    model = MoETransformer(TINY.replace(n_layers=8, d_model=128, moe=None, n_heads=4))
    expected = 0.02 / math.sqrt(2 * 8)
    assert model.layers[0].attn.o_proj.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert model.layers[0].ffn.w_down.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert model.layers[0].attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)


@pytest.mark.parametrize("qk_norm", [None, "head", "full"])
def test_backward_reaches_every_parameter(qk_norm: str | None) -> None:
    cfg = TINY.replace(n_layers=3, first_dense=1, qk_norm=qk_norm, attn_bias=True)
    model = MoETransformer(cfg)
    x = ids(4, 32)
    model(x, labels=x).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_tied_embeddings_share_the_matrix() -> None:
    model = MoETransformer(TINY.replace(tie_embeddings=True))
    final_hidden = []
    model.norm.register_forward_hook(lambda _m, _i, out: final_hidden.append(out))
    logits = model(ids()).logits
    assert model.lm_head is None
    torch.testing.assert_close(logits, final_hidden[0] @ model.embed.weight.T)


def test_update_expert_bias_moves_every_moe_layer() -> None:
    moe = TINY.moe.replace(bias_update_rate=0.1)
    model = MoETransformer(TINY.replace(moe=moe))
    model(ids(4, 32))
    model.update_expert_bias()
    for layer in model.moe_layers():
        assert layer.router.expert_bias.abs().sum() > 0


def test_a_float32_model_compiles_once_however_its_tokens_are_routed() -> None:
    """Where the experts' products are a loop over experts (float32: torch._grouped_mm's meta
    kernel takes bfloat16 alone), the loop runs outside the graph. Traced, the frame resumed after
    its `counts.tolist()` guarded on each expert's row count being 0, 1 or more, so a compiled
    run recompiled as routing changed until Dynamo's limit (8), then warned."""
    model = MoETransformer(TINY).eval()
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, TINY.vocab_size, (1, 3), generator=gen) for _ in range(12)]
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        compiled(batches[0])
        with torch._dynamo.config.patch(error_on_recompile=True):
            for ids in batches[1:]:
                torch.testing.assert_close(compiled(ids).logits, model(ids).logits)


def test_too_long_input_is_rejected() -> None:
    model = MoETransformer(TINY.replace(max_seq_len=8))
    with pytest.raises(ValueError, match="max_seq_len=8"):
        model(ids(1, 9))


def test_a_bfloat16_model_traces_whole_for_torch_compile() -> None:
    """train.compile's graph: Dynamo traces a bfloat16 model's forward (torch._grouped_mm's meta
    kernel takes bfloat16) with no graph break: a set iterated in the forward, the C kernels'
    functorch test and the fused SwiGLU's backward each broke it, and a break in the blocks' loop
    runs the whole forward eagerly. (A float32 one still breaks at the experts' per-expert loop,
    whose split sizes are data.)"""
    cfg = ModelConfig.preset("tiny")
    assert cfg.moe is not None
    cfg = cfg.replace(d_model=64, n_heads=4, moe=cfg.moe.replace(d_model=64, d_expert=64))
    model = MoETransformer(cfg).to(torch.bfloat16)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(ids, labels=ids)
    assert explained.graph_break_count == 0, explained.break_reasons
