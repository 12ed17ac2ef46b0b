"""Sparse upcycling: copies of the dense FFN give the dense model's loss; the run trains on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tests.run_cases import JSON_PACKAGE

from moekit.cli import main
from moekit.config import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    UpcycleConfig,
)
from moekit.data import byte_tokenizer
from moekit.model import MoETransformer
from moekit.quant.files import QUANTIZATION_FILE
from moekit.train import list_checkpoints, train
from moekit.train.checkpoint import TrainerState, save_checkpoint
from moekit.train.optim import build_optimizer
from moekit.train.upcycle import upcycle_config, upcycle_model

DENSE = ModelConfig.preset("tiny").replace(vocab_size=257, moe=None)


def dense_model() -> MoETransformer:
    model = MoETransformer(DENSE)
    model.init_weights()
    return model.eval()


@pytest.mark.parametrize("top_k", [1, 2])
def test_upcycled_model_starts_at_the_dense_loss(top_k: int):
    dense = dense_model()
    moe = upcycle_model(dense, upcycle_config(DENSE, 4, top_k)).eval()
    batch = torch.randint(0, 257, (2, 32))
    with torch.no_grad():
        want, got = dense(batch, labels=batch), moe(batch, labels=batch)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.lm_loss, want.lm_loss)
    assert len(got.aux) == DENSE.n_layers


def test_noise_makes_the_experts_differ():
    moe = upcycle_model(dense_model(), upcycle_config(DENSE, 4, 2), noise=0.01)
    w = moe.moe_layers()[0].experts.w_in
    assert not torch.equal(w[0], w[1])
    assert (w[0] - w[1]).std() < 0.05 * w[0].std()


def test_noise_that_overflows_is_refused():
    """--noise=1e308 wrote 129,024 infinite weights into a run and exited 0."""
    with pytest.raises(ValueError, match="noise=1e\\+308 makes expert weights that are not finite"):
        upcycle_model(dense_model(), upcycle_config(DENSE, 4, 2), noise=1e308)


def test_upcycling_an_moe_model_is_refused():
    with pytest.raises(ValueError, match="dense model"):
        upcycle_config(ModelConfig.preset("tiny"), 4, 2)


def test_upcycle_command_writes_a_run_that_trains_on(tmp_path: Path, capsys):
    data = DataConfig(source=JSON_PACKAGE, tokenizer="bytes", cache_dir=str(tmp_path / "cache"))
    settings = dict(steps=1, batch_size=2, seq_len=32, warmup_steps=1, progress=False)
    t = TrainConfig(**settings, tensorboard=False, data=data, eval=EvalConfig(every=1, batches=1),
                    checkpoint=CheckpointConfig(every=1))  # fmt: skip
    dense_dir = tmp_path / "dense"
    model = dense_model()
    save_checkpoint(dense_dir, model.state_dict(), build_optimizer(model, t).state_dict(),
                    TrainerState(0, 0, {}, torch.get_rng_state()), keep=1)  # fmt: skip
    (dense_dir / "config.json").write_text(RunConfig(model=DENSE, train=t).to_json())
    byte_tokenizer().save(str(dense_dir / "tokenizer.json"))
    (dense_dir / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    step = list_checkpoints(dense_dir)[-1]  # one checkpoint of the run: the run's tokenizer
    assert main(["upcycle", str(step), "--n_experts=4", "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "tokenizer.json").is_file()
    (step / QUANTIZATION_FILE).write_text("{}")  # a quantized run trains no more: refused first
    assert main(["upcycle", str(dense_dir), "--out", str(tmp_path / "q")]) == 2
    assert "holds a quantized model" in capsys.readouterr().err and not (tmp_path / "q").exists()
    (step / QUANTIZATION_FILE).unlink()
    out = tmp_path / "moe"
    assert main(["upcycle", str(dense_dir), "--n_experts=4", "--top_k=2", "--out", str(out)]) == 0
    assert (out / "chat_template.jinja").read_text() == "{{ messages[0]['content'] }}"  # kept
    cfg = RunConfig.from_json((out / "config.json").read_text())
    saved = UpcycleConfig.from_json((out / "upcycle_config.json").read_text())
    assert saved == UpcycleConfig(n_experts=4, top_k=2)
    assert cfg.model.moe.n_experts == 4 and cfg.model.moe.d_expert == DENSE.d_ff
    result = train(cfg, out, resume=True)
    assert result.step == 1 and result.train_loss is not None
    assert [p.name for p in list_checkpoints(out)][-1] == "step-000001"
