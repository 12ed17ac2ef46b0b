"""A training run's configs (`moekit train` saves a `RunConfig` as config.json in the run
directory): data, training, evaluation, checkpoints and parallelism."""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass, field
from typing import Annotated, Literal

from moekit.config.base import ConfigBase
from moekit.config.model import ModelConfig
from moekit.config.rules import In, NonNegFloat, NonNegInt, invalid

# What to do about a damaged file of a run directory (config.json, written by `moekit train`).
RUN_FILE_REMEDY = "restore it from a copy of the run (`moekit train` or `convert` wrote it)"
DEVICE_PATTERN = r"auto|cpu|mps|cuda(:\d+)?"
FreezePart = Literal["experts", "router", "attention", "model", "mtp"]
FREEZE_PARTS = typing.get_args(FreezePart)
Beta = Annotated[float, In("[0, 1)")]


@dataclass(kw_only=True)
class DataConfig(ConfigBase):
    """Where the training text comes from and how it becomes tokens.

    source: "stdlib" (the .py files of the running Python's standard library, without its test
        suites), a text file, a folder of text files, or a glob such as "docs/**/*.md". Files are
        split into train and validation by a hash of their path; a single file by lines.
    tokenizer: "bpe" (byte-level BPE trained with `tokenizers` on the training split, cached),
        "bytes" (one token per UTF-8 byte plus end-of-text: 257 ids) or "run" (the run
        directory's own tokenizer.json, as `moekit convert --from-hf` writes it; checked against
        the model's vocabulary when the data is prepared).
    vocab_size: BPE vocabulary size, end-of-text included; None means the model's vocab_size.
    val_fraction: share of the files held out for validation (about; at least one file).
    max_files: read only the first N files of the source (sorted by path); None reads all.
    cache_dir: where trained tokenizers and tokenised splits are cached; None means
        $MOEKIT_CACHE, else ~/.cache/moekit.
    """

    source: str = "stdlib"
    tokenizer: Literal["bpe", "bytes", "run"] = "bpe"
    vocab_size: Annotated[int, In("[258, inf)")] | None = None
    val_fraction: Annotated[float, In("(0, 1)")] = 0.05
    max_files: int | None = None
    cache_dir: str | None = None

    def check(self) -> None:
        if not self.source:
            raise invalid("source", self.source, "must be 'stdlib', a file, a folder or a glob")
        if self.vocab_size is not None and self.tokenizer != "bpe":
            raise invalid("vocab_size", self.vocab_size, "sizes a BPE: must be None unless 'bpe'")


@dataclass(kw_only=True)
class EvalConfig(ConfigBase):
    """Evaluation on the validation split: loss and bits per byte.

    every: evaluate every N optimizer steps (and always after the last); 0 only after the last.
    batches: number of batches per evaluation; the same windows every time, so losses compare.
    batch_size: sequences per evaluation batch; None means the training batch_size.
    """

    every: NonNegInt = 50
    batches: int = 6
    batch_size: int | None = None


@dataclass(kw_only=True)
class CheckpointConfig(ConfigBase):
    """Checkpoints in RUN_DIR/checkpoints/step-NNNNNN (weights, optimizer, schedule, RNG, data).

    every: save every N optimizer steps (and always after the last, and on Ctrl-C); 0 only then.
    keep: how many of the most recent checkpoints to keep.
    """

    every: NonNegInt = 100
    keep: int = 2


@dataclass(kw_only=True)
class TrainConfig(ConfigBase):
    """How to train: batches, AdamW, learning-rate schedule, precision, logging.

    Batches
        steps: optimizer steps.
        batch_size: sequences per micro-batch; one step sees batch_size * grad_accum sequences.
        seq_len: tokens per sequence (at most the model's max_seq_len).
        grad_accum: micro-batches whose gradients are summed before each optimizer step.
        seed: seeds the initial weights, the batch sampler and the global torch RNG.

    Optimizer (AdamW; no weight decay on norms, biases, embeddings and routers)
        lr: peak learning rate, reached after warmup_steps of linear warmup, then cosine decay to
            lr * min_lr_ratio at the last step.
        weight_decay, betas, eps: AdamW's.
        grad_clip: clip the gradients' global norm to this; None does not clip.

    Execution
        device: "auto" (cuda when available, else cpu), "cpu", "cuda", "cuda:N" or "mps".
        bf16: run the forward pass under bfloat16 autocast (weights and optimizer stay float32).
        compile: wrap the model in torch.compile.
        threads: CPU threads for torch; None leaves torch's default.
        freeze: parts left untrained (fine-tuning), any of "experts" (routed and shared), "router"
            and "attention" (in the main model and the MTP blocks), "model" (the whole main
            model, its embedding and head included: --train.freeze=model trains only the
            multi-token-prediction module) and "mtp" (that module); () trains everything. A
            comma-separated string is read as the list.

    Logging
        log_every: write train metrics (loss averaged over the interval, expert counts summed over
            it) to metrics.jsonl every N steps.
        progress: show a progress bar.
        tensorboard: also write TensorBoard events when the tensorboard package is installed.
    """

    steps: int = 400
    batch_size: int = 8
    seq_len: Annotated[int, In("[2, inf)")] = 256
    grad_accum: int = 1
    seed: NonNegInt = 0
    lr: float = 3e-3
    min_lr_ratio: Annotated[float, In("[0, 1]")] = 0.1
    warmup_steps: NonNegInt = 30
    weight_decay: NonNegFloat = 0.1
    betas: tuple[Beta, Beta] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float | None = 1.0
    device: str = "auto"
    bf16: bool = False
    compile: bool = False
    threads: int | None = None
    freeze: tuple[FreezePart, ...] = ()
    log_every: int = 10
    progress: bool = True
    tensorboard: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self) -> None:
        # Runs saved before freeze was a list hold None or "experts,router"; a user may write that.
        if self.freeze is None or isinstance(self.freeze, str):
            parts = (self.freeze or "").split(",")
            self.freeze = tuple(part.strip() for part in parts if part.strip())
        super().__post_init__()

    def check(self) -> None:
        if not re.fullmatch(DEVICE_PATTERN, self.device):
            raise invalid("device", self.device, "use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")


