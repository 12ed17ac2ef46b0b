"""The training loop: `train(cfg, run_dir)` trains a model from a `RunConfig` and writes the run
directory (config.json, tokenizer.json, metrics.jsonl, checkpoints/, report.md and plots)."""

from __future__ import annotations

import math
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from moekit.config import RunConfig
from moekit.data import Data, WindowSampler, fixed_batches, prepare_data
from moekit.data.tokenizer import copy_chat_files
from moekit.fileio import atomic_path, atomic_write_text, make_dirs
from moekit.losses import sum_dtype
from moekit.model import ModelOutput, MoETransformer
from moekit.train.checkpoint import (
    TrainerState,
    latest_checkpoint,
    load_weights,
    read_training_state,
    restoring,
    save_checkpoint,
)
from moekit.train.device import training_device
from moekit.train.freeze import freeze, optimizer_state_to_restore, trainable_table
from moekit.train.init_from import init_source, initialize_from, tokenizer_dir
from moekit.train.interrupt import StopOnInterrupt
from moekit.train.metrics import Interval, LayerFigures, MetricsLog, add_layers
from moekit.train.optim import build_optimizer, lr_at, set_lr
from moekit.train.report import write_report
from moekit.train.run_dir import check_run_dir, with_run_tokenizer
from moekit.train.world import Parallelism, World, wants_processes

EVAL_SEED = 1234  # the validation windows: the same in every evaluation and every run


class TrainingDiverged(RuntimeError):
    """The loss or the gradient became NaN or infinite; no update was applied for that step."""


@dataclass
class TrainResult:
    """How a call to `train` ended."""

    run_dir: Path
    step: int
    train_loss: float | None
    val_loss: float | None
    val_bpb: float | None
    tokens_per_s: float
    seconds: float
    checkpoint: Path | None
    interrupted: bool


def forward(model: torch.nn.Module, batch: Tensor, autocast: AbstractContextManager) -> ModelOutput:
    """One forward pass of a batch (B, S) read as both input ids and labels."""
    with autocast:
        return model(batch, labels=batch)


def train(
    cfg: RunConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    world: World | None = None,
    parallelism: Parallelism | None = None,
) -> TrainResult:
    """Train `cfg.model` as `cfg.train` says, writing the run into `run_dir`.

    With `resume`, continue from the newest checkpoint of `run_dir`: the losses of the remaining
    steps are exactly those of an uninterrupted run. Ctrl-C finishes the current step, saves a
    checkpoint and returns (a second Ctrl-C aborts at once). A non-finite loss raises
    `TrainingDiverged` naming the step; the checkpoints already written are kept.
    One process by default; `moekit.distributed.trainer.train_distributed`, which every process
    of a torchrun launch calls (`moekit train` does), passes the `world` and `parallelism`.
    """
    world = world or World()
    p = cfg.parallel
    if world.size == 1 and wants_processes(cfg):
        raise ValueError(
            f"parallel.ep={p.ep}, dp_replicate={p.dp_replicate}, dp_shard={p.dp_shard}, "
            f"tp={p.tp} (or a torchrun launch) needs several processes: train with "
            "`moekit train` under torchrun, or call "
            "moekit.distributed.trainer.train_distributed on every process of the launch"
        )
    trainer = Trainer(cfg, Path(run_dir), resume, world, parallelism)
    try:
        result = trainer.run()
    finally:
        trainer.close()
    if world.is_writer:
        write_report(trainer.run_dir, trainer.cfg, trainer.whole_model())
    return result


