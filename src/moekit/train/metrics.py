"""Training metrics: per-step figures, their sums over a logging interval, and the sinks they go
to (metrics.jsonl, one JSON object a line; TensorBoard when it is installed)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moekit.fileio import atomic_write_text
from moekit.losses import sum_dtype
from moekit.moe import MoEAux
from moekit.userfiles import read_json_lines

# Per-layer figures of `MoEAux` averaged over micro-batches and steps (counts are summed instead).
LAYER_FIGURES = ("max_vio", "dropped_fraction", "z_loss", "balance_loss", "entropy")
# Every figure stays a tensor on the model's device until a record is written: one host read per
# log interval, not one per figure, layer and micro-batch (on a GPU, each is a stall). Sums are
# kept in `losses.sum_dtype` (float64 where the device has it).


@dataclass
class LayerFigures:
    """One MoE layer over one or more forward passes: counts_E (E,) routed counts, summed;
    sums_F (len(LAYER_FIGURES),) the scalar figures, summed; both on the model's device."""

    counts_E: Tensor
    sums_F: Tensor
    passes: int = 1

    @classmethod
    def from_aux(cls, aux: MoEAux) -> LayerFigures:
        acc = sum_dtype(aux.routed_counts.device)
        sums = torch.stack([getattr(aux, name).detach().to(acc) for name in LAYER_FIGURES])
        return cls(aux.routed_counts.detach().to(acc), sums)

    def __add__(self, other: LayerFigures) -> LayerFigures:
        return LayerFigures(
            self.counts_E + other.counts_E, self.sums_F + other.sums_F, self.passes + other.passes
        )

    def record(self) -> dict[str, Any]:
        """counts and the mean of each figure, read from the device."""
        means = (self.sums_F / self.passes).tolist()
        return {"counts": [int(c) for c in self.counts_E.tolist()]} | dict(
            zip(LAYER_FIGURES, means, strict=True)
        )


def add_layers(layers: list[LayerFigures], more: list[LayerFigures]) -> list[LayerFigures]:
    """Each layer's figures of `more` added to those of `layers` (`more` when `layers` is [])."""
    if not layers:
        return more
    return [mine + theirs for mine, theirs in zip(layers, more, strict=True)]


@dataclass
class Interval:
    """Steps since the last train record: summed losses, time, tokens and layer figures."""

    steps: int = 0
    seconds: float = 0.0
    tokens: int = 0
    sums: Tensor | None = None  # (loss, lm_loss, aux_loss, mtp..., grad_norm) summed, on device
    layers: list[LayerFigures] = field(default_factory=list)

    def add(
        self, figures_F: Tensor, layers: list[LayerFigures], seconds: float, tokens: int
    ) -> None:
        """One optimizer step: figures_F (loss, lm_loss, aux_loss, then each multi-token-prediction
        depth's loss, averaged over its micro-batches, and the gradient norm) and the per-layer
        figures (the MTP blocks' MoE layers after the main model's), on the model's device."""
        self.steps += 1
        self.seconds += seconds
        self.tokens += tokens
        self.sums = figures_F if self.sums is None else self.sums + figures_F
        self.layers = add_layers(self.layers, layers)

    def record(self, step: int, lr: float, tokens_seen: int) -> dict[str, Any]:
        """The metrics.jsonl record of this interval, ending at optimizer step `step` (the one
        place the figures are read from the device)."""
        assert self.sums is not None, "an interval without steps has no record"
        rec: dict[str, Any] = {"kind": "train", "step": step}
        rec |= dict(
            zip(loss_names(len(self.sums) - 4), (self.sums / self.steps).tolist(), strict=True)
        )
        rec |= {"lr": lr, "tokens": tokens_seen, "seconds": self.seconds}
        rec["tokens_per_s"] = self.tokens / self.seconds
        rec["layers"] = [layer.record() for layer in self.layers]
        return rec


def loss_names(mtp_depth: int) -> tuple[str, ...]:
    """The names of a train record's losses: loss, lm_loss, aux_loss, mtp_loss_1 .. mtp_loss_D
    (each depth's unweighted cross-entropy) and grad_norm."""
    mtp = tuple(f"mtp_loss_{k}" for k in range(1, mtp_depth + 1))
    return ("loss", "lm_loss", "aux_loss", *mtp, "grad_norm")


class MetricsLog:
    """Appends records to RUN_DIR/metrics.jsonl (and TensorBoard, if installed and wanted).

    `resume_step` keeps the records up to that step from an earlier run and drops the later ones,
    which the resumed run will write again; None starts a fresh file.
    """

    def __init__(self, run_dir: Path, resume_step: int | None, tensorboard: bool) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        kept = read_metrics(self.path) if resume_step is not None else []
        kept = [r for r in kept if r["step"] <= (resume_step or 0)]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = self.path.open("a")
        self._tb = _tensorboard_writer(run_dir) if tensorboard else None

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is None:
            return
        step, kind = record["step"], record["kind"]
        for key, value in record.items():
            if isinstance(value, float):
                self._tb.add_scalar(f"{kind}/{key}", value, step)
        for i, layer in enumerate(record.get("layers", [])):
            for name in LAYER_FIGURES:
                self._tb.add_scalar(f"layer{i}/{name}", layer[name], step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file ([] if it does not exist). A damaged line is an error
    naming it, except a last line cut short by a killed run (of a step after its last checkpoint,
    which a resumed run writes again), which is dropped."""
    path = Path(path)
    if not path.is_file():
        return []
    remedy = "delete that line (the records feed the report and its plots)"
    return read_json_lines(path, remedy, expect=dict)


def _tensorboard_writer(run_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # optional: TensorBoard is not a dependency
        return None
    return SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
