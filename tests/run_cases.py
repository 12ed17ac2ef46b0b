"""Tiny training runs for tests: the tiny model on the bytes of the standard library's json
package (a small slice of the built-in corpus)."""

from __future__ import annotations

import sysconfig
from pathlib import Path

from moekit.config import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
)

JSON_PACKAGE = str(Path(sysconfig.get_paths()["stdlib"]) / "json")


def tiny_run(work_dir: Path, **train: object) -> RunConfig:
    """12 steps of 8 x 64 bytes, eval and checkpoints every 4, data cached under work_dir/cache;
    `train` overrides TrainConfig fields."""
    data = DataConfig(source=JSON_PACKAGE, tokenizer="bytes", cache_dir=str(work_dir / "cache"))
    settings: dict = dict(
        steps=12,
        batch_size=8,
        seq_len=64,
        lr=3e-3,
        warmup_steps=2,
        log_every=1,
        progress=False,
        tensorboard=False,
        data=data,
        eval=EvalConfig(every=4, batches=2),
        checkpoint=CheckpointConfig(every=4, keep=3),
    )
    settings.update(train)
    model = ModelConfig.preset("tiny").replace(vocab_size=257)
    return RunConfig(model=model, train=TrainConfig(**settings))


def quantizable_model() -> ModelConfig:
    """tiny with every width a multiple of 32 (int4 and MXFP4 quantize groups of 32)."""
    tiny = ModelConfig.preset("tiny")
    assert tiny.moe is not None
    return tiny.replace(
        d_model=64,
        n_heads=4,
        d_ff=96,
        vocab_size=257,
        moe=tiny.moe.replace(d_model=64, d_expert=32),
    )


def train_quantizable_run(work_dir: Path, name: str = "run") -> Path:
    """`moekit train` of `quantizable_model` for 2 steps on the json package's bytes, into
    work_dir/name (the float run the quantization tests quantize)."""
    from moekit.cli import main

    cfg = quantizable_model()
    assert cfg.moe is not None
    args = ["train", "tiny", f"--out={work_dir / name}", "--train.steps=2",
            "--train.progress=false", f"--train.data.source={JSON_PACKAGE}",
            "--train.data.tokenizer=bytes", f"--train.data.cache_dir={work_dir / 'cache'}",
            f"--model.d_model={cfg.d_model}", f"--model.n_heads={cfg.n_heads}",
            f"--model.d_ff={cfg.d_ff}", f"--model.moe.d_model={cfg.d_model}",
            f"--model.moe.d_expert={cfg.moe.d_expert}"]  # fmt: skip
    assert main(args) == 0
    return work_dir / name
