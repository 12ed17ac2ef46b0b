"""AdamW with decay only where it regularises, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from moekit.config import TrainConfig


def is_decayed(name: str, param: nn.Parameter) -> bool:
    """Weight decay applies to matrices of the attention and FFNs/experts only: not to norms and
    biases (vectors), the token embedding (and a head tied to it), or the routers, whose logits'
    scale sets how sharply tokens are routed."""
    if param.dim() < 2 or "router" in name.split("."):
        return False
    return not name.startswith("embed.")


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the model's trainable parameters in two groups: decayed and not decayed.

    The fused implementation (one kernel over all parameters) where every parameter is a float
    tensor on a device it supports: on 2 CPU cores it steps `small`'s 14.7M parameters in 50 ms
    against 66 ms for the default per-parameter loop."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in params if is_decayed(n, p)], "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in params if not is_decayed(n, p)], "weight_decay": 0.0},
    ]
    fused = all(p.is_floating_point() and p.device.type in FUSED_DEVICES for _, p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)


FUSED_DEVICES = ("cpu", "cuda")  # where torch has a fused AdamW kernel


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup over warmup_steps to lr,
    then cosine decay to lr * min_lr_ratio at the last step (Loshchilov & Hutter 2017)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(cfg.steps - 1 - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / decay_steps, 1.0)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
