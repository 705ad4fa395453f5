"""Torch references for the kernels: the SDPA maths written out, run in float64 for tests; and the exact SDPA path of
the shared-key dual attention (`prefix_dual_attention_ref`), which dispatch falls back to."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


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


# ---------------------------------------------------------------- shared-key dual attention (joint-attention DiTs)
def _mask_keys(mask, name: str, lt: int, lq: int):
    if mask is None:
        return
    if mask.dim() not in (2, 3, 4):
        raise ValueError(f"`{name}` must be [B, Lt], [B, H, Lt] or [B, H, 1 or Lq, Lt]; got {tuple(mask.shape)}.")
    if mask.shape[-1] != lt:
        raise ValueError(f"`{name}` has {mask.shape[-1]} keys; its text prefix has {lt}.")
    if mask.dim() == 4 and mask.shape[2] not in (1, lq):
        raise ValueError(f"`{name}` [B, H, Lq, Lt] has {mask.shape[2]} query rows; q has {lq}.")


def check_prefix_dual_inputs(q, k_img, v_img, k_pos, v_pos, k_neg, v_neg, mask_pos=None, mask_neg=None):
    """ValueError naming the argument unless q [B, H, Lq, D], k_img/v_img [B, H, Limg ≥ 1, D], k_pos/v_pos
    [B, H, Lt+, D], k_neg/v_neg [B, H, Lt−, D] and key masks over Lt± (the image keys are never masked)."""
    if q.dim() != 4:
        raise ValueError(f"`q` must be [B, H, Lq, D], got shape {tuple(q.shape)}.")
    B, H, LQ, D = q.shape
    named = dict(k_img=k_img, v_img=v_img, k_pos=k_pos, v_pos=v_pos, k_neg=k_neg, v_neg=v_neg)
    for name, t in named.items():
        if t.dim() != 4 or (t.shape[0], t.shape[1], t.shape[3]) != (B, H, D):
            raise ValueError(f"`{name}` must be [B={B}, H={H}, L, D={D}] like q, got shape {tuple(t.shape)}.")
    for kind in ("img", "pos", "neg"):
        if named[f"v_{kind}"].shape[2] != named[f"k_{kind}"].shape[2]:
            raise ValueError(f"`v_{kind}` has {named[f'v_{kind}'].shape[2]} tokens; `k_{kind}` has "
                             f"{named[f'k_{kind}'].shape[2]}.")
    if k_img.shape[2] == 0:
        raise ValueError("`k_img` has no keys; the image keys keep every softmax row defined (text may be masked).")
    _mask_keys(mask_pos, "mask_pos", k_pos.shape[2], LQ)
    _mask_keys(mask_neg, "mask_neg", k_neg.shape[2], LQ)


def _joint_mask(mask, limg: int, dtype: torch.dtype):
    """A text key mask extended over the (never masked) image keys: [.., Lt] → [B|1, H|1, 1|Lq, Lt + Limg]."""
    if mask is None:
        return None
    if mask.dim() == 2:
        mask = mask[:, None, None, :]
    elif mask.dim() == 3:
        mask = mask[:, :, None, :]
    if mask.dtype == torch.bool:
        return torch.cat([mask, mask.new_ones(*mask.shape[:-1], limg)], dim=-1)
    mask = mask.to(dtype)
    return torch.cat([mask, mask.new_zeros(*mask.shape[:-1], limg)], dim=-1)


def prefix_dual_attention_ref(q, k_img, v_img, k_pos, v_pos, k_neg, v_neg, mask_pos=None, mask_neg=None,
                              scale=None, alpha=None):
    """Z± = softmax(q·[K_txt±; K_img]ᵀ·scale + [mask±; 0])·[V_txt±; V_img] by two SDPA calls on the concatenated
    keys: the exact path (`prefix_dual_attention`'s fallback), in the inputs' common dtype, returned in q's dtype.
    `(Z+, Z−)`, or `Z+ − α·Z−` (SNOOPI eq. 9) when `alpha` is given. Masks: key padding of each text prefix (bool
    True = attend, or additive float), [B, Lt], [B, H, Lt] or [B, H, 1 | Lq, Lt]; a fully masked prefix leaves the
    image keys, so no row is undefined."""
    check_prefix_dual_inputs(q, k_img, v_img, k_pos, v_pos, k_neg, v_neg, mask_pos, mask_neg)
    dtype = q.dtype
    for t in (k_img, v_img, k_pos, v_pos, k_neg, v_neg):
        dtype = torch.promote_types(dtype, t.dtype)
    q_, k_img, v_img = q.to(dtype), k_img.to(dtype), v_img.to(dtype)

    def branch(k_txt, v_txt, mask):
        k = torch.cat([k_txt.to(dtype), k_img], dim=2)  # [B, H, Lt + Limg, D]
        v = torch.cat([v_txt.to(dtype), v_img], dim=2)
        return F.scaled_dot_product_attention(q_, k, v, attn_mask=_joint_mask(mask, k_img.shape[2], dtype),
                                              scale=scale).to(q.dtype)

    z_pos, z_neg = branch(k_pos, v_pos, mask_pos), branch(k_neg, v_neg, mask_neg)
    return (z_pos, z_neg) if alpha is None else torch.sub(z_pos, z_neg, alpha=alpha)


def prefix_dual_attention_merged(q, k_img, v_img, k_pos, v_pos, k_neg, v_neg, mask_pos=None, mask_neg=None,
                                 scale=None):
    """The kernel's algorithm written out in torch (a float64 check of it, and what bench/prefix_dual_attention.py
    counts): one attention state (row max m, row sum l, unnormalised output acc) over the image keys, one over each
    text prefix, merged per prompt as split-KV attention merges partial results — q·K_imgᵀ and P·V_img computed once
    for both prompts. Key-padding masks ([B, Lt] / [B, H, Lt] / [B, H, 1, Lt]) only."""
    check_prefix_dual_inputs(q, k_img, v_img, k_pos, v_pos, k_neg, v_neg, mask_pos, mask_neg)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])

    def state(k, v, mask=None):
        s = (q @ k.transpose(-1, -2)) * scale  # [B, H, Lq, Lk]
        if mask is not None:
            mask = _joint_mask(mask, 0, s.dtype)  # [B|1, H|1, 1, Lt]
            s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask
        m = s.amax(-1, keepdim=True)
        m_ref = torch.where(m == -math.inf, 0.0, m)  # a fully masked prefix: l = 0, acc = 0, no NaN
        p = torch.exp(s - m_ref)
        return m, p.sum(-1, keepdim=True), p @ v

    def merge(a, b):
        m = torch.maximum(a[0], b[0])
        ca, cb = torch.exp(a[0] - m), torch.exp(b[0] - m)
        return (a[2] * ca + b[2] * cb) / (a[1] * ca + b[1] * cb)

    img = state(k_img, v_img)
    return merge(img, state(k_pos, v_pos, mask_pos)), merge(img, state(k_neg, v_neg, mask_neg))
