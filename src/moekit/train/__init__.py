"""moekit.train: the training loop, AdamW and its schedule, checkpoints, metrics and reports."""

from moekit.train.checkpoint import list_checkpoints, load_checkpoint
from moekit.train.loop import TrainingDiverged, TrainResult, train
from moekit.train.optim import build_optimizer, lr_at
from moekit.train.report import write_report

__all__ = [
    "TrainResult",
    "TrainingDiverged",
    "build_optimizer",
    "list_checkpoints",
    "load_checkpoint",
    "lr_at",
    "train",
    "write_report",
]
