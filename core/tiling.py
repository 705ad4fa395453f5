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


def tiled_apply(fn: Callable[..., torch.Tensor], latent: torch.Tensor, tile: int, overlap: int,
                tiles_per_call: int = 4, on_tile: Callable[[int, int], None] | None = None,
                aligned: tuple[tuple[torch.Tensor, int], ...] = ()) -> torch.Tensor:
    """Σ w·fn(tile) / Σ w over overlapping tiles of `latent` [B, C, H, W]; `fn` maps [N, C, h, w] → [N, C', h, w].

    `aligned` = ((tensor, factor), …): tensors [B, C'', H·factor, W·factor] (e.g. the frames behind a latent) cut at
    the same boxes scaled by `factor` and passed to `fn` as extra arguments, in order.
    Untiled (one call) when the latent fits in one tile. `on_tile(done, total)` reports progress."""
    if tile < 1 or overlap < 0:
        raise ValueError(f"tile must be ≥ 1 and overlap ≥ 0, got tile={tile}, overlap={overlap}.")
    b, _, h, w = latent.shape
    if h <= tile and w <= tile:
        out = fn(latent, *(t for t, _ in aligned))
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
        extra = [torch.cat([t[:, :, y * f:(y + th) * f, x * f:(x + tw) * f] for y, x in chunk], dim=0)
                 for t, f in aligned]
        result = fn(batch, *extra).float()
        if out is None:
            out = torch.zeros(b, result.shape[1], h, w, device=latent.device, dtype=torch.float32)
            norm = torch.zeros(1, 1, h, w, device=latent.device, dtype=torch.float32)
        for j, (y, x) in enumerate(chunk):
            out[:, :, y:y + th, x:x + tw] += result[j * b:(j + 1) * b] * weight
            norm[:, :, y:y + th, x:x + tw] += weight
        if on_tile is not None:
            on_tile(min(i + tiles_per_call, len(boxes)), len(boxes))
    return (out / norm).to(latent.dtype)


class _Stop(Exception):
    """Ends a tile's forward pass once the GroupNorm being measured has seen it."""


def _boxes(length: int, core: int, halo: int, align: int) -> list[tuple[int, int, int, int]]:
    """(core_start, core_end, in_start, in_end) along one axis: non-overlapping cores, each read with a halo."""
    out = []
    for s in range(0, length, core):
        e = min(s + core, length)
        a, b = max(0, s - halo), min(length, e + halo)
        out.append((s, e, a - a % align, b))
    return out


def _forward_order(fn, norms, sample) -> list:
    """`norms` in the order a forward pass calls them (module registration order can differ, e.g. a mid-block
    that registers its attention before its resnets); norms the pass never calls are dropped."""
    calls: list = []
    hooks = [n.register_forward_pre_hook(lambda m, args: calls.append(m) if m not in calls else None) for n in norms]
    try:
        fn(sample)
    finally:
        for hook in hooks:
            hook.remove()
    return calls


