"""The one-step SR step around the networks, shared by `pipelines.OneStepSRPipeline` (diffusers) and the ComfyUI node
`SwiftStepUpscaleV2` (ComfyUI's own MODEL/VAE), so both compute the same image for the same weights and seed.

encode → posterior sample (seeded) → ε of the LoRA UNet (latent tiles) → x0 (OSEDiff: DDPM at t = 999; PiSA-SR: z − ε
at t = 1, `core.lora_sr`) → decode → colour fix → resize to exactly upscale × the input.

Resizing is PIL's (bicubic, Lanczos), as the official pre-processing; float tensors are resized channel by channel in
PIL's float mode, so no 8-bit rounding. PIL and numpy are dependencies of both ComfyUI and diffusers.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from PIL import Image

from . import lora_sr, onestep, tiling

VAE_TILE = 128  # latent px; what the VAE tiles default to on CUDA above 2048² output pixels


def _size(im) -> tuple[int, int]:
    """(width, height) of a PIL image or a [C, H, W] tensor."""
    return im.size if isinstance(im, Image.Image) else (im.shape[2], im.shape[1])


def resize(im, size: tuple[int, int], resample) -> torch.Tensor | Image.Image:
    """PIL resize of a PIL image, or of a float tensor channel by channel in PIL's float mode (no 8-bit loss)."""
    h, w = size
    if isinstance(im, Image.Image):
        return im.resize((w, h), resample) if im.size != (w, h) else im
    if tuple(im.shape[1:]) == (h, w):
        return im
    chans = [np.asarray(Image.fromarray(c.numpy(), mode="F").resize((w, h), resample)) for c in im.cpu()]
    return torch.from_numpy(np.stack(chans))


