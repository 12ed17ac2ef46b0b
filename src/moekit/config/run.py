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
            comma-separated string is read as the list. A frozen router keeps its aux-loss-free
            balancing bias as well.
        init_from: a run directory (its newest checkpoint) or one of its checkpoint directories
            whose weights this new run starts from instead of random ones (fine-tuning; a Hugging
            Face checkpoint: `moekit convert --from-hf` it first). The model settings must be
            the source's but for expert_impl, max_seq_len, balancing's training-only ones and the
            MTP module, which may be added (it starts fresh: train it alone with
            --train.freeze=model). Same tokenizer required. A resumed run reads its own
            checkpoint instead.

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
    seed: Annotated[int, In("[0, 2**64)")] = 0  # torch's generators take 64 bits
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
    init_from: str | None = None
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

    The processes form a mesh of named axes ("dp_replicate", "dp_shard", "tp") with
    world size = dp_replicate * dp_shard * tp; expert parallelism ("ep") borrows its processes
    from the data-parallel ones, as torchtitan's does:

    dp_replicate, dp_shard: the data-parallel processes (D = dp_replicate * dp_shard), each with
        its own rows of every global batch (`train.batch_size` stays the global batch). Every
        parameter that is not a routed expert is replicated over dp_replicate and, with
        dp_shard > 1, sharded over dp_shard by FSDP2 (`fully_shard`; gathered per block for its
        forward and backward, gradients reduce-scattered). dp_replicate=None means
        world_size // (dp_shard * tp).
    ep: expert-parallel size, taken from the D data-parallel processes: each MoE layer's routed
        experts are split over ep of them (tokens travel to their experts and back by
        all-to-all). ep must divide every MoE layer's n_experts, and either divide dp_shard (the
        experts are then sharded by FSDP2 over the dp_shard / ep processes that hold the same
        experts) or be a multiple of dp_shard that divides D (the experts are then replicated).
    tp: tensor-parallel size (`parallelize_module`): attention heads, dense FFNs and shared
        experts are split over tp processes (column-wise in, row-wise out), which see the same
        rows; routers stay replicated. With ep=1 the routed experts are split on their hidden
        dimension over tp too; with ep > 1 they are expert-parallel and every tp process runs
        its rows' experts. tp must divide n_heads, the key/value heads and every hidden width.
    sequence_parallel: with tp > 1, split the residual stream between blocks, the RMSNorms and
        their saved activations over the tp processes along the sequence (Megatron-LM's
        sequence parallelism, Korthikanti et al. 2022): each holds seq_len / tp positions, and
        the all-reduce that ends each row-wise projection becomes a reduce-scatter before the
        norm and an all-gather after it (the same bytes, in twice the calls). An MoE layer
        gathers the whole sequence, so routing and its statistics stay those of one process;
        without (ungated) shared experts that costs two all-gathers per MoE layer more than
        tp alone. train.seq_len must be a multiple of tp.
    reshard_after_forward: whether FSDP2 frees each block's gathered parameters after its
        forward (and gathers them again for the backward): less memory, more all-gathers.
    param_dtype: "float32", or "bfloat16" for FSDP2's mixed precision (parameters gathered and
        computed in bfloat16, gradients reduced in float32, float32 master weights); needs
        dp_shard > 1 or tp > 1 (the FSDP2 path).
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

    dp_replicate: int | None = None
    dp_shard: int = 1
    ep: int = 1
    tp: int = 1
    sequence_parallel: bool = False
    reshard_after_forward: bool = True
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    scope: Literal["global", "local"] = "global"
    timeout_s: float = 600.0
    backend: Literal["auto", "gloo", "nccl"] = "auto"

    @classmethod
    def from_dict(cls, data: dict) -> ParallelConfig:  # type: ignore[override]
        # Runs written before dp_shard and tp existed name the replicas "dp".
        if "dp" in data:
            data = {("dp_replicate" if k == "dp" else k): v for k, v in data.items()}
        return super().from_dict(data)

    @property
    def fully_sharded(self) -> bool:
        """Whether the run takes the FSDP2 path (fully_shard, DTensor) rather than DDP."""
        return self.dp_shard > 1 or self.tp > 1

    def min_world_size(self) -> int:
        """The fewest processes this layout runs on: dp_replicate (or, unset, the fewest replicas
        that ep's processes need) x dp_shard x tp."""
        replicate = self.dp_replicate
        if replicate is None:
            replicate = self.ep // self.dp_shard if self.ep > self.dp_shard else 1
        return replicate * self.dp_shard * self.tp

    @property
    def splits_sequence(self) -> bool:
        """Whether the residual stream is split over the tp processes (sequence parallelism)."""
        return self.sequence_parallel and self.tp > 1

    def check_seq_len(self, seq_len: int, name: str = "train.seq_len", most: int = 0) -> None:
        """Raise unless sequences of `seq_len` tokens split over tp under sequence parallelism
        (`name`: the field or argument that set the length, for the error; `most`: the longest
        the model takes, max_seq_len, if known)."""
        if self.splits_sequence and seq_len % self.tp:
            below, above = seq_len // self.tp * self.tp, -(-seq_len // self.tp) * self.tp
            fits = " or ".join(str(n) for n in (below, above) if 0 < n <= (most or n))
            rule = (
                f"must be a multiple of parallel.tp ({self.tp}) under "
                f"parallel.sequence_parallel (each tensor-parallel process holds seq_len / tp "
                f"positions between blocks): use {fits + ', or ' if fits else ''}"
                "parallel.sequence_parallel=false"
            )
            raise invalid(name, seq_len, rule)

    def sizes(self, world_size: int) -> dict[str, int]:
        """The mesh's axis sizes for `world_size` processes, checked: dp_replicate, dp_shard,
        ep, tp, and the experts' own data-parallel axes edp_replicate and edp_shard (the
        processes that hold copies of the same experts: replicas, and FSDP2 shards)."""
        if self.param_dtype != "float32" and not self.fully_sharded:
            rule = (
                "bfloat16 parameters need the FSDP2 path: set parallel.dp_shard or parallel.tp > 1"
            )
            raise invalid("parallel.param_dtype", self.param_dtype, rule)
        inner = self.dp_shard * self.tp
        if world_size % inner:
            raise invalid(
                "parallel.dp_shard * parallel.tp", inner,
                f"must divide the {world_size} processes launched",
            )  # fmt: skip
        replicate = world_size // inner if self.dp_replicate is None else self.dp_replicate
        if replicate * inner != world_size:
            raise ValueError(
                f"parallel.dp_replicate={replicate} x dp_shard={self.dp_shard} x tp={self.tp} = "
                f"{replicate * inner} processes, but {world_size} were launched; set "
                f"parallel.dp_replicate={world_size // inner} (or leave it unset) or launch "
                f"{replicate * inner}"
            )
        data = replicate * self.dp_shard
        ep = self.ep
        if self.dp_shard % ep == 0:
            edp_shard = self.dp_shard // ep
        elif ep % self.dp_shard == 0 and data % ep == 0:
            edp_shard = 1
        else:
            raise invalid("parallel.ep", ep, self._ep_rule(data))
        return {"dp_replicate": replicate, "dp_shard": self.dp_shard, "ep": ep, "tp": self.tp,
                "edp_replicate": data // (ep * edp_shard), "edp_shard": edp_shard}  # fmt: skip

    def _ep_rule(self, data: int) -> str:
        """What an ep that does not fit `data` data-parallel processes breaks, and the remedies
        that exist: the ep values that fit; for this ep, more replicas or another dp_shard."""
        ep, shard, inner = self.ep, self.dp_shard, self.dp_shard * self.tp
        fits = [n for n in range(1, data + 1) if not data % n and not (shard % n and n % shard)]
        rule = (
            f"takes its processes from the {data} data-parallel ones (dp_replicate x dp_shard): "
            f"it must divide parallel.dp_shard ({shard}), or be a multiple of it that divides "
            f"{data}; here ep can be {', '.join(map(str, fits))}, or for ep={ep} "
        )
        r = self.dp_replicate  # None: as many replicas as the processes launched make
        if ep % shard == 0:  # dp_replicate a multiple of ep / dp_shard
            unset = "" if r is None else f" (dp_replicate a multiple of {ep // shard})"
            return f"{rule}launch a multiple of {ep // shard * inner} processes{unset}"
        such = ", ".join(str(n) for n in [*range(1, ep + 1), 2 * ep] if not n % ep or (
            not ep % n and (r is None or not r * n % ep)))  # fmt: skip
        return f"{rule}make parallel.dp_shard a divisor or a multiple of {ep} (such as {such})"

    def check_model(self, model: ModelConfig) -> None:
        """Raise unless the model can be split as asked: experts over `ep`, heads and hidden
        widths over `tp`."""
        moe = model.moe
        if self.ep > 1 and moe is not None:
            if moe.n_experts % self.ep:
                rule = f"must divide model.moe.n_experts ({moe.n_experts})"
                raise invalid("parallel.ep", self.ep, rule)
            if not moe.token_choice:
                raise invalid(
                    "parallel.ep", self.ep, "expert parallelism needs a token-choice router"
                )
        if self.tp == 1:
            return
        if model.mla is not None:
            rule = "tensor parallelism splits multi-head and grouped-query attention; not MLA yet"
            raise invalid("parallel.tp", self.tp, rule)
        if model.qk_norm == "full":
            rule = (
                "qk_norm='full' normalises across every head; use tp=1 (or a qk_norm='head' model)"
            )
            raise invalid("parallel.tp", self.tp, rule)
        widths = {"model.n_heads": model.n_heads, "model.n_kv_heads": model.kv_heads}
        if model.d_ff and len(model.moe_layer_indices) < model.n_layers:
            widths["model.d_ff"] = model.d_ff
        if moe is not None:
            if moe.shared_width:
                widths["model.moe.shared_width"] = moe.shared_width
            if self.ep == 1:
                widths["model.moe.d_expert"] = moe.d_expert
        for name, width in widths.items():
            if width % self.tp:
                raise invalid("parallel.tp", self.tp, f"must divide {name} ({width})")


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
        self.parallel.check_seq_len(self.train.seq_len, most=self.model.max_seq_len)
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
        from moekit.config.presets import MODEL_PRESETS, RUN_PRESETS  # built of this class

        if name in RUN_PRESETS:
            return RUN_PRESETS[name]()
        if name not in MODEL_PRESETS:
            known = (
                f"known model presets are {', '.join(MODEL_PRESETS)}; run presets (a model with "
                f"training settings of its own) {', '.join(RUN_PRESETS)}"
            )
            raise invalid("preset", name, known)
        return cls(model=ModelConfig.preset(name))
