"""Fine-tuning with frozen parts: frozen parameters do not move; the rest trains."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import torch

from moekit.config import DataConfig, EvalConfig, ModelConfig, RunConfig, TrainConfig
from moekit.model import MoETransformer
from moekit.overrides import apply_overrides
from moekit.train import train
from moekit.train.checkpoint import latest_checkpoint, load_weights
from moekit.train.freeze import freeze, part_of, trainable_table
from moekit.train.optim import build_optimizer

CFG = ModelConfig.preset("tiny").replace(vocab_size=257)


def one_step(parts: list[str]) -> tuple[dict[str, torch.Tensor], MoETransformer]:
    model = MoETransformer(CFG)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    freeze(model, parts)
    opt = build_optimizer(model, TrainConfig(lr=1e-2))
    batch = torch.randint(0, 257, (2, 16))
    model(batch, labels=batch).loss.backward()
    opt.step()
    held = {id(p) for group in opt.param_groups for p in group["params"]}
    held |= {id(p) for p in opt.state}
    for name, param in model.named_parameters():  # no optimizer state for a frozen parameter
        assert (id(param) in held) == (part_of(name) not in parts), name
    return before, model


@pytest.mark.parametrize(
    "parts", [["experts"], ["router"], ["attention"], ["experts", "attention"]]
)
def test_frozen_parameters_do_not_change_after_a_step(parts: list[str]):
    before, model = one_step(parts)
    for name, param in model.named_parameters():
        moved = not torch.equal(before[name], param.detach())
        assert moved != (part_of(name) in parts), name


def test_parts_of_parameter_names():
    assert part_of("layers.0.ffn.experts.w_in") == "experts"
    assert part_of("layers.0.ffn.shared_experts.w_in") == "experts"
    assert part_of("layers.1.ffn.router.weight") == "router"
    assert part_of("layers.1.attn.wq.weight") == "attention"
    assert part_of("layers.1.attn_norm.weight") == "other"


def test_trainable_table_counts_frozen_parameters():
    model = MoETransformer(CFG)
    freeze(model, ["experts"])
    experts = sum(m.experts.w_in.numel() + m.experts.w_out.numel() for m in model.moe_layers())
    table = trainable_table(model)
    row = next(line for line in table.splitlines() if line.startswith("experts"))
    assert row.split() == ["experts", "0", f"{experts:,}"]
    total = sum(p.numel() for p in model.parameters())
    assert f"trainable: {total - experts:,} of {total:,}" in table


def test_bad_freeze_names_the_field():
    with pytest.raises(ValueError, match="freeze='embeddings'"):
        TrainConfig(freeze="embeddings")
    with pytest.raises(ValueError, match="freeze='embeddings' is invalid: must be one of"):
        TrainConfig(freeze=["router", "embeddings"])


def test_a_string_of_parts_is_not_frozen_by_its_letters():
    with pytest.raises(ValueError, match="cannot freeze"):
        freeze(MoETransformer(CFG), "experts")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("given", "parts"),
    [(None, ()), ("", ()), ("router", ("router",)), ("experts, router", ("experts", "router"))],
)
def test_freeze_of_older_runs_loads_as_a_list(given: str | None, parts: tuple[str, ...]):
    """Runs saved before freeze was a list hold None or a comma-separated string."""
    data = TrainConfig().to_dict()
    data["freeze"] = given
    cfg = TrainConfig.from_dict(data)
    assert cfg.freeze == parts
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    assert json.loads(cfg.to_json())["freeze"] == list(parts)


def test_freeze_override_takes_a_comma_separated_list():
    def frozen_by(value: str) -> tuple[str, ...]:
        return apply_overrides(RunConfig.preset("tiny"), [f"--train.freeze={value}"]).train.freeze

    assert frozen_by("experts,router") == ("experts", "router")
    assert frozen_by('["attention"]') == ("attention",)
    assert frozen_by("none") == frozen_by("") == ()
    with pytest.raises(ValueError, match=r"--train\.freeze='embeddings'"):
        frozen_by("embeddings")


def test_training_run_with_experts_frozen(tmp_path: Path):
    source = str(Path(sysconfig.get_paths()["stdlib"]) / "json")
    data = DataConfig(source=source, tokenizer="bytes", cache_dir=str(tmp_path / "cache"))
    settings = dict(steps=1, batch_size=2, seq_len=32, warmup_steps=1, progress=False)
    t = TrainConfig(**settings, tensorboard=False, freeze="experts", data=data,
                    eval=EvalConfig(batches=1))  # fmt: skip
    cfg = RunConfig(model=CFG, train=t)
    train(cfg, tmp_path / "run")
    torch.manual_seed(t.seed)
    initial, trained = MoETransformer(CFG), MoETransformer(CFG)
    load_weights(latest_checkpoint(tmp_path / "run"), trained)
    assert torch.equal(initial.layers[0].ffn.experts.w_in, trained.layers[0].ffn.experts.w_in)
    assert not torch.equal(initial.layers[0].ffn.router.weight, trained.layers[0].ffn.router.weight)
