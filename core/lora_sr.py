"""One-step LoRA super-resolution maths: OSEDiff (NeurIPS 2024) and PiSA-SR (CVPR 2025).

Both encode the ×s bicubic-upscaled low-quality image with the SD2.1 VAE, run the LoRA-adapted UNet once and decode:

* OSEDiff: t = 999, ε-prediction, x0 = (z − √(1−ᾱ_999)·ε)/√ᾱ_999 (`core.onestep.x0_and_eps`).
* PiSA-SR: t = 1, x0 = z − ε (a plain residual). Adjustable mode (PiSA-SR eq. 9): ε = λ_pix·ε_pix +
  λ_sem·(ε_pix+sem − ε_pix), with ε_pix from base+pixel LoRA and ε_pix+sem from base+pixel+semantic LoRA;
  λ_pix = λ_sem = 1 is the default single pass.

Colour correction against the upscaled input, as the official code does after decoding: AdaIN (per-channel mean and
standard deviation) or wavelet (keep the output's high frequencies, take the input's low frequencies).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

OSEDIFF_T = 999
PISA_T = 1


def pisa_x0(eps: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """PiSA-SR / DLoRAL at t = 1: x0 = z − ε."""
    return z - eps


def pisa_two_pass(method: str, lambda_pix: float, lambda_sem: float) -> bool:
    """PiSA-SR's adjustable mode (two UNet passes) runs unless both strengths are 1; OSEDiff has one LoRA."""
    return method == "pisa-sr" and (lambda_pix, lambda_sem) != (1.0, 1.0)


def pisa_adjustable_eps(eps_pix: torch.Tensor, eps_pix_sem: torch.Tensor, lambda_pix: float,
                        lambda_sem: float) -> torch.Tensor:
    """PiSA-SR adjustable guidance: λ_pix·ε_pix + λ_sem·(ε_pix+sem − ε_pix)."""
    return lambda_pix * eps_pix + lambda_sem * (eps_pix_sem - eps_pix)


def lora_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """ΔW = scale·B·A of a LoRA layer: linear (A [r, in], B [out, r]) or convolution (A [r, in, kh, kw], B [out, r,
    1, 1]: the 1×1 B composed with A's kernel)."""
    if lora_a.dim() == 2:
        return scale * (lora_b @ lora_a)
    return scale * torch.einsum("or,rikl->oikl", lora_b.flatten(1), lora_a)


def sr_size(height: int, width: int, upscale: int, multiple: int = 8, min_side: int = 128) -> tuple[int, int]:
    """Output size of the official pre-processing: ×upscale, the short side raised to `min_side` if smaller, then
    each side floored to a multiple of `multiple` (the VAE/UNet factor)."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}×{width}.")
    h, w = height * upscale, width * upscale
    if min(h, w) < min_side:
        ratio = min_side / min(h, w)
        h, w = round(h * ratio), round(w * ratio)
    h, w = h - h % multiple, w - w % multiple
    if h < multiple or w < multiple:
        raise ValueError(f"{height}×{width} ×{upscale} is too small (below {multiple} px after rounding).")
    return h, w


def _mean_std(x: torch.Tensor, eps: float):
    b, c = x.shape[:2]
    flat = x.reshape(b, c, -1)
    mean = flat.mean(-1).view(b, c, 1, 1)
    std = (flat.var(-1, unbiased=True) + eps).sqrt().view(b, c, 1, 1)
    return mean, std


def adain_color_fix(image: torch.Tensor, reference: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-channel AdaIN: the image's normalised content with the reference's mean and std ([B, C, H, W])."""
    mean_i, std_i = _mean_std(image, eps)
    mean_r, std_r = _mean_std(reference, eps)
    return (image - mean_i) / std_i * std_r + mean_r


def _wavelet_blur(x: torch.Tensor, radius: int) -> torch.Tensor:
    """3×3 binomial (à trous) blur with dilation `radius`, replicate padding, per channel."""
    k = torch.tensor([[1 / 16, 1 / 8, 1 / 16], [1 / 8, 1 / 4, 1 / 8], [1 / 16, 1 / 8, 1 / 16]],
                     dtype=x.dtype, device=x.device)
    c = x.shape[1]
    x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    return F.conv2d(x, k.expand(c, 1, 3, 3), groups=c, dilation=radius)


def wavelet_decomposition(x: torch.Tensor, levels: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """(high frequencies, low frequency) of a 5-level à trous wavelet decomposition (radii 1, 2, 4, 8, 16)."""
    high = torch.zeros_like(x)
    for i in range(levels):
        low = _wavelet_blur(x, 2**i)
        high = high + (x - low)
        x = low
    return high, x


def wavelet_color_fix(image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The image's high frequencies plus the reference's low frequency."""
    high, _ = wavelet_decomposition(image)
    _, low = wavelet_decomposition(reference)
    return high + low


COLOR_FIXES = {"adain": adain_color_fix, "wavelet": wavelet_color_fix, "none": None}


def color_fix(image: torch.Tensor, reference: torch.Tensor, method: str) -> torch.Tensor:
    if method not in COLOR_FIXES:
        raise ValueError(f"`color_fix` must be one of {tuple(COLOR_FIXES)}, got {method!r}.")
    fn = COLOR_FIXES[method]
    return image if fn is None else fn(image, reference)
