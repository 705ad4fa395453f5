"""Latent tiling with Gaussian blending, for one-step SR on inputs larger than a tile.

The official OSEDiff/PiSA-SR loop (tile 96, overlap 32 latent px; each tile weighted by a separable Gaussian
exp(−(x − mid)²/(2·0.01·n²)) and the sum divided by the summed weights) hangs when a shrunk tile is not larger than
the overlap and breaks on strips narrower than a tile. Here: tile sizes shrink to the image per axis, weights are
computed after shrinking, start positions always advance, and several tiles go through the network per call.
"""

from __future__ import annotations

import math
from typing import Callable

import torch


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets covering [0, length) with tiles of `tile` (≤ length) overlapping by `overlap`; the last tile is
    aligned to the end. Always terminates: the stride is at least 1."""
    if tile >= length:
        return [0]
    stride = max(1, tile - min(overlap, tile - 1))
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def gaussian_weights(height: int, width: int, var: float = 0.01, device=None, dtype=torch.float32) -> torch.Tensor:
    """Separable Gaussian tile weights [height, width], centred at (n − 1)/2 on both axes."""
    def axis(n):
        x = torch.arange(n, dtype=torch.float64)
        mid = (n - 1) / 2
        return torch.exp(-((x - mid) ** 2) / (n * n) / (2 * var)) / math.sqrt(2 * math.pi * var)

    return torch.outer(axis(height), axis(width)).to(device=device, dtype=dtype)


def tiled_apply(fn: Callable[[torch.Tensor], torch.Tensor], latent: torch.Tensor, tile: int, overlap: int,
                tiles_per_call: int = 4, on_tile: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Σ w·fn(tile) / Σ w over overlapping tiles of `latent` [B, C, H, W]; `fn` maps [N, C, h, w] → [N, C', h, w].

    Untiled (one call) when the latent fits in one tile. `on_tile(done, total)` reports progress."""
    if tile < 1 or overlap < 0:
        raise ValueError(f"tile must be ≥ 1 and overlap ≥ 0, got tile={tile}, overlap={overlap}.")
    b, _, h, w = latent.shape
    if h <= tile and w <= tile:
        out = fn(latent)
        if on_tile is not None:
            on_tile(1, 1)
        return out
    th, tw = min(tile, h), min(tile, w)
    boxes = [(y, x) for y in tile_starts(h, th, overlap) for x in tile_starts(w, tw, overlap)]
    weight = gaussian_weights(th, tw, device=latent.device, dtype=torch.float32)
    out = norm = None
    for i in range(0, len(boxes), tiles_per_call):
        chunk = boxes[i:i + tiles_per_call]
        batch = torch.cat([latent[:, :, y:y + th, x:x + tw] for y, x in chunk], dim=0)
        result = fn(batch).float()
        if out is None:
            out = torch.zeros(b, result.shape[1], h, w, device=latent.device, dtype=torch.float32)
            norm = torch.zeros(1, 1, h, w, device=latent.device, dtype=torch.float32)
        for j, (y, x) in enumerate(chunk):
            out[:, :, y:y + th, x:x + tw] += result[j * b:(j + 1) * b] * weight
            norm[:, :, y:y + th, x:x + tw] += weight
        if on_tile is not None:
            on_tile(min(i + tiles_per_call, len(boxes)), len(boxes))
    return (out / norm).to(latent.dtype)