def tiled_norm_synced(fn: Callable[[torch.Tensor], torch.Tensor], norms: list[torch.nn.GroupNorm], x: torch.Tensor,
                      tile: int, halo: int, scale: float, align: int = 1,
                      on_tile: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Run a convolutional network `fn` (a VAE encoder or decoder; output size = scale × input size) over tiles of
    `x` [B, C, H, W] with GroupNorm statistics taken over the *whole* image, so tiles share one tone.

    The statistics of GroupNorm k depend on every tile's activations at k, which depend on the statistics before
    k. So the layers are measured in order: for each GroupNorm k, every tile runs up to k (earlier norms using the
    global statistics already measured), adds its core region's sums to k's, and stops there. A last pass runs
    every tile to the end and keeps its core. Memory is one tile's; compute is about len(norms)/2 full passes.
    Convolutions see `halo` extra input pixels around each core (exact when the halo covers their reach);
    attention, if any, sees the tile only.
    """
    b, _, h, w = x.shape
    if h <= tile and w <= tile:
        return fn(x)
    boxes = [(ys, xs) for ys in _boxes(h, tile, halo, align) for xs in _boxes(w, tile, halo, align)]
    norms = _forward_order(fn, norms, x[:, :, :min(h, tile), :min(w, tile)])
    stats: list = [None] * len(norms)
    originals = [n.forward for n in norms]

    def make_forward(k, norm, box, measure):
        (cy0, cy1, iy0, iy1), (cx0, cx1, ix0, ix1) = box

        def forward(t):
            if t.dim() == 3:  # attention blocks normalise [B, C, h·w]: restore the tile's 2-D layout
                f = (t.shape[2] / ((iy1 - iy0) * (ix1 - ix0))) ** 0.5
                shape3 = t.shape
                t = t.reshape(t.shape[0], t.shape[1], round((iy1 - iy0) * f), round((ix1 - ix0) * f))
                return forward(t).reshape(shape3)
            if stats[k] is not None:  # measured: normalise with the whole image's mean and variance
                mean, var = stats[k]
                ct = torch.promote_types(t.dtype, torch.float32)  # at least fp32 for the normalisation
                shaped = t.reshape(t.shape[0], norm.num_groups, -1).to(ct)
                mean, var = mean.to(ct)[:, :, None], var.to(ct)[:, :, None]
                out = ((shaped - mean) / torch.sqrt(var + norm.eps)).reshape(t.shape)
                if norm.affine:
                    out = out * norm.weight.to(ct)[None, :, None, None] + norm.bias.to(ct)[None, :, None, None]
                return out.to(t.dtype)
            if k != measure:
                raise RuntimeError("GroupNorm order differs from the forward order.")
            fy, fx = t.shape[2] / (iy1 - iy0), t.shape[3] / (ix1 - ix0)  # this layer's scale vs the input tile
            core = t[:, :, round((cy0 - iy0) * fy):round((cy1 - iy0) * fy), round((cx0 - ix0) * fx):round((cx1 - ix0) * fx)]
            core = core.reshape(core.shape[0], norm.num_groups, -1).double()
            acc = sums.setdefault(k, [0.0, 0.0, 0])
            acc[0] = acc[0] + core.sum(-1)
            acc[1] = acc[1] + (core * core).sum(-1)
            acc[2] += core.shape[-1]
            raise _Stop
        return forward

    def run(box, measure):
        (cy0, cy1, iy0, iy1), (cx0, cx1, ix0, ix1) = box
        for k, norm in enumerate(norms):
            norm.forward = make_forward(k, norm, box, measure)
        try:
            return fn(x[:, :, iy0:iy1, ix0:ix1])
        except _Stop:
            return None

    out = None
    try:
        for k in range(len(norms)):  # measure the norms in forward order
            sums: dict = {}
            for box in boxes:
                run(box, k)
            s, ss, n = sums[k]
            mean = s / n
            stats[k] = (mean, (ss / n - mean * mean).clamp_min(0))  # float64; GroupNorm's biased variance
        for i, box in enumerate(boxes):  # the final pass keeps each tile's core
            (cy0, cy1, iy0, iy1), (cx0, cx1, ix0, ix1) = box
            y = run(box, -1)
            if out is None:
                out = torch.zeros(b, y.shape[1], round(h * scale), round(w * scale), dtype=y.dtype, device=y.device)
            oy, ox = round((cy0 - iy0) * scale), round((cx0 - ix0) * scale)
            hh, ww = round((cy1 - cy0) * scale), round((cx1 - cx0) * scale)
            out[:, :, round(cy0 * scale):round(cy0 * scale) + hh, round(cx0 * scale):round(cx0 * scale) + ww] = \
                y[:, :, oy:oy + hh, ox:ox + ww]
            if on_tile is not None:
                on_tile(i + 1, len(boxes))
    finally:
        for norm, original in zip(norms, originals):
            norm.forward = original
            norm.__dict__.pop("forward", None)
    return out
