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


def fp8_attention_ref(q, k, v, qk_format: str = "int8", block_m: int = 128, block_n: int = 64,
                      scale=None) -> torch.Tensor:
    """The 8-bit kernel's algorithm written out in torch: Q and K (smoothed: minus the per-head key mean) quantised
    per token to int8 or e4m3, V to e4m3 per channel, then FlashAttention-2's online softmax over key blocks of
    `block_n` with P·448 rounded to e4m3 against the running row maximum; products and sums in float64. Equal to
    the kernel up to float32 accumulation order — which can move a P value across an e4m3 rounding boundary (one
    step is 1/16 of that P) — with the kernel's `block_n`."""
    fp8 = torch.float8_e4m3fn
    top = 127.0 if qk_format == "int8" else 448.0

    def tokens(x):
        s = (x.float().abs().amax(-1, keepdim=True) / top).clamp_min(1e-12)
        y = x.float() / s
        y = y.round().clamp(-127, 127) if qk_format == "int8" else y.to(fp8).float()
        return y.double() * s.double()

    qd = tokens(q)
    kd = tokens(k.float() - k.float().mean(dim=2, keepdim=True))
    vs = (v.float().abs().amax(dim=2, keepdim=True) / 448.0).clamp_min(1e-12)
    v8 = (v.float() / vs).to(fp8).double()
    sm = (scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])) / math.log(2.0)  # log2 units, as the kernel
    lk = k.shape[2]
    m = torch.full(q.shape[:3], -math.inf, dtype=torch.float64, device=q.device)
    l = torch.zeros_like(m)
    acc = torch.zeros(*q.shape[:3], v.shape[-1], dtype=torch.float64, device=q.device)
    for start in range(0, lk, block_n):
        s = (qd @ kd[:, :, start:start + block_n].transpose(-1, -2)) * sm
        m_new = torch.maximum(m, s.amax(-1))
        p = torch.exp2(s - m_new[..., None])
        a = torch.exp2(m - m_new)
        p8 = (p.float() * 448.0).to(fp8).double()  # rounded from float32, as the kernel
        acc = acc * a[..., None] + p8 @ v8[:, :, start:start + block_n]
        l = l * a + p.sum(-1)
        m = m_new
    return acc / (l[..., None] * 448.0) * vs.double()
