"""Spawned-process harness for the distributed tests, and the work each process does.

`spawn(fn, world, *args)` starts `world` processes (spawn start method, gloo on localhost, a free
port), runs `fn(rank, world, *args)` in each with one thread, and returns each rank's return value
(saved with torch.save). A process that raises makes `spawn` raise with its traceback.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moekit.config import MoEConfig, ParallelConfig
from moekit.moe import MoELayer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, out: str, fn: Callable, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    try:
        result = fn(rank, world, *args)
        torch.save(result, Path(out) / f"rank{rank}.pt")
    except BaseException:
        (Path(out) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _context() -> Any:
    """Processes forked from a server that has imported torch and moekit once: a process starts
    in a fraction of a second instead of importing torch again."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "moekit.distributed", "moekit.model"])
    return ctx


def spawn(
    fn: Callable, world: int, *args: Any, timeout: float = 90.0, may_die: tuple[int, ...] = ()
) -> list[Any]:
    """Run fn(rank, world, *args) in `world` fresh processes; their results, by rank. The ranks
    in `may_die` may end without a result (None). The port free_port found can be taken before
    rank 0 listens on it (by another test's processes: gloo's own connections use ephemeral
    ports): then everything is stopped and started again on another port, up to 3 times."""
    for _ in range(3):
        try:
            return _spawn_once(fn, world, args, timeout, may_die)
        except _PortTaken:
            continue
    raise RuntimeError("rank 0 found its port taken 3 times in a row")


def _port_taken(out: str) -> bool:
    """Whether rank 0 failed because its port was taken (its error file says EADDRINUSE)."""
    err = Path(out, "rank0.err")
    return err.exists() and "EADDRINUSE" in err.read_text()


class _PortTaken(Exception):
    pass