@dataclass(kw_only=True)
class ParallelConfig(ConfigBase):
    """How a run spreads over the processes `torchrun` starts (moekit.distributed).

    The processes form a (dp, ep) grid. Each MoE layer's routed experts are split over the ep
    processes of a row (expert parallelism: tokens travel to their experts and back by
    all-to-all); the dp rows are copies of one another's expert shards. Everything that is not a
    routed expert (attention, routers, shared experts, embeddings) is replicated on every process
    and its gradients are averaged over all of them (DDP). `train.batch_size` stays the global
    batch: each process takes batch_size / world_size of its sequences.

    ep: expert-parallel size; must divide every MoE layer's n_experts.
    dp: data-parallel size (copies of each expert shard); None means world_size // ep.
        world_size must equal ep * dp.
    scope: what the statistics that couple tokens are computed over. "global": every process's
        tokens of the micro-batch, as one process would see the whole global batch: the balance
        losses, the metrics in `aux` (counts, MaxVio, dropped fraction, entropy) and the capacity
        C = ceil(capacity_factor * T_global * top_k / E) with its drop order; results do not
        depend on the layout. "local": each process's own tokens (GShard's per-group capacity,
        per-device balance losses); less communication, results change with the layout.
        The aux-loss-free bias counts are summed over all processes in both scopes, so every
        process keeps identical biases.
    timeout_s: a collective operation that waits longer than this fails with an error naming the
        failure (a dead or hung process); it must exceed the longest time one process works
        while the others wait: rank 0 preparing the data on a first run, writing a checkpoint.
    backend: "auto" (nccl on CUDA, else gloo), "gloo" or "nccl".
    """

    ep: int = 1
    dp: int | None = None
    scope: Literal["global", "local"] = "global"
    timeout_s: float = 600.0
    backend: Literal["auto", "gloo", "nccl"] = "auto"

    def check_model(self, model: ModelConfig) -> None:
        """Raise unless the model's MoE layers can be split over `ep` processes."""
        if self.ep == 1 or model.moe is None:
            return
        if model.moe.n_experts % self.ep:
            rule = f"must divide model.moe.n_experts ({model.moe.n_experts})"
            raise invalid("parallel.ep", self.ep, rule)
        if not model.moe.token_choice:
            raise invalid("parallel.ep", self.ep, "expert parallelism needs a token-choice router")


@dataclass(kw_only=True)
class RunConfig(ConfigBase):
    """A training run: the model and how to train it.

    `RunConfig.preset(name)` pairs `ModelConfig.preset(name)` with the training settings tuned for
    it; "tiny" (for tests and smoke runs) widens the tiny model's vocabulary to 512 so that a BPE
    fits, and trains 30 steps on 40 files; "experiment" is the base run of `moekit experiment`.
    """

    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def check(self) -> None:
        self.parallel.check_model(self.model)
        model, data = self.model, self.train.data
        if self.train.seq_len > model.max_seq_len:
            rule = f"must be <= model.max_seq_len ({model.max_seq_len})"
            raise invalid("train.seq_len", self.train.seq_len, rule)
        if data.tokenizer == "bytes" and model.vocab_size < 257:
            raise invalid("model.vocab_size", model.vocab_size, "tokenizer='bytes' needs >= 257")
        if data.tokenizer == "bpe" and data.vocab_size is None and model.vocab_size < 258:
            raise invalid("model.vocab_size", model.vocab_size, "a BPE vocabulary needs >= 258")
        if data.vocab_size is not None and data.vocab_size > model.vocab_size:
            rule = f"must be <= model.vocab_size ({model.vocab_size})"
            raise invalid("train.data.vocab_size", data.vocab_size, rule)

    @property
    def token_vocab_size(self) -> int:
        """Size of the tokenizer's vocabulary (at most model.vocab_size)."""
        data = self.train.data
        if data.tokenizer == "bytes":
            return 257
        return data.vocab_size if data.vocab_size is not None else self.model.vocab_size

    @classmethod
    def preset(cls, name: str) -> RunConfig:
        """The model preset `name` with its training settings."""
        from moekit.config.presets import RUN_PRESETS  # the presets are built of this class

        if name in RUN_PRESETS:
            return RUN_PRESETS[name]()
        return cls(model=ModelConfig.preset(name))
