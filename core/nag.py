"""NAG — normalized attention guidance (arXiv 2505.21179, §4.1, eqs. 7–10).

In the same place as NASA (after the head merge, before the output projection):

    Z̃ = Z+ + φ·(Z+ − Z−)                       (eq. 7; the code's `nag_scale` = φ + 1: Z̃ = s·Z+ − (s−1)·Z−)
    R = ‖Z̃‖₁ / ‖Z+‖₁   per token, over all heads × head_dim     (eq. 8)
    Ẑ = Z̃ · min(R, τ)/R                         (eq. 9, clip the norm growth at τ)
    Z_NAG = α·Ẑ + (1 − α)·Z+                    (eq. 10)

Unclipped (τ = ∞) NAG is NASA rescaled: (1 + αφ)Z+ − αφZ−.
"""

from __future__ import annotations

import torch

from . import finite

# Paper Table 5: τ = 2.5 everywhere; φ = 2 (nag_scale 3) with α 0.5 for SDXL, α 0.375 for SD1.5; φ = 4 (nag_scale 5)
# with α 0.375 for SANA/PixArt-Σ. SD2.x is not in the table and takes the SD1.5 values.
DEFAULTS = {
    "sd1": dict(nag_scale=3.0, nag_tau=2.5, nag_alpha=0.375),
    "sd2": dict(nag_scale=3.0, nag_tau=2.5, nag_alpha=0.375),
    "sdxl": dict(nag_scale=3.0, nag_tau=2.5, nag_alpha=0.5),
    "pixart": dict(nag_scale=5.0, nag_tau=2.5, nag_alpha=0.375),
    "sana": dict(nag_scale=5.0, nag_tau=2.5, nag_alpha=0.375),
    # Joint-attention DiTs, from the official code (ChenDarYen/Normalized-Attention-Guidance): FLUX.1's example
    # (nag_scale 5, NAGFluxPipeline's τ 2.5 / α 0.25, L2 ratio in its FLUX processor); SD3.5's processor (τ 2.5,
    # α 0.125, L1 ratio; its nag_scale defaults to 1 = off, so FLUX's 5 until one is measured). Z-Image has no
    # published setting: FLUX's, the closest joint-attention model with one (Qwen-Image too).
    "flux": dict(nag_scale=5.0, nag_tau=2.5, nag_alpha=0.25, nag_norm=2),
    "sd3": dict(nag_scale=5.0, nag_tau=2.5, nag_alpha=0.125, nag_norm=1),
    "zimage": dict(nag_scale=5.0, nag_tau=2.5, nag_alpha=0.25, nag_norm=2),
    "qwenimage": dict(nag_scale=5.0, nag_tau=2.5, nag_alpha=0.25, nag_norm=2),  # none published: FLUX.1's
    "flux2": dict(nag_scale=5.0, nag_tau=2.5, nag_alpha=0.25, nag_norm=2),  # none published: FLUX.1's
}


def nag_combine(z_pos: torch.Tensor, z_neg: torch.Tensor, nag_scale: float, tau: float, alpha: float,
                eps: float = 1e-6, norm: int = 1) -> torch.Tensor:
    """Z_NAG from Z± of shape [B, L, H·D] (heads merged: the norm runs over the last dim).

    `norm`: the p of the per-token norm ratio R — 1 as the paper's eq. 8 (cross-attention UNets, PixArt/SANA); the
    official joint-attention code (ChenDarYen/Normalized-Attention-Guidance src/attention_flux_nag.py) uses p = 2."""
    if nag_scale == 1.0:  # φ = 0: no guidance, and Z+ exactly (α·Z+ + (1−α)·Z+ could differ in the last bit)
        return z_pos
    z_tilde = z_pos * nag_scale - z_neg * (nag_scale - 1.0)
    ratio = z_tilde.norm(p=norm, dim=-1, keepdim=True) / z_pos.norm(p=norm, dim=-1, keepdim=True).clamp_min(eps)
    z_hat = z_tilde * (ratio.clamp(max=tau) / ratio.clamp_min(eps))
    return alpha * z_hat + (1.0 - alpha) * z_pos


def check_params(nag_scale: float, tau: float, alpha: float, norm: int = 1) -> None:
    for name, value in (("nag_scale", nag_scale), ("nag_tau", tau), ("nag_alpha", alpha)):
        finite.check_finite(name, value)
    if nag_scale < 1.0:
        raise ValueError(f"`nag_scale` (= φ + 1) must be ≥ 1 (1 = off), got {nag_scale}.")
    if tau <= 0:
        raise ValueError(f"`nag_tau` must be > 0, got {tau}.")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`nag_alpha` must be in [0, 1], got {alpha}.")
    if norm not in (1, 2):
        raise ValueError(f"`nag_norm` must be 1 (the paper's L1) or 2 (the official joint-attention code's L2), "
                         f"got {norm!r}.")