def preprocess_sizes(height: int, width: int, upscale: int, min_side: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The official pre-processing's sizes: (h, w) of the input with its short side raised to min_side/upscale, and
    the network input (H, W) = upscale × that, each side floored to a multiple of 8."""
    floor = min_side // upscale
    if min(width, height) < floor:
        scale = floor / min(width, height)
        height, width = int(scale * height), int(scale * width)
    h, w = height * upscale, width * upscale
    return (height, width), (h - h % 8, w - w % 8)


def preprocess(im, upscale: int, min_side: int) -> torch.Tensor:
    """The official pre-processing: short LQ side raised to min_side/upscale (bicubic), ×upscale (bicubic),
    each side floored to a multiple of 8 (LANCZOS). `im`: PIL or float [3, H, W] in [0, 1]. Returns [1, 3, H, W] in
    [-1, 1]."""
    w, h = _size(im)
    (h1, w1), final = preprocess_sizes(h, w, upscale, min_side)
    im = resize(im, (h1, w1), Image.BICUBIC)
    im = resize(im, (h1 * upscale, w1 * upscale), Image.BICUBIC)
    im = resize(im, final, Image.LANCZOS)
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1) \
        if isinstance(im, Image.Image) else im.float()
    return (x * 2 - 1)[None]


def check_args(upscale, color_fix: str, tile_size: int, tile_overlap: int) -> None:
    """The argument checks of every SR entry point (image and video pipelines, SwiftStepUpscaleV2)."""
    if isinstance(upscale, bool) or not isinstance(upscale, int) or upscale < 1:
        raise ValueError(f"`upscale` must be a positive integer, got {upscale!r}.")
    if color_fix not in lora_sr.COLOR_FIXES:
        raise ValueError(f"`color_fix` must be one of {tuple(lora_sr.COLOR_FIXES)}, got {color_fix!r}.")
    if tile_overlap >= tile_size:
        raise ValueError(f"`tile_overlap` ({tile_overlap}) must be smaller than `tile_size` ({tile_size}).")


def auto_vae_tile(device: torch.device, size) -> int | None:
    """The VAE tile (latent px) used when none is given: tiled on CUDA above 2048² output pixels, else untiled."""
    if torch.device(device).type == "cuda" and size[0] * size[1] > 2048 * 2048:
        return VAE_TILE
    return None


def encode_tiled(encode: Callable[[torch.Tensor], torch.Tensor], norms: list, x: torch.Tensor, vae_tile: int,
                 factor: int) -> torch.Tensor:
    """The VAE encoder's moments over pixel tiles of factor × vae_tile with a halo of 8·factor px (64 for SD) and
    image-wide GroupNorm statistics. The halo trades exactness at tile borders for compute: the SD encoder's full
    reach is ≈ 100 px."""
    return tiling.tiled_norm_synced(encode, norms, x, tile=factor * vae_tile, halo=8 * factor, scale=1 / factor,
                                    align=factor)


def decode_tiled(decode: Callable[[torch.Tensor], torch.Tensor], norms: list, z: torch.Tensor, vae_tile: int,
                 factor: int) -> torch.Tensor:
    """VAE decode over latent tiles of vae_tile, halo 16 (≈ the SD decoder's reach), image-wide GroupNorm."""
    return tiling.tiled_norm_synced(decode, norms, z, tile=vae_tile, halo=16, scale=factor)


def posterior_sample(moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A sample of the VAE's diagonal Gaussian posterior from its moments [B, 2C, h, w] (mean, log-variance clamped to
    [−30, 20]), as diffusers' `DiagonalGaussianDistribution.sample` draws it: the unit noise in the moments' dtype on
    the generator's device, then moved (a CPU generator gives the same latent on any device)."""
    mean, logvar = torch.chunk(moments, 2, dim=1)
    std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
    device = generator.device if generator is not None else moments.device
    noise = torch.randn(mean.shape, generator=generator, device=device, dtype=moments.dtype).to(moments.device)
    return mean + std * noise


def eps_from_sigma_space(denoise: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor,
                         sigma: float) -> torch.Tensor:
    """ε of the VP latent z at the timestep whose σ-space noise level is σ (ᾱ = 1/(1 + σ²)), through a denoiser in the
    k-diffusion convention (ComfyUI's `apply_model`; `core.onestep.sample_sigma_space`): x = z·√(σ² + 1) = x0 + σ·ε,
    `denoise(x)` returns x0, so ε = (x − x0)/σ. In float64: at PiSA-SR's t = 1, σ ≈ 0.04 would amplify the float32
    rounding of x0 25× (float32 where float64 is missing: MPS)."""
    wide = torch.float32 if z.device.type == "mps" else torch.float64
    x = z.to(wide) * math.sqrt(sigma**2 + 1)
    return ((x - denoise(x).to(wide)) / sigma).to(z.dtype)


def tile_count(height: int, width: int, tile: int, overlap: int) -> int:
    """Number of UNet tiles `latent_eps` runs for a latent of height × width."""
    if height * width <= tile * tile:
        return 1
    th, tw = min(tile, height), min(tile, width)
    return len(tiling.tile_starts(height, th, overlap)) * len(tiling.tile_starts(width, tw, overlap))


def latent_eps(fn: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, tile: int, overlap: int,
               on_tile: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """fn(z) (the UNet's ε) over Gaussian-blended latent tiles (`core.tiling.tiled_apply`); one call when the latent's
    area fits in one tile."""
    h, w = z.shape[-2:]
    if h * w <= tile * tile:
        out = fn(z)
        if on_tile is not None:
            on_tile(1, 1)
        return out
    return tiling.tiled_apply(fn, z, tile, overlap, on_tile=on_tile)


def sr_x0(method: str, eps: torch.Tensor, z: torch.Tensor, schedule: onestep.NoiseSchedule) -> torch.Tensor:
    """The clean latent: OSEDiff's DDPM step at t = 999 to ᾱ = 1 (x0 = (z − √(1−ᾱ)·ε)/√ᾱ on the model's ᾱ table),
    PiSA-SR's x0 = z − ε at t = 1."""
    if method == "osediff":
        a, b = schedule.scales(lora_sr.OSEDIFF_T)
        return onestep.x0_and_eps(eps, z, a, b, "epsilon")[0]
    return lora_sr.pisa_x0(eps, z)


def finish(decoded: torch.Tensor, x: torch.Tensor, color_fix: str, size: tuple[int, int]) -> torch.Tensor:
    """Decoded [1, 3, H, W] in [-1, 1] → colour-fixed against the pre-processed input x, resized to `size` (the exact
    upscale × input size, bicubic): [3, h, w] in [0, 1] on the CPU."""
    out = decoded.clamp(-1, 1).float()
    out = lora_sr.color_fix((out + 1) / 2, (x.float() + 1) / 2, color_fix).clamp(0, 1)[0].cpu()
    return resize(out, size, Image.BICUBIC).clamp(0, 1)