class Trainer:
    """The state of one training run; `run()` trains until the last step or a Ctrl-C. On several
    processes every process runs it; `world` and `parallelism` say how they share the work."""

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: Path,
        resume: bool,
        world: World | None = None,
        parallelism: Parallelism | None = None,
    ) -> None:
        t = cfg.train
        self.world, self.parallelism = world or World(), parallelism or Parallelism()
        self.cfg, self.run_dir = cfg, run_dir
        self.device = training_device(t.device)  # before anything is read or written
        self.talks = t.progress and self.world.is_writer
        if t.threads is not None:
            torch.set_num_threads(t.threads)
        checkpoint = check_run_dir(run_dir, resume, t.steps, tokenizer=t.data.tokenizer)
        fresh = checkpoint is None and t.init_from is not None
        source = init_source(t.init_from, cfg.model) if fresh else None  # before the data
        self.tokenizer_dir = tokenizer_dir(run_dir, t.data.tokenizer, source)
        cfg, self.keeps_tokenizer = with_run_tokenizer(run_dir, cfg, checkpoint is not None)
        self.cfg, t = cfg, cfg.train
        self.data = self._prepare_data()
        torch.manual_seed(t.seed)
        self.model = MoETransformer(cfg.model)
        if source is not None:
            self._say(initialize_from(source, self.model, self.data.tokenizer))
        self.model.to(self.device)
        if t.freeze:
            freeze(self.model, t.freeze)
            self._say(f"frozen: {', '.join(t.freeze)}\n{trainable_table(self.model)}")
        self.sampler = WindowSampler(self.data.train.tokens, t.batch_size, t.seq_len, t.seed)
        self.step, self.tokens, self.saved_step = 0, 0, None
        restored = self._restore(checkpoint) if checkpoint is not None else None
        # Parallelism is applied to the built (and restored) model, then the optimizer is built
        # over what this process holds.
        self.forward_model = self.parallelism.apply(self.model, t.grad_accum)
        if t.compile:
            self.forward_model = torch.compile(self.forward_model)
        self.optimizer = build_optimizer(self.model, t)
        if restored is not None:
            with restoring(checkpoint, "trainer.json", "optimizer state (with state.safetensors)"):
                shard = self.parallelism.shard_optimizer_state(restored, self.optimizer, self.model)
                self.optimizer.load_state_dict(shard)
        eval_bs = t.eval.batch_size or t.batch_size
        fixed = fixed_batches(self.data.val.tokens, t.eval.batches, eval_bs, t.seq_len, EVAL_SEED)
        self.eval_batches = [self.parallelism.my_share(b) for b in fixed]
        self.autocast = torch.autocast(self.device.type, torch.bfloat16, enabled=t.bf16)
        self.last_eval: dict[str, float] = {}
        self.last_train: dict[str, Any] = {}
        self.session_seconds, self.session_tokens = 0.0, 0
        self.interval = Interval()
        self._open_run_files(resume)

    def _open_run_files(self, resume: bool) -> None:
        """Open metrics.jsonl (a resumed run keeps its records to its step); write config.json
        and tokenizer.json. Only now, once the data, the model and a resumed checkpoint have been
        read whole: a failure before leaves the run directory as it was (a new one unmade). Only
        the writer's process writes them."""
        if not self.world.is_writer:
            self.metrics: MetricsLog | None = None
            return
        make_dirs(self.run_dir)  # only now: a run refused earlier leaves no folder behind
        read_here = self.cfg.train.data.tokenizer == "run" and self.tokenizer_dir == self.run_dir
        if not (read_here or self.keeps_tokenizer):
            with atomic_path(self.run_dir / "tokenizer.json") as tmp:
                self.data.tokenizer.save(str(tmp))
            if self.tokenizer_dir != self.run_dir:  # init_from's run's: its chat files too
                copy_chat_files(self.tokenizer_dir, self.run_dir)
        self.metrics = MetricsLog(
            self.run_dir, self.step if resume else None, self.cfg.train.tensorboard
        )
        atomic_write_text(self.run_dir / "config.json", self.cfg.to_json() + "\n")

    def _prepare_data(self) -> Data:
        """The writer tokenises (and caches) first; the others then read its cache."""
        if self.world.is_writer:
            data = self._read_data()
        self.world.barrier()
        if not self.world.is_writer:
            data = self._read_data()
        return data

    def _read_data(self) -> Data:
        t = self.cfg.train
        self._say(f"preparing data: {t.data.source} ({t.data.tokenizer} tokenizer)")
        data_cfg = t.data
        if self.keeps_tokenizer:  # the run's own tokenizer.json
            data_cfg = t.data.replace(tokenizer="run", vocab_size=None)
        data = prepare_data(data_cfg, self.cfg.token_vocab_size, self.talks, self.tokenizer_dir)
        if data.tokenizer.get_vocab_size() > self.cfg.model.vocab_size:
            raise ValueError(
                f"model.vocab_size={self.cfg.model.vocab_size} is too small for the tokenizer's "
                f"{data.tokenizer.get_vocab_size()} tokens"
            )
        self._say(
            f"data: {data.n_train_files} train files ({data.train.n_tokens:,} tokens), "
            f"{data.n_val_files} validation files ({data.val.n_tokens:,} tokens), "
            f"{data.val.bytes_per_token:.2f} bytes/token"
        )
        return data

    def _restore(self, checkpoint: Path) -> dict[str, Any] | None:
        """Weights, RNG, sampler and step from `checkpoint`; returns its optimizer state (of the
        whole model; None before any step), loaded once the optimizer is built."""
        load_weights(checkpoint, self.model)
        state, optimizer_sd = read_training_state(checkpoint)
        with restoring(checkpoint, "state.safetensors", "RNG or sampler state"):
            self.sampler.load_state_dict(state.sampler)
            torch.set_rng_state(state.torch_rng)
        if state.cuda_rng is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(state.cuda_rng)
        self.step, self.tokens, self.saved_step = state.step, state.tokens, state.step
        self._say(f"resumed from {checkpoint} (step {self.step})")
        freeze = self.cfg.train.freeze
        return optimizer_state_to_restore(self.run_dir, freeze, optimizer_sd, self.step)

    def run(self) -> TrainResult:
        """Train until the last step, or until Ctrl-C; then `finish()`."""
        t = self.cfg.train
        start = time.perf_counter()
        bar = tqdm(total=t.steps, initial=self.step, unit="step", disable=not self.talks)
        with bar, StopOnInterrupt(self._say) as stop:
            while not self.done and not stop.requested:
                seconds = self.advance()
                _show_progress(bar, seconds, self.tokens_per_step, self.last_train)
            self.finish()
        rate = self.session_tokens / self.session_seconds if self.session_seconds else 0.0
        return TrainResult(
            run_dir=self.run_dir,
            step=self.step,
            train_loss=self.last_train.get("loss"),
            val_loss=self.last_eval.get("val_loss"),
            val_bpb=self.last_eval.get("val_bpb"),
            tokens_per_s=rate,
            seconds=time.perf_counter() - start,
            checkpoint=latest_checkpoint(self.run_dir),
            interrupted=stop.requested,
        )

    @property
    def done(self) -> bool:
        return self.step >= self.cfg.train.steps

    def advance(self) -> float:
        """One optimizer step, then the logging, evaluation and checkpoint that are due; returns
        the step's duration in seconds."""
        t = self.cfg.train
        begin = time.perf_counter()
        figures_F, layers = self._train_step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - begin
        self.step += 1
        self.tokens += self.tokens_per_step
        self.interval.add(figures_F, layers, seconds, self.tokens_per_step)
        if self.step % t.log_every == 0 or self.done:
            self._log()
        if self.done or (t.eval.every and self.step % t.eval.every == 0):
            self._evaluate()
        if self.done or (t.checkpoint.every and self.step % t.checkpoint.every == 0):
            self._save()
        return seconds

    def finish(self) -> None:
        """Log the steps not yet logged and save a checkpoint unless this step has one."""
        if self.interval.steps:
            self._log()
        if self.saved_step != self.step:
            self._save()

    def _log(self) -> None:
        """Write the current interval's record and start a new interval."""
        lr = self.optimizer.param_groups[0]["lr"]
        self.last_train = self.interval.record(self.step, lr, self.tokens)
        self._write(self.last_train)
        self.session_seconds += self.interval.seconds
        self.session_tokens += self.interval.tokens
        self.interval = Interval()

    def _write(self, record: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.write(record)

    @property
    def tokens_per_step(self) -> int:
        t = self.cfg.train
        return t.batch_size * t.seq_len * t.grad_accum

    def _train_step(self) -> tuple[Tensor, list[LayerFigures]]:
        """Accumulate gradients over grad_accum micro-batches, clip, step, update expert biases.
        Returns the step's figures (`Interval.add`), on the device: the one host sync is the
        finiteness check."""
        t = self.cfg.train
        self.parallelism.before_step(t.seed, self.step)
        self.optimizer.zero_grad(set_to_none=True)
        losses_L, layers = None, []
        for _ in range(t.grad_accum):
            batch = self.parallelism.my_share(self.sampler.next_batch()).to(self.device)
            out = forward(self.forward_model, batch, self.autocast)
            assert out.loss is not None and out.lm_loss is not None
            (out.loss / t.grad_accum).backward()
            losses = torch.stack([out.loss, out.lm_loss, out.aux_loss, *out.mtp_losses]).detach()
            mine = losses.to(sum_dtype(losses.device)) / t.grad_accum
            losses_L = mine if losses_L is None else losses_L + mine
            layers = add_layers(layers, [LayerFigures.from_aux(aux) for aux in out.aux])
        assert losses_L is not None
        losses_L = self.world.all_reduce_mean(losses_L)
        clip = t.grad_clip if t.grad_clip is not None else math.inf
        grad_norm = self.parallelism.clip_grad_norm_(self.model, clip)
        self._check_finite(losses_L[0], grad_norm)
        set_lr(self.optimizer, lr_at(self.step, t))
        self.optimizer.step()
        self.model.update_expert_bias()
        return torch.cat([losses_L, grad_norm.reshape(1).to(losses_L.dtype)]), layers

    def _check_finite(self, loss: Tensor, grad_norm: Tensor) -> None:
        """Stop before the update when the loss or the gradient is not finite (one host sync per
        step: the promise that a bad step is never applied needs it)."""
        if bool(torch.isfinite(torch.stack([loss.float(), grad_norm.float()])).all()):
            return
        what = (
            f"the loss is {float(loss)}"
            if not math.isfinite(float(loss))
            else f"the gradient norm is {float(grad_norm)}"
        )
        ckpt = latest_checkpoint(self.run_dir)
        kept = f"the last good checkpoint is {ckpt}" if ckpt else "no checkpoint had been saved yet"
        raise TrainingDiverged(
            f"training stopped at step {self.step + 1}: {what}; that step was not applied and "
            f"{kept}. Try a lower train.lr, a smaller train.grad_clip, or train.bf16=false."
        )

    @torch.no_grad()
    def _evaluate(self) -> None:
        self.model.eval()
        try:
            losses = [
                float(forward(self.forward_model, b.to(self.device), self.autocast).lm_loss)
                for b in self.eval_batches
            ]
        finally:
            self.model.train()
        mean = torch.tensor([sum(losses) / len(losses)], dtype=torch.float64)
        loss = float(self.world.all_reduce_mean(mean)[0])
        bpb = loss / math.log(2) / self.data.val.bytes_per_token
        self.last_eval = {"val_loss": loss, "val_bpb": bpb}
        self._write({"kind": "eval", "step": self.step, **self.last_eval})

    def _save(self) -> None:
        """The whole model's checkpoint, written by the writer; every process waits for it."""
        model_sd, optimizer_sd = self.parallelism.full_state_dicts(self.model, self.optimizer)
        if self.world.is_writer:
            assert model_sd is not None and optimizer_sd is not None
            cuda_rng = torch.cuda.get_rng_state() if self.device.type == "cuda" else None
            state = TrainerState(
                self.step, self.tokens, self.sampler.state_dict(), torch.get_rng_state(), cuda_rng
            )
            keep = self.cfg.train.checkpoint.keep
            save_checkpoint(self.run_dir, model_sd, optimizer_sd, state, keep)
        self.world.barrier()
        self.saved_step = self.step

    def whole_model(self) -> MoETransformer:
        """The model whose parameters the report counts: on several processes, the whole one
        built on the meta device (this process holds a share of the experts)."""
        if self.world.size == 1:
            return self.model
        with torch.device("meta"):
            return MoETransformer(self.cfg.model)

    def _say(self, message: str) -> None:
        if self.talks:
            tqdm.write(message)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()


def _show_progress(bar: tqdm, seconds: float, tokens: int, record: dict[str, Any]) -> None:
    """tokens/s of this step; loss, the first MTP depth's loss and the worst layer's MaxVio of
    the last logged interval."""
    postfix = {"tok/s": f"{tokens / seconds:,.0f}"}
    if record:
        postfix["loss"] = f"{record['loss']:.3f}"
        if "mtp_loss_1" in record:
            postfix["mtp"] = f"{record['mtp_loss_1']:.3f}"
        if record["layers"]:
            postfix["maxvio"] = f"{max(layer['max_vio'] for layer in record['layers']):.2f}"
    bar.set_postfix(postfix, refresh=False)
    bar.update(1)
