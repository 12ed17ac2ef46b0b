"""Readable twin of token-choice top-k routing: one token at a time, in plain Python floats.

Written from the definitions in `MoEConfig`'s docstring, independently of `topk.py`; the tests
hold the vectorised router to it.
"""

from __future__ import annotations

import math

from moekit.config import MoEConfig


def reference_logits(
    x: list[float], weight: list[list[float]], bias: list[float] | None
) -> list[float]:
    """One token's router logits: weight @ x, plus the router bias (GPT-OSS) when there is one."""
    logits = [sum(w * v for w, v in zip(row, x, strict=True)) for row in weight]
    return logits if bias is None else [v + b for v, b in zip(logits, bias, strict=True)]


def reference_scores(logits: list[float], kind: str) -> list[float]:
    """softmax or sigmoid of one token's logits."""
    if kind == "softmax":
        top = max(logits)
        exps = [math.exp(v - top) for v in logits]
        return [v / sum(exps) for v in exps]
    return [1.0 / (1.0 + math.exp(-v)) for v in logits]


def reference_allowed_experts(selection: list[float], cfg: MoEConfig) -> list[int]:
    """Experts in the token's best `topk_groups` groups (group score: sum of its best two)."""
    size = cfg.n_experts // cfg.n_groups
    groups = [selection[g * size : (g + 1) * size] for g in range(cfg.n_groups)]
    group_score = [sum(sorted(members, reverse=True)[:2]) for members in groups]
    best = sorted(range(cfg.n_groups), key=lambda g: -group_score[g])[: cfg.topk_groups]
    return [e for e in range(cfg.n_experts) if e // size in best]


def reference_route_token(
    logits: list[float], expert_bias: list[float], cfg: MoEConfig
) -> tuple[list[int], list[float]]:
    """One token's (expert ids best first, combine weights) under `cfg`."""
    scores = reference_scores(logits, cfg.score)
    selection = [s + b for s, b in zip(scores, expert_bias, strict=True)]
    allowed = reference_allowed_experts(selection, cfg)
    ids = sorted(allowed, key=lambda e: -selection[e])[: cfg.top_k]
    weights = [scores[e] for e in ids]
    if cfg.normalize:
        weights = [w / sum(weights) for w in weights]
    return ids, [w * cfg.routed_scaling for w in weights]
