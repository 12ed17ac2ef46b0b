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
