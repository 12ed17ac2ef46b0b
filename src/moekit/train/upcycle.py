"""Sparse upcycling (Komatsuzaki et al. 2022): a dense checkpoint becomes an MoE whose experts
start as copies of the dense FFN and whose router starts near zero.

With normalize=True the top-k weights of a token sum to 1, so copies give exactly the dense FFN's
output: the upcycled model starts at the dense model's loss and training continues from there.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moekit.config import ModelConfig, MoEConfig, RunConfig
from moekit.fileio import check_new_path
from moekit.model import MoETransformer
from moekit.train.checkpoint import refuse_quantized, write_new_run
from moekit.train.sample import find_run, load_run

ROUTER_STD = 1e-3  # a near-uniform router at the start: every expert is the same function anyway


def upcycle_config(dense: ModelConfig, n_experts: int, top_k: int) -> ModelConfig:
    """The MoE config of an upcycled dense model: every layer's FFN becomes E experts of d_ff."""
    if dense.moe is not None or dense.d_ff is None:
        raise ValueError("upcycling needs a dense model (model.moe=None with d_ff set)")
    moe = MoEConfig(
        d_model=dense.d_model, d_expert=dense.d_ff, n_experts=n_experts, top_k=top_k,
        normalize=True, aux_loss_coef=0.01,
    )  # fmt: skip
    return dense.replace(moe=moe, moe_layers="all", first_dense=0)


@torch.no_grad()
def upcycle_model(
    dense: MoETransformer, cfg: ModelConfig, noise: float = 0.0, seed: int = 0
) -> MoETransformer:
    """An MoE model with the dense model's weights; experts are copies of each layer's FFN, plus
    Gaussian noise of `noise` times each weight matrix's std (0: exact copies)."""
    moe = MoETransformer(cfg)
    moe.init_weights()
    rest = {k: v for k, v in dense.state_dict().items() if ".ffn." not in k}
    missing = moe.load_state_dict(rest, strict=False).unexpected_keys
    assert not missing, missing
    gen = torch.Generator().manual_seed(seed)
    for block, dense_block in zip(moe.layers, dense.layers, strict=True):
        ffn = dense_block.ffn
        w_in = torch.cat([ffn.w_gate.weight, ffn.w_up.weight])
        block.ffn.experts.w_in.copy_(_copies(w_in, cfg.moe.n_experts, noise, gen))
        block.ffn.experts.w_out.copy_(_copies(ffn.w_down.weight, cfg.moe.n_experts, noise, gen))
        block.ffn.router.init_weights(ROUTER_STD)
    return moe


def _copies(w: torch.Tensor, n: int, noise: float, gen: torch.Generator) -> torch.Tensor:
    out = w.expand(n, *w.shape).clone()
    if noise:
        out += noise * w.std() * torch.randn(out.shape, generator=gen, dtype=out.dtype)
        if not torch.isfinite(out).all():  # before anything is written
            raise ValueError(
                f"noise={noise:g} makes expert weights that are not finite numbers in "
                f"{out.dtype}: give a noise of about 0.01 (a copy's spread, in weight stds)"
            )
    return out


def upcycle_run(
    dense_dir: str | Path, out_dir: str | Path, n_experts: int, top_k: int, noise: float = 0.0
) -> Path:
    """Write a run directory holding the upcycled model as its step-0 checkpoint, with the dense
    run's data and training settings: `moekit train --resume OUT_DIR` trains it."""
    check_new_path(out_dir, "choose a new --out for the upcycled run")
    refuse_quantized(find_run(dense_dir)[1])  # before its weights are read
    run, dense, checkpoint = load_run(dense_dir)  # (dense_dir: the run, or one checkpoint of it)
    cfg = RunConfig(model=upcycle_config(run.model, n_experts, top_k), train=run.train)
    model = upcycle_model(dense, cfg.model, noise, seed=run.train.seed)
    return write_new_run(Path(out_dir), cfg, model, checkpoint.parent.parent / "tokenizer.json")
