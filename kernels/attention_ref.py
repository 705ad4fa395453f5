"""Torch references for the kernels: the SDPA maths written out, run in float64 for tests."""

from __future__ import annotations

import math

import torch


def attention_ref(q, k, v, mask=None, scale=None) -> torch.Tensor:
    """softmax(q·kᵀ·scale + mask)·v in float64; q [B, H, Lq, D], mask bool (True = keep) or additive, [.., Lk]."""
    q, k, v = q.double(), k.double(), v.double()
    s = (q @ k.transpose(-1, -2)) * (scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))
    if mask is not None:
        bias = mask if mask.dtype != torch.bool else torch.zeros(mask.shape, dtype=torch.float64,
                                                                  device=mask.device).masked_fill(~mask, -math.inf)
        while bias.dim() < 4:
            bias = bias.unsqueeze(1 if bias.dim() == 2 else 2)
        s = s + bias.double()
    return torch.softmax(s, dim=-1) @ v


def dual_attention_ref(q, k_pos, v_pos, k_neg, v_neg, alpha=None, mask_pos=None, mask_neg=None, scale=None):
    """(Z+, Z−), or Z+ − α·Z− (SNOOPI eq. 9), in float64."""
    z_pos = attention_ref(q, k_pos, v_pos, mask_pos, scale)
    z_neg = attention_ref(q, k_neg, v_neg, mask_neg, scale)
    return (z_pos, z_neg) if alpha is None else z_pos - alpha * z_neg
