"""The experiments of `moekit experiment NAME`: arms as config overrides of one base run, and the
paper's prediction each one checks.

Sizes are relative to the base run's MoE layer (E experts of width F, top-k): the arms of an
experiment keep the active expert width k * F per token equal unless the experiment varies it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from moekit.config import RunConfig

Arm = tuple[str, list[str]]  # (name, "--a.b=value" overrides of the base run)
Check = tuple[str, str, str]  # (metric, arm the paper expects lower on it, arm expected higher)


@dataclass(frozen=True)
class Experiment:
    """Arms, the paper's prediction, and the checks of its direction: for each (metric, better,
    worse), the paper expects metric(better) < metric(worse); metrics are the report's columns.
    `steps`: train.steps of each arm at the default base run (`RunConfig.preset("experiment")`):
    about 20 tokens per active parameter, in 9-12 minutes on 2 idle CPU cores with the arms side
    by side (estimated from the arms' CPU time: benchmarks/README.md)."""

    name: str
    prediction: str
    arms: Callable[[RunConfig], list[Arm]]
    checks: tuple[Check, ...]
    steps: int = 2600
    curve: str | None = None  # a per-step figure worth its own plot (runner.CURVES)
    settings: tuple[str, ...] = ()  # overrides of the base for every arm, before the user's
    columns: tuple[str, ...] = ()  # report columns of this experiment's own (runner.COLUMNS too)


def _moe(base: RunConfig) -> tuple[int, int, int]:
    moe = base.model.moe
    if moe is None:
        raise ValueError("experiments need a base run with an MoE model (model.moe set)")
    return moe.n_experts, moe.top_k, moe.d_expert


def moe_vs_dense(base: RunConfig) -> list[Arm]:
    """Equal active expert width A = k * F: dense d_ff = A, hash (Roller 2021) and Switch top-1
    of width A, top-2 of A / 2, fine-grained (2E experts of A / 4, top-3, one shared of A / 4:
    DeepSeekMoE)."""
    e, k, f = _moe(base)
    a = k * f
    m = "--model.moe."
    return [
        ("dense", ["--model.moe=null", f"--model.d_ff={a}"]),
        ("hash", [f"{m}router=hash", f"{m}top_k=1", f"{m}d_expert={a}"]),
        ("switch-top1", [f"{m}top_k=1", f"{m}d_expert={a}", f"{m}normalize=false"]),
        ("top2", [f"{m}top_k=2", f"{m}d_expert={a // 2}"]),
        ("fine-grained+shared", [f"{m}n_experts={2 * e}", f"{m}top_k=3", f"{m}d_expert={a // 4}",
                                 f"{m}n_shared_experts=1", f"{m}d_shared={a // 4}"]),
    ]  # fmt: skip


def balance(base: RunConfig) -> list[Arm]:
    m = "--model.moe."
    return [
        ("no-balancing", [f"{m}aux_loss_coef=0", f"{m}bias_update_rate=0"]),
        ("aux-1e-2", [f"{m}aux_loss_coef=0.01", f"{m}bias_update_rate=0"]),
        ("aux-1e-3", [f"{m}aux_loss_coef=0.001", f"{m}bias_update_rate=0"]),
        ("aux-loss-free", [f"{m}aux_loss_coef=0", f"{m}bias_update_rate=0.001"]),
    ]


def granularity(base: RunConfig) -> list[Arm]:
    """(E, k, F) = (8, 1, 4F0), (16, 2, 2F0), (32, 4, F0), and (32, 3, F0) + one shared F0; with
    F0 a quarter of the base's active width k * F (equal active compute). Top-1 weighs its expert
    by the router probability (Switch): renormalised, its weight would always be 1 and the router
    would learn from the balance loss only."""
    _, k, f = _moe(base)
    f0 = max(k * f // 4, 1)
    m = "--model.moe."
    arms = [(8, 1, 4 * f0), (16, 2, 2 * f0), (32, 4, f0)]
    out = [(f"E{e}-k{kk}", [f"{m}n_experts={e}", f"{m}top_k={kk}", f"{m}d_expert={ff}",
                            *([f"{m}normalize=false"] if kk == 1 else [])])
           for e, kk, ff in arms]  # fmt: skip
    shared = [f"{m}n_experts=32", f"{m}top_k=3", f"{m}d_expert={f0}", f"{m}n_shared_experts=1"]
    return [*out, ("E32-k3+shared", [*shared, f"{m}d_shared={f0}"])]


def z_loss(base: RunConfig) -> list[Arm]:
    lr = base.train.lr
    m = "--model.moe.z_loss_coef"
    return [(f"{name}-lr{scale}x", [f"{m}={coef}", f"--train.lr={lr * scale}"])
            for scale in (1, 4) for name, coef in (("no-z", 0), ("z-1e-3", 0.001))]  # fmt: skip


def capacity(base: RunConfig) -> list[Arm]:
    m = "--model.moe.capacity_factor"
    arms = [(f"cf-{c}", [f"{m}={c}"]) for c in (0.5, 1.0, 1.25, 2.0)]
    return [*arms, ("dropless", [f"{m}=null"])]


def mtp(base: RunConfig) -> list[Arm]:
    """DeepSeek-V3's multi-token prediction, one depth, at lambda 0.3 (V3's first 10T tokens)
    and 0.1 (its last 4.8T), against the base without it; equal steps."""
    d, w = "--model.mtp_depth", "--model.mtp_loss_weight"
    return [("no-mtp", [f"{d}=0"]), ("mtp-0.3", [f"{d}=1", f"{w}=0.3"]),
            ("mtp-0.1", [f"{d}=1", f"{w}=0.1"])]  # fmt: skip


EXPERIMENTS = {
    e.name: e
    for e in [
        Experiment("moe-vs-dense", "At equal active parameters an MoE reaches a lower loss than "
                   "the dense model (Switch, Fedus 2021; DeepSeekMoE: finer experts + a shared "
                   "expert lower it further); hash routing is competitive but below a learned "
                   "router (Roller 2021).", moe_vs_dense,
                   (("val_loss", "top2", "dense"), ("val_loss", "switch-top1", "dense"),
                    ("val_loss", "hash", "dense"), ("val_loss", "switch-top1", "hash"),
                    ("val_loss", "fine-grained+shared", "top2"))),
        Experiment("balance", "Without balancing, routing collapses (high MaxVio, dead experts); "
                   "a 1e-2 aux loss balances at a small loss cost; the aux-loss-free bias balances "
                   "without it (Wang 2024).", balance,
                   (("max_vio", "aux-1e-2", "no-balancing"),
                    ("max_vio", "aux-1e-3", "no-balancing"),
                    ("max_vio", "aux-loss-free", "no-balancing"),
                    ("val_loss", "no-balancing", "aux-1e-2"),
                    ("val_loss", "aux-loss-free", "aux-1e-2")), curve="max_vio"),
        Experiment("granularity", "Finer experts (more, smaller, higher k) lower the loss at equal "
                   "active compute (DeepSeekMoE; Krajewski 2024).", granularity,
                   (("val_loss", "E32-k4", "E8-k1"), ("val_loss", "E16-k2", "E8-k1"),
                    ("val_loss", "E32-k4", "E16-k2"), ("val_loss", "E32-k3+shared", "E32-k4"),
                    ("loss_at_equal_time", "E32-k4", "E8-k1"))),
        Experiment("z-loss", "The router z-loss keeps router logits small and makes training at a "
                   "high learning rate stabler (ST-MoE, Zoph 2022).", z_loss,
                   (("logit_rms", "z-1e-3-lr1x", "no-z-lr1x"),
                    ("logit_rms", "z-1e-3-lr4x", "no-z-lr4x"),
                    ("spikes", "z-1e-3-lr4x", "no-z-lr4x"),
                    ("val_loss", "z-1e-3-lr4x", "no-z-lr4x")),
                   curve="logit_rms",
                   # a checkpoint every 200 steps: the logit RMS curve is measured on each
                   settings=("--train.checkpoint.every=200", "--train.checkpoint.keep=1000")),
        Experiment("capacity", "Lower capacity drops more tokens and raises the loss; dropless "
                   "matches or beats capacity 2.0 (GShard, Switch, MegaBlocks).", capacity,
                   (("dropped_fraction", "cf-1.0", "cf-0.5"), ("val_loss", "cf-1.0", "cf-0.5"),
                    ("val_loss", "cf-2.0", "cf-1.0"), ("val_loss", "dropless", "cf-0.5"),
                    ("val_loss", "dropless", "cf-2.0")), curve="dropped_fraction"),
        Experiment("mtp", "Training with multi-token prediction lowers the main model's loss "
                   "at equal steps (DeepSeek-V3 2.2 and its ablation; at small scale the "
                   "literature finds the effect small or negative: Gloeckle 2024); a heavier MTP "
                   "loss trains a more accurate head, whose drafts are accepted more often at "
                   "decode.", mtp,
                   (("val_loss", "mtp-0.3", "no-mtp"), ("val_loss", "mtp-0.1", "no-mtp"),
                    ("mtp_error", "mtp-0.3", "mtp-0.1"),
                    ("mtp_rejection", "mtp-0.3", "mtp-0.1")),
                   columns=("mtp_accuracy", "mtp_acceptance")),
    ]
}  # fmt: skip