def _spawn_once(
    fn: Callable, world: int, args: tuple, timeout: float, may_die: tuple[int, ...]
) -> list[Any]:
    ctx = _context()
    with tempfile.TemporaryDirectory() as out:
        port = free_port()
        procs = [
            ctx.Process(target=_entry, args=(r, world, port, out, fn, args)) for r in range(world)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        taken = False
        while any(p.is_alive() for p in procs) and time.monotonic() < deadline and not taken:
            time.sleep(0.02)
            taken = _port_taken(out)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        if taken or _port_taken(out):  # (its file may have been read half-written above)
            raise _PortTaken
        errors = {r: Path(out, f"rank{r}.err") for r in range(world)}
        failed = {r: e.read_text() for r, e in errors.items() if e.exists() and r not in may_die}
        if failed:
            raise RuntimeError("\n".join(f"rank {r} failed:\n{tb}" for r, tb in failed.items()))
        results = [Path(out, f"rank{r}.pt") for r in range(world)]
        missing = [r for r in range(world) if not results[r].exists() and r not in may_die]
        if missing:
            codes = [p.exitcode for p in procs]
            raise RuntimeError(f"ranks {missing} returned nothing (exit codes {codes})")
        return [torch.load(f, weights_only=False) if f.exists() else None for f in results]


def join(ep: int, dp: int = 1, timeout_s: float = 30.0) -> Any:
    """Join the process group of this spawned process; the meshes of ep * dp data-parallel
    processes whose experts are split over ep and copied dp times."""
    from moekit.distributed import init_distributed

    return init_distributed(
        ParallelConfig(ep=ep, dp_replicate=ep * dp, timeout_s=timeout_s, backend="gloo")
    )


def my_rows(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This process's share of a global batch (B, ...): B / world consecutive rows."""
    n = x.shape[0] // world
    return x[rank * n : (rank + 1) * n]


def layer_and_batch(overrides: dict, batch: int, seq: int) -> tuple[MoELayer, torch.Tensor]:
    """The same layer and global batch (batch, seq, d_model) in every process, with tokens far
    from routing ties (a last-bit difference between layouts cannot flip a choice)."""
    from tests.moe_cases import make_layer, tie_free_tokens

    layer = make_layer(**overrides)
    torch.manual_seed(1)
    x = tie_free_tokens(layer, batch * seq).view(batch, seq, -1)
    return layer, x


def layer_loss(y: torch.Tensor, aux: Any, target: torch.Tensor) -> torch.Tensor:
    """A loss that is a mean over the tokens it sees, plus the layer's balance losses."""
    return (y * target).sum(-1).mean() + aux.loss


AUX_FIELDS = (
    "loss",
    "balance_loss",
    "z_loss",
    "importance_loss",
    "load_loss",
    "counts",
    "routed_counts",
    "dropped_fraction",
    "max_vio",
    "entropy",
)

# Each layer configuration the equivalence tests cover (MoEConfig overrides of moe_cases.BASE).
LAYER_CASES: dict[str, dict] = {
    "dropless": dict(aux_loss_coef=0.01, z_loss_coef=0.01),
    "switch-capacity": dict(top_k=1, normalize=False, capacity_factor=1.0, aux_loss_coef=0.01),
    "capacity": dict(capacity_factor=0.75, aux_loss_coef=0.01),
    "capacity-next-best": dict(
        capacity_factor=0.5,
        overflow="next_best",
        drop_policy="probability",
        score="sigmoid",
        importance_loss_coef=0.01,
    ),
    "sigmoid-bias": dict(
        score="sigmoid", n_groups=4, topk_groups=2, routed_scaling=2.5, bias_update_rate=1e-4
    ),
    "shared-sequence": dict(
        n_shared_experts=2, shared_gate=True, aux_loss_coef=0.01, aux_loss_scope="sequence"
    ),
}
STEPS = 2  # forward/backward passes per case, each followed by the bias update
SEQS, SEQ_LEN = 4, 6  # sequences per process, tokens per sequence


def _passes(model: Any, layer: MoELayer, x: torch.Tensor, target: torch.Tensor) -> list[dict]:
    """STEPS forward/backward passes, each followed by the aux-loss-free bias update."""
    passes = []
    for _ in range(STEPS):
        layer.zero_grad()
        x = x.detach().requires_grad_()  # as inside a model: the gradient flows back through
        y, aux = model(x)
        layer_loss(y, aux, target).backward()
        layer.update_expert_bias()
        passes.append(
            {
                "y": y.detach(),
                "x_grad": x.grad,
                "aux": {f: getattr(aux, f).detach() for f in AUX_FIELDS},
                "grads": {n: p.grad.clone() for n, p in layer.named_parameters()},
                "expert_bias": layer.router.expert_bias.clone(),
            }
        )
    return passes


def layer_cases(
    rank: int, world: int, ep: int, dp: int, names: list[str], scope: str, extras: tuple = ()
) -> dict:
    """Every case of `names` expert-parallel over ep processes (dp copies each), on this
    process's share of the global batch; also the traffic each case's all-to-alls caused.
    `extras` may ask for "refused" (the errors of `refused_layers`) and "model" (`model_pass` on
    this mesh)."""
    from moekit.distributed import TRAFFIC, apply_data_parallel, apply_expert_parallel

    mesh = join(ep, dp)
    results: dict[str, Any] = {
        "refused": refused_layers(mesh) if "refused" in extras else {},
        "model": model_pass(mesh, rank, world) if "model" in extras else {},
        "dp_only": data_parallel_only(mesh, rank, world) if "dp_only" in extras else [],
    }
    for name in names:
        layer, x = layer_and_batch(LAYER_CASES[name], batch=SEQS * world, seq=SEQ_LEN)
        target = torch.randn_like(x)
        apply_expert_parallel(layer, mesh, scope=scope)
        model = apply_data_parallel(layer)
        TRAFFIC.reset()
        passes = _passes(model, layer, my_rows(x, rank, world), my_rows(target, rank, world))
        results[name] = {
            "passes": passes,
            "first_expert": layer.dispatcher.first_expert,
            "traffic": (TRAFFIC.bytes_sent, TRAFFIC.calls),
        }
    return results


def reference_case(name: str, world: int) -> list[dict]:
    """`layer_cases` for one case in this process, on the whole global batch."""
    layer, x = layer_and_batch(LAYER_CASES[name], batch=SEQS * world, seq=SEQ_LEN)
    target = torch.randn_like(x)
    return _passes(layer, layer, x, target)


def reference_case_per_process(name: str, world: int) -> list[list[dict]]:
    """`layer_cases` for one case as `world` separate single processes, each on its own share
    (what scope="local" means for capacity: GShard's per-group capacity)."""
    out = []
    for rank in range(world):
        layer, x = layer_and_batch(LAYER_CASES[name], batch=SEQS * world, seq=SEQ_LEN)
        target = torch.randn_like(x)
        out.append(_passes(layer, layer, my_rows(x, rank, world), my_rows(target, rank, world)))
    return out


def refused_layers(mesh: Any) -> dict[str, str]:
    """The error each layer that cannot be made expert-parallel over 4 processes raises."""
    from moekit.distributed import apply_expert_parallel

    errors = {}
    candidates = {
        "indivisible": lambda: MoELayer(MoEConfig(d_model=8, d_expert=8, n_experts=6)),
        "expert-choice": lambda: MoELayer(
            MoEConfig(d_model=8, d_expert=8, n_experts=8, router="expert_choice", capacity_factor=1)
        ),
        "twice": lambda: apply_expert_parallel(
            MoELayer(MoEConfig(d_model=8, d_expert=8, n_experts=8)), mesh
        ),
    }
    for name, make in candidates.items():
        try:
            apply_expert_parallel(make(), mesh)
        except ValueError as err:
            errors[name] = str(err)
    return errors


def train_worker(rank: int, world: int, cfg_json: str, run_dir: str, fault: tuple) -> dict:
    """`moekit.distributed.train_distributed` on this process, with an optional fault:
    ("kill", rank, step): that rank is killed (SIGKILL) as it starts optimizer step `step`;
    ("hang", rank, step, seconds): that rank stops answering for `seconds` at that step;
    ("lr", rank, lr): that rank was started with another learning rate.
    Returns how `train` ended here: its final loss, or the DistributedFailure's message and how
    long after the start it came."""
    import signal

    from moekit.config import RunConfig
    from moekit.distributed import DistributedFailure
    from moekit.distributed.trainer import train_distributed
    from moekit.train.loop import Trainer

    cfg = RunConfig.from_json(cfg_json)
    kind, target = fault[:2] if fault else (None, None)
    if kind == "lr" and rank == target:
        cfg = cfg.replace(train=cfg.train.replace(lr=fault[2]))
    if kind in ("kill", "hang") and rank == target:
        original = Trainer._train_step

        def faulty_step(self: Trainer) -> Any:
            if self.step + 1 == fault[2]:
                if kind == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(fault[3])
                os._exit(0)
            return original(self)

        Trainer._train_step = faulty_step  # type: ignore[method-assign]
    start = time.monotonic()
    try:
        result = train_distributed(cfg, run_dir)
    except DistributedFailure as err:
        return {"error": str(err), "seconds": time.monotonic() - start}
    return {"loss": result.train_loss, "seconds": time.monotonic() - start}


def tiny_model_and_batch() -> tuple[Any, torch.Tensor]:
    """The tiny MoETransformer (vocabulary 64) and a global batch of 8 sequences of 16 ids."""
    from moekit.config import ModelConfig
    from moekit.model import MoETransformer

    torch.manual_seed(0)
    model = MoETransformer(ModelConfig.preset("tiny").replace(vocab_size=64))
    return model, torch.randint(0, 64, (8, 16))


def model_pass(mesh: Any, rank: int, world: int) -> dict:
    """One training forward/backward of the tiny model, expert-parallel and data-parallel on
    `mesh`, on this process's share: logits, losses, gradients, global gradient norm."""
    from moekit.distributed import apply_data_parallel, apply_expert_parallel, clip_grad_norm_

    model, ids = tiny_model_and_batch()
    apply_expert_parallel(model, mesh)
    ddp = apply_data_parallel(model)
    mine = my_rows(ids, rank, world)
    out = ddp(mine, labels=mine)
    out.loss.backward()
    return {
        "logits": out.logits.detach(),
        "loss": out.loss.detach(),
        "aux_loss": out.aux_loss.detach(),
        "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
        "grad_norm": clip_grad_norm_(ddp, float("inf")),
    }


def reference_model_pass() -> dict:
    """`model_pass` in one process on the whole batch."""
    model, ids = tiny_model_and_batch()
    out = model(ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
    return {
        "logits": out.logits.detach(),
        "loss": out.loss.detach(),
        "aux_loss": out.aux_loss.detach(),
        "grads": grads,
        "grad_norm": norm,
    }


DP_ONLY_CASE = dict()  # dropless, no balance loss: each token's result is its own


def data_parallel_only(mesh: Any, rank: int, world: int) -> list[dict]:
    """A layer that is not expert-parallel (every process holds every expert), under
    `apply_data_parallel(layer, mesh)` alone, on this process's share."""
    from moekit.distributed import apply_data_parallel

    layer, x = layer_and_batch(DP_ONLY_CASE, batch=SEQS * world, seq=SEQ_LEN)
    target = torch.randn_like(x)
    model = apply_data_parallel(layer, mesh)
    return _passes(model, layer, my_rows(x, rank, world), my_rows(target, rank, world))


def all_reduce_ranks(rank: int, world: int) -> int:
    """The sum of the ranks, over a gloo group joined at MASTER_ADDR:MASTER_PORT."""
    dist.init_process_group("gloo", rank=rank, world_size=world)
    total = torch.tensor([rank])
    dist.all_reduce(total)
    return int(total)
