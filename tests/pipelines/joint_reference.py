"""Float64 building blocks of the joint-attention guidance references (tests/pipelines/test_joint_guidance_*.py),
written from the formulas (SNOOPI eq. 9; the official NAG code's `attention_*_nag.py`), never from swiftstep code:
the mix of the two branches, softmax attention with an allowed-keys mask, FLUX's RoPE, the official `Trunc*` AdaLN."""

import math

import torch

from swiftstep.core.nasa import NegativeGuidance


def nag_reference(z_pos, z_neg, g: NegativeGuidance):
    """attention_*_nag.py: z_g = s·Z+ − (s−1)·Z−, r = ‖z_g‖ₚ/‖Z+‖ₚ per token over the merged heads (p = 2 in the
    official FLUX code, 1 in its SD3.5 code), z_g·min(r, τ)/r, α·z_g + (1−α)·Z+."""
    z_g = z_pos * g.nag_scale - z_neg * (g.nag_scale - 1)
    r = z_g.norm(p=g.nag_norm, dim=-1, keepdim=True) / z_pos.norm(p=g.nag_norm, dim=-1, keepdim=True)
    z_g = z_g * torch.minimum(r, torch.full_like(r, g.nag_tau)) / r
    return z_g * g.nag_alpha + z_pos * (1 - g.nag_alpha)


def mix_reference(g: NegativeGuidance | None):
    if g is None:  # no guidance: the positive branch only
        return lambda z_pos, z_neg: z_pos
    if g.mode == "nasa":
        return lambda z_pos, z_neg: z_pos - g.alpha * z_neg  # SNOOPI eq. 9
    return lambda z_pos, z_neg: nag_reference(z_pos, z_neg, g)


def recording(guidance):
    """mix_reference(guidance), noting whether NAG's norm ratio ever exceeds τ (so the clipping is exercised)."""
    mix, seen = mix_reference(guidance), {"clipped": False}

    def recorded(z_pos, z_neg):
        if guidance is not None and guidance.mode == "nag":
            z_g = z_pos * guidance.nag_scale - z_neg * (guidance.nag_scale - 1)
            p = guidance.nag_norm
            seen["clipped"] |= bool((z_g.norm(p=p, dim=-1) > guidance.nag_tau * z_pos.norm(p=p, dim=-1)).any())
        return mix(z_pos, z_neg)

    return recorded, seen


def rope(x, cos, sin):
    """FLUX RoPE on x [R, L, H, D]: pairs (x₂ᵢ, x₂ᵢ₊₁) rotated by the angle whose cos/sin the table holds."""
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return x * cos[None, :, None] + rotated * sin[None, :, None]


def softmax_attention(q, k, v, allowed=None):
    """softmax(q·kᵀ/√d [+ −∞ where not allowed])·v, [R, L, H, D] in, [R, Lq, H·D] out."""
    s = torch.einsum("rqhd,rkhd->rhqk", q, k) / math.sqrt(q.shape[-1])
    if allowed is not None:
        s = s.masked_fill(~allowed, -math.inf)
    return torch.einsum("rhqk,rkhd->rqhd", torch.softmax(s, dim=-1), v).flatten(2)


def heads(attn, x):
    return x.unflatten(-1, (attn.heads, -1))


def hooks_of(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


class TruncNorm(torch.nn.Module):
    """The official TruncAdaLayerNormZero: the AdaLN takes as many temb rows as its input has (the positive ones)."""

    def __init__(self, norm):
        super().__init__()
        self.norm = norm

    def forward(self, x, emb=None):
        return self.norm(x, emb=emb[: x.shape[0]])
