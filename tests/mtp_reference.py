"""A readable twin of multi-token prediction, written from the DeepSeek-V3 paper's formulas
(arXiv 2412.19437, section 2.2), token by token where the module works on shifted rows:

    h'_i^k = M_k [RMSNorm(Emb(t_{i+k})) ; RMSNorm(h_i^{k-1})]      i = 1 .. T - k
    h^k_{1:T-k} = TRM_k(h'^k_{1:T-k})
    P^k_{i+k+1} = OutHead(RMSNorm(h^k_i))
    L^k = -1/(T-k-1) sum_{i: i+k+1 <= T} log P^k_{i+k+1}[t_{i+k+1}]
    L_MTP = lambda / D * sum_k L^k

(the embedding first in the concatenation, h^0 after the main model's final norm, depth k + 1
fed depth k's normed output: the released weights' conventions, see `moekit.model.mtp`). Depth k
runs its block on the T - k positions that have a token t_{i+k} (no padding), and the norms,
projection and head are written out as products.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moekit.model import MoETransformer
from moekit.model.attention import attention_mask
from moekit.model.rope import rope_angles


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def _run_blocks(blocks: list, x_BTD: Tensor, ids_BT: Tensor, model: MoETransformer) -> Tensor:
    cfg = model.cfg
    T = x_BTD.shape[1]
    rope = rope_angles(torch.arange(T), cfg.rope_dim, cfg.rope_theta, cfg.rope_scaling)
    mask = attention_mask(0, T, None)
    for block in blocks:
        x_BTD, _ = block(x_BTD, rope, mask, None, ids_BT, False)
    return x_BTD


@torch.no_grad()
def mtp_reference(model: MoETransformer, t_BT: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """Depth k's logits (B, T - k, V), row i scoring token i + k + 1, and its loss L^k."""
    cfg, eps = model.cfg, model.cfg.norm_eps
    emb_VD = model.embed.weight
    head_VD = emb_VD if model.lm_head is None else model.lm_head.weight
    h_BTD = _run_blocks(list(model.layers), emb_VD[t_BT], t_BT, model)
    h_BTD = rms_norm(h_BTD, model.norm.weight, eps)  # h^0: after the final norm
    T = t_BT.shape[1]
    logits, losses = [], []
    for k, depth in enumerate(model.mtp, start=1):
        B = t_BT.shape[0]
        rows = []
        for i in range(T - k):
            e_BD = rms_norm(emb_VD[t_BT[:, i + k]], depth.enorm.weight, eps)
            h_prev_BD = rms_norm(h_BTD[:, i], depth.hnorm.weight, eps)
            rows.append(torch.cat([e_BD, h_prev_BD], dim=-1) @ depth.eh_proj.weight.T)
        h_in_BTD = torch.stack(rows, dim=1)
        h_out_BTD = _run_blocks([depth.block], h_in_BTD, t_BT[:, k:], model)
        h_BTD = rms_norm(h_out_BTD, depth.norm.weight, eps)  # what depth k + 1 takes
        logits_BTV = h_BTD @ head_VD.T
        logits.append(logits_BTV)
        total, count = 0.0, 0
        for b in range(B):
            for i in range(T - k - 1):
                target = int(t_BT[b, i + k + 1])
                log_p = torch.log_softmax(logits_BTV[b, i].double(), dim=-1)
                total -= float(log_p[target])
                count += 1
        losses.append(torch.tensor(total / count))
    assert len(logits) == cfg.mtp_depth
    return logits, losses


def mtp_loss_reference(model: MoETransformer, t_BT: Tensor) -> float:
    """L_MTP = lambda / D * sum_k L^k."""
    _, losses = mtp_reference(model, t_BT)
    return model.cfg.mtp_loss_weight / model.cfg.mtp_depth * math.fsum(float(x) for x in losses)
