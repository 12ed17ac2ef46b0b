"""Multi-token prediction: the module equals the paper's formulas (tests/mtp_reference.py), its
loss joins the model's, its blocks are built like the model's, its parameters are counted apart."""

from __future__ import annotations

import pytest
import torch
from tests.mtp_reference import mtp_loss_reference, mtp_reference

from moekit import ModelConfig, MoETransformer
from moekit.config import MLAConfig
from moekit.model import parameter_breakdown
from moekit.model.block import DenseFFN
from moekit.model.mla import LatentAttention
from moekit.moe import MoELayer

TINY = ModelConfig.preset("tiny")
MLA = MLAConfig(q_lora_rank=12, kv_lora_rank=10, qk_nope_head_dim=8, qk_rope_head_dim=4,
                v_head_dim=6)  # fmt: skip
VARIANTS = {
    "gqa_moe_depth2": TINY.replace(mtp_depth=2, mtp_loss_weight=0.5),
    "mla_first_dense": TINY.replace(mla=MLA, n_kv_heads=None, first_dense=1, mtp_depth=1),
    "dense_tied": TINY.replace(moe=None, tie_embeddings=True, mtp_depth=1),
}


def model_of(cfg: ModelConfig, seed: int = 0) -> MoETransformer:
    torch.manual_seed(seed)
    return MoETransformer(cfg).eval()


