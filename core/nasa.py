"""NASA — negative-away steer attention (SNOOPI, arXiv 2412.02687 v3, §5.1, eqs. 7–9, Algorithm 1).

In every text cross-attention, with the layer's own projections W_q, W_k, W_v, W_o:

    Z+ = softmax(Q K+ᵀ/√d) V+        (eq. 7, the positive prompt)
    Z− = softmax(Q K−ᵀ/√d) V−        (eq. 8, the negative prompt, same Q)
    out = W_o (Z+ − α·Z−) + b_o      (eq. 9; the output bias is not scaled)

Training-free; one-step models get a negative prompt without CFG's second UNet pass. This module holds the
combination and the per-backbone defaults; the attention itself is the adapters' (SDPA or attention_kernels/).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import finite, nag

MODES = ("nasa", "nag")

# SNOOPI v3 NASA-I defaults per backbone family. SDXL has no published value (the paper sweeps SDXL-DMD2 over
# 0…1 qualitatively); it uses SD2.1's 0.2 until one is published.
DEFAULT_ALPHA = {"sd1": 0.1, "sd2": 0.2, "sdxl": 0.2, "pixart": 0.5, "sana": 0.5,
                 # SNOOPI publishes no α for the joint-attention DiTs (its Table 2 runs NASA on FLUX-schnell without
                 # stating one; the NAG paper reports NASA unstable there): SD2.1's 0.2, start low
                 "flux": 0.2, "sd3": 0.2, "zimage": 0.2, "qwenimage": 0.2, "flux2": 0.2}


def nasa_combine(z_pos: torch.Tensor, z_neg: torch.Tensor, alpha: float) -> torch.Tensor:
    """Z+ − α·Z− (eq. 9 before the output projection); shapes [B, L, H·D] or [B, H, L, D]."""
    return z_pos - alpha * z_neg


@dataclass(frozen=True)
class NegativeGuidance:
    """NASA or NAG settings, validated once; `combine(Z+, Z−)` applies the chosen one (heads merged, [B, L, H·D],
    for NAG; any layout for NASA)."""

    mode: str = "nasa"
    alpha: float = 0.1  # NASA α
    nag_scale: float = 3.0
    nag_tau: float = 2.5
    nag_alpha: float = 0.5
    nag_norm: int = 1  # 1: the paper's eq. 8; 2: the official joint-attention (FLUX) code

    @classmethod
    def checked(cls, mode="nasa", alpha=0.1, nag_scale=3.0, nag_tau=2.5, nag_alpha=0.5,
                mode_name: str = "`guidance`", nag_norm: int = 1) -> "NegativeGuidance":
        if mode not in MODES:
            raise ValueError(f"{mode_name} must be one of {MODES}, got {mode!r}.")
        finite.check_finite("nasa_scale", alpha)
        if mode == "nag":
            nag.check_params(nag_scale, nag_tau, nag_alpha, nag_norm)
        return cls(mode, float(alpha), float(nag_scale), float(nag_tau), float(nag_alpha), int(nag_norm))

    @classmethod
    def for_family(cls, family: str, mode="nasa", alpha=None, nag_scale=None, nag_tau=None, nag_alpha=None,
                   mode_name: str = "`guidance`") -> "NegativeGuidance":
        """`checked(...)` with the family's published defaults (DEFAULT_ALPHA, nag.DEFAULTS) where a value is None."""
        d = nag.DEFAULTS[family]
        pick = (lambda given, key: d[key] if given is None else given)  # noqa: E731
        return cls.checked(mode, DEFAULT_ALPHA[family] if alpha is None else alpha, pick(nag_scale, "nag_scale"),
                           pick(nag_tau, "nag_tau"), pick(nag_alpha, "nag_alpha"), mode_name=mode_name,
                           nag_norm=d.get("nag_norm", 1))

    def combine(self, z_pos: torch.Tensor, z_neg: torch.Tensor) -> torch.Tensor:
        if self.mode == "nag":
            return nag.nag_combine(z_pos, z_neg, self.nag_scale, self.nag_tau, self.nag_alpha, norm=self.nag_norm)
        return nasa_combine(z_pos, z_neg, self.alpha)
