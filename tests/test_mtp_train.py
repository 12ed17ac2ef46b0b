"""Training with multi-token prediction: `moekit train --model.mtp_depth=1` logs each depth's
loss beside the main one and tracks the MTP block's experts like the other layers;
`--train.freeze=model` trains the MTP module alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from tests.run_cases import tiny_run
from tests.test_train import interrupt_at
from tokenizers import Tokenizer

from moekit.cli import main
from moekit.config import TrainConfig
from moekit.model import MoETransformer
from moekit.quant.files import QUANTIZATION_FILE
from moekit.train import loop as loop_module
from moekit.train.checkpoint import latest_checkpoint, load_weights
from moekit.train.freeze import freeze, trainable_table
from moekit.train.optim import build_optimizer


def records(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_train_with_mtp_logs_each_depth_and_its_experts(tmp_path: Path) -> None:
    (tmp_path / "run.json").write_text(tiny_run(tmp_path, steps=4, grad_accum=2).to_json())
    args = ["train", str(tmp_path / "run.json"), "--out", str(tmp_path / "run")]
    assert main([*args, "--model.mtp_depth=2", "--model.mtp_loss_weight=0.2"]) == 0
    train = records(tmp_path / "run", "train")
    assert len(train) == 4
    for r in train:
        assert {"loss", "lm_loss", "aux_loss", "mtp_loss_1", "mtp_loss_2", "grad_norm"} <= set(r)
        weighted = 0.2 / 2 * (r["mtp_loss_1"] + r["mtp_loss_2"])
        assert abs(r["loss"] - (r["lm_loss"] + r["aux_loss"] + weighted)) < 1e-5
        assert len(r["layers"]) == 2 + 2  # the tiny model's two MoE layers, then each depth's
        assert sum(r["layers"][-1]["counts"]) == 2 * 8 * 64 * 2  # grad_accum x tokens x top_k
    assert train[-1]["mtp_loss_1"] < train[0]["mtp_loss_1"]
    report = (tmp_path / "run" / "report.md").read_text()
    last = train[-1]
    assert (
        f"- final multi-token-prediction loss (depth 1: {last['mtp_loss_1']:.4f}, depth 2: "
        f"{last['mtp_loss_2']:.4f}) nats/token"
    ) in report


def test_resume_with_mtp_gives_the_losses_of_an_uninterrupted_run(tmp_path: Path, monkeypatch):
    """The MTP module's weights, optimizer state and losses resume exactly like the model's."""
    cfg = tiny_run(tmp_path, steps=8)
    cfg = cfg.replace(model=cfg.model.replace(mtp_depth=1))
    loop_module.train(cfg, tmp_path / "straight")
    with monkeypatch.context() as patch:
        interrupt_at(patch, 5)
        loop_module.train(cfg, tmp_path / "halves")
    assert latest_checkpoint(tmp_path / "halves").name == "step-000005"  # stopped there
    loop_module.train(cfg, tmp_path / "halves", resume=True)
    straight, halves = (
        records(tmp_path / "straight", "train"),
        records(tmp_path / "halves", "train"),
    )
    assert [r["step"] for r in halves] == list(range(1, 9))
    for a, b in zip(straight, halves, strict=True):
        assert (a["loss"], a["mtp_loss_1"]) == (b["loss"], b["mtp_loss_1"])


def test_freezing_the_model_trains_only_the_mtp_module() -> None:
    cfg = tiny_run(Path("."), steps=1).model.replace(mtp_depth=1)
    torch.manual_seed(0)
    model = MoETransformer(cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    freeze(model, ["model"])
    opt = build_optimizer(model, TrainConfig(lr=1e-2))
    batch = torch.randint(0, 257, (2, 16))
    model(batch, labels=batch).loss.backward()
    opt.step()
    for name, p in model.named_parameters():
        assert torch.equal(before[name], p.detach()) != name.startswith("mtp."), name
    mtp = sum(p.numel() for n, p in model.named_parameters() if n.startswith("mtp."))
    assert f"of which the mtp module: {mtp:,} trainable, 0 frozen" in trainable_table(model)


def test_a_frozen_router_keeps_its_balancing_bias() -> None:
    """Aux-loss-free balancing moves a router's bias after each step, but not a frozen router's:
    with the model frozen, only the MTP block's bias moves, so the main model's routing (and its
    outputs) stay those it was trained to."""
    cfg = tiny_run(Path("."), steps=1).model.replace(mtp_depth=1)
    assert cfg.moe is not None
    cfg = cfg.replace(moe=cfg.moe.replace(bias_update_rate=0.01))
    torch.manual_seed(0)
    model = MoETransformer(cfg).train()
    freeze(model, ["model"])
    layers = model.moe_layers(with_mtp=True)
    before = [layer.router.expert_bias.clone() for layer in layers]
    batch = torch.randint(0, 257, (2, 16))
    model(batch, labels=batch).loss.backward()
    model.update_expert_bias()
    moved = [
        not torch.equal(b, layer.router.expert_bias)
        for b, layer in zip(before, layers, strict=True)
    ]
    assert moved == [False] * (len(layers) - 1) + [True]
    assert all(int(layer.bias_counts.sum()) == 0 for layer in layers)


def test_freezing_mtp_keeps_the_module_and_trains_the_rest() -> None:
    model = MoETransformer(tiny_run(Path("."), steps=1).model.replace(mtp_depth=1))
    freeze(model, ["mtp"])
    assert all(p.requires_grad != n.startswith("mtp.") for n, p in model.named_parameters())


def test_train_cli_with_the_model_frozen_moves_only_the_mtp_module(tmp_path: Path) -> None:
    cfg = tiny_run(tmp_path, steps=2)
    (tmp_path / "run.json").write_text(cfg.to_json())
    args = ["train", str(tmp_path / "run.json"), "--out", str(tmp_path / "run")]
    assert main([*args, "--model.mtp_depth=1", "--train.freeze=model"]) == 0
    model_cfg = cfg.model.replace(mtp_depth=1)
    torch.manual_seed(cfg.train.seed)
    initial, trained = MoETransformer(model_cfg), MoETransformer(model_cfg)
    load_weights(latest_checkpoint(tmp_path / "run"), trained)
    assert torch.equal(initial.embed.weight, trained.embed.weight)
    assert torch.equal(initial.layers[1].ffn.router.weight, trained.layers[1].ffn.router.weight)
    assert not torch.equal(initial.mtp[0].eh_proj.weight, trained.mtp[0].eh_proj.weight)


def test_a_new_run_adds_an_mtp_head_to_a_trained_runs_frozen_weights(tmp_path: Path, capsys):
    """--train.init_from starts a new run from a trained run's weights: with an MTP module added
    and the model frozen, the main weights stay the trained ones and only the head learns, here
    on the main model's own predictions (mtp_target=model). Settings that keep the weights' shapes
    but change their function are refused, as a source that is not a run, before any data."""
    cfg = tiny_run(tmp_path, steps=2)
    (tmp_path / "run.json").write_text(cfg.to_json())
    base = ["train", str(tmp_path / "run.json")]
    assert main([*base, "--out", str(tmp_path / "main")]) == 0
    head_args = ["--model.mtp_depth=1", "--train.freeze=model", "--model.mtp_target=model"]
    init = f"--train.init_from={tmp_path / 'main'}"
    talking = "--train.progress=true"
    assert main([*base, "--out", str(tmp_path / "head"), *head_args, init, talking]) == 0
    assert "(MTP depth 1 starts fresh)" in capsys.readouterr().out
    trained = MoETransformer(cfg.model)
    load_weights(latest_checkpoint(tmp_path / "main"), trained)
    head = MoETransformer(cfg.model.replace(mtp_depth=1))
    load_weights(latest_checkpoint(tmp_path / "head"), head)
    ours = head.state_dict()
    assert all(torch.equal(t, ours[name]) for name, t in trained.state_dict().items())
    torch.manual_seed(cfg.train.seed)
    fresh = MoETransformer(cfg.model.replace(mtp_depth=1))
    assert not torch.equal(fresh.mtp[0].eh_proj.weight, head.mtp[0].eh_proj.weight)

    # what does not fit is one error naming it, and no run is written
    assert cfg.model.moe is not None
    top_k = cfg.model.moe.top_k + 1  # the same shapes, another function
    assert main([*base, "--out", str(tmp_path / "bad"), f"--model.moe.top_k={top_k}", init]) == 2
    err = capsys.readouterr().err
    assert (
        f"its model differs from this run's in model.moe.top_k ({top_k - 1} there, {top_k} here)"
        in err
    )
    deeper = f"--model.n_layers={cfg.model.n_layers + 1}"
    assert main([*base, "--out", str(tmp_path / "bad"), deeper, init]) == 2
    assert "model.n_layers (2 there, 3 here)" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "bad"), f"--train.init_from={tmp_path}"]) == 2
    assert "moekit convert --from-hf" in capsys.readouterr().err
    quantized = tmp_path / "quantized"  # a run `moekit quantize` wrote: for inference only
    shutil.copytree(tmp_path / "main", quantized)
    (latest_checkpoint(quantized) / QUANTIZATION_FILE).write_text("{}")
    assert main([*base, "--out", str(tmp_path / "bad"), f"--train.init_from={quantized}"]) == 2
    assert "holds a quantized model" in capsys.readouterr().err
    longer = f"--model.max_seq_len={cfg.model.max_seq_len * 2}"  # no weight depends on it
    assert main([*base, "--out", str(tmp_path / "longer"), longer, init]) == 0
    tokenizer = Tokenizer.from_file(str(tmp_path / "main" / "tokenizer.json"))
    tokenizer.add_tokens(["<another>"])
    tokenizer.save(str(tmp_path / "main" / "tokenizer.json"))
    assert main([*base, "--out", str(tmp_path / "bad"), init]) == 2
    assert "was trained with another tokenizer" in capsys.readouterr().err
    assert not any(p.is_file() for p in (tmp_path / "bad").rglob("*"))  # no run written