def tokens(length: int = 11) -> torch.Tensor:
    return torch.randint(0, 256, (2, length), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_mtp_logits_and_losses_equal_the_paper_formula(variant: str) -> None:
    model = model_of(VARIANTS[variant])
    t = tokens()
    with torch.no_grad():
        out = model(t, labels=t)
    ref_logits, ref_losses = mtp_reference(model, t)
    assert len(out.mtp_logits) == len(out.mtp_losses) == model.cfg.mtp_depth
    for k, (ours, ref) in enumerate(zip(out.mtp_logits, ref_logits, strict=True), start=1):
        assert ours.shape == (2, t.shape[1], 256)
        torch.testing.assert_close(ours[:, : t.shape[1] - k], ref, atol=2e-5, rtol=1e-5)
    for ours, ref in zip(out.mtp_losses, ref_losses, strict=True):
        assert ours.item() == pytest.approx(ref.item(), abs=1e-5)
    assert out.mtp_loss.item() == pytest.approx(mtp_loss_reference(model, t), abs=1e-5)


def test_loss_is_lm_plus_aux_plus_weighted_mtp_and_aux_counts_the_mtp_blocks() -> None:
    model = model_of(VARIANTS["gqa_moe_depth2"])
    t = tokens()
    out = model(t, labels=t)
    out.loss.backward()
    assert len(out.aux) == len(model.moe_layers()) + 2  # the main layers', then each depth's
    assert out.aux_loss.item() == pytest.approx(sum(a.loss.item() for a in out.aux))
    weighted = 0.5 / 2 * (out.mtp_losses[0] + out.mtp_losses[1])
    assert out.mtp_loss.item() == pytest.approx(weighted.item())
    assert out.loss.item() == pytest.approx((out.lm_loss + out.aux_loss + out.mtp_loss).item())
    assert all(p.grad is not None for name, p in model.named_parameters() if name.startswith("mtp"))


def test_labels_ignored_by_the_main_loss_are_ignored_by_every_depth() -> None:
    model = model_of(VARIANTS["gqa_moe_depth2"])
    t = tokens()
    labels = t.clone()
    labels[:, 6:] = -100
    out = model(t, labels=labels)
    cut = model(t[:, :6], labels=t[:, :6])  # causal: the first 6 positions do not see the rest
    for ours, short in zip(out.mtp_losses, cut.mtp_losses, strict=True):
        assert ours.item() == pytest.approx(short.item(), abs=1e-5)


def test_model_target_is_kl_from_the_main_models_own_prediction() -> None:
    """mtp_target="model": depth k at t learns the main model's distribution at t + k (both
    predict token t + k + 1): KL(main || depth) averaged over the positions a label scores, the
    main logits a target only (no gradient reaches them through it)."""
    model = model_of(VARIANTS["gqa_moe_depth2"].replace(mtp_target="model"))
    t = tokens()
    labels = t.clone()
    labels[1, 8:] = -100
    out = model(t, labels=labels)
    for k, (depth, loss) in enumerate(zip(out.mtp_logits, out.mtp_losses, strict=True), start=1):
        kls = []
        for b in range(2):
            for pos in range(t.shape[1] - k - 1):
                if labels[b, pos + k + 1] == -100:
                    continue
                p = torch.softmax(out.logits[b, pos + k].double(), -1)
                q = torch.softmax(depth[b, pos].double(), -1)
                kls.append((p * (p.log() - q.log())).sum())
        assert loss.item() == pytest.approx(torch.stack(kls).mean().item(), rel=1e-4, abs=1e-6)
        assert torch.autograd.grad(loss, out.logits, retain_graph=True, allow_unused=True) == (
            None,
        )
    assert out.mtp_loss.item() == pytest.approx(0.25 * sum(out.mtp_losses).item())


def test_a_depth_that_copies_the_main_model_has_zero_model_target_loss() -> None:
    from moekit.model.transformer import distill_loss

    main = torch.randn(2, 9, 17)
    depth = torch.cat([main[:, 1:], torch.randn(2, 1, 17)], dim=1)  # depth 1 at t = main at t + 1
    labels = torch.zeros(2, 9, dtype=torch.long)
    assert float(distill_loss(depth, main, labels, 1)) == pytest.approx(0.0, abs=1e-6)
    assert float(distill_loss(depth.flip(-1), main, labels, 1)) > 0.1


def test_mtp_runs_with_labels_or_when_asked_and_never_with_a_cache() -> None:
    model = model_of(VARIANTS["gqa_moe_depth2"])
    t = tokens()
    assert model(t).mtp_logits == [] and model(t).mtp_loss is None
    asked = model(t, mtp=True)
    assert len(asked.mtp_logits) == 2 and asked.loss is None
    assert model(t, labels=t, mtp=False).mtp_loss is None
    with pytest.raises(ValueError, match=r"mtp=True needs a model with multi-token prediction"):
        model_of(TINY)(t, mtp=True)


def test_mtp_blocks_are_built_like_the_models_blocks() -> None:
    moe = model_of(VARIANTS["mla_first_dense"])
    assert isinstance(moe.mtp[0].block.attn, LatentAttention)
    assert isinstance(moe.mtp[0].block.ffn, MoELayer)  # as the released layer 61
    assert moe.moe_layers(with_mtp=True) == [*moe.moe_layers(), moe.mtp[0].block.ffn]
    dense = model_of(VARIANTS["dense_tied"])
    assert isinstance(dense.mtp[0].block.ffn, DenseFFN)
    assert moe.mtp[0].eh_proj.weight.shape == (48, 96)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("mtp_depth", -1, "mtp_depth=-1 is invalid: must be an integer >= 0"),
        ("mtp_depth", 127, r"mtp_depth=127 is invalid: must be < max_seq_len - 1 \(127\)"),
        ("mtp_loss_weight", -0.1, "mtp_loss_weight=-0.1 is invalid"),
        ("mtp_target", "data", "mtp_target='data' is invalid.*'tokens'.*'model'"),
    ],
)
def test_bad_mtp_settings_are_one_clear_error(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TINY.replace(**{field: value})


def test_parameter_counts_show_the_mtp_module_apart() -> None:
    cfg = VARIANTS["gqa_moe_depth2"]
    model = model_of(cfg)
    counts = parameter_breakdown(model)
    own = sum(p.numel() for name, p in model.named_parameters() if name.startswith("mtp."))
    assert counts["mtp"] == own
    assert counts["total"] == model_of(cfg.replace(mtp_depth=0)).num_parameters()
    assert model.num_parameters() == counts["total"] + counts["mtp"]
    routed = model.mtp[0].block.ffn.experts
    inactive = sum(p.numel() for p in routed.parameters()) * (6 - 2) // 6
    assert counts["mtp_active"] == own - 2 * inactive


def test_deepseek_v3_mtp_module_as_published() -> None:
    """The 671B main model, and one MTP depth of 11.6B of its own: with the layer's copies of the
    embedding and head (1.85B) the checkpoint's 685B, as the model card gives ("671B of the Main
    Model weights and 14B of the Multi-Token Prediction (MTP) Module weights")."""
    counts = parameter_breakdown(ModelConfig.preset("deepseek-v3"))
    copies = 2 * 129280 * 7168
    assert counts["total"] == 671_026_404_352
    assert counts["mtp"] == 11_610_067_968
    assert round((counts["total"] + counts["mtp"] + copies) / 1e7) == 68449  # the card: "685B"
