"""DLoRAL video super-resolution maths (arXiv 2506.15591), torch only.

Per output frame i the official procedure takes the window (frame i−1, frame i) of bicubic-upscaled inputs:

1. encode both frames (VAE posterior sample × scaling factor) → latents ℓ_{i−1}, ℓ_i [4, h, w];
2. optical flow from frame i to frame i−1 with SPyNet on the [−1, 1] frames downsampled ×1/8 (bicubic);
3. warp ℓ_{i−1} with that flow (bilinear, zeros outside, align_corners=True) → ℓ̃_{i−1};
4. cross-frame "absolute" attention (CFR): Q from ℓ_i, K from ℓ̃_{i−1}, V from ℓ̃_{i−1} (1×1 convs, 9 heads of 64),
   A = relu((QKᵀ/√d − τ(Q)) / 3000) with a learned per-query threshold τ (no softmax: rows may be all zero),
   f_i = ℓ_i + proj_out(A V);
5. one UNet pass at t = 1 on the 8 channels [ℓ̃_{i−1}, f_i]; x0 = f_i − ε; decode; colour fix against frame i.

`absolute_attention` computes step 4 in query chunks: rows are independent (no softmax), so chunking is exact and
memory is chunk × HW instead of the official HW × HW (1.5 GB in fp16 at a 96² latent).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CFR_TEMPERATURE = 3000.0  # DLoRAL's `CrossFrameAbsoluteAttn.temperature`
MIN_FLOW_SIDE = 64  # SPyNet's pyramid (5 halvings) needs ≥ 64 px; frames are seen at 1/8 → ≥ 512 px upscaled


def flow_warp(x: torch.Tensor, flow: torch.Tensor, padding_mode: str = "zeros") -> torch.Tensor:
    """Sample x [N, C, H, W] at (j + u, i + v) for flow [N, H, W, 2] = (u, v) in pixels (bilinear,
    align_corners=True, so pixel centres map to ±1 exactly: the BasicVSR/mmagic convention DLoRAL uses)."""
    if x.shape[-2:] != flow.shape[1:3]:
        raise ValueError(f"flow_warp: the input is {tuple(x.shape[-2:])} but the flow is {tuple(flow.shape[1:3])}.")
    _, _, h, w = x.shape
    gy, gx = torch.meshgrid(torch.arange(h, device=x.device, dtype=x.dtype),
                            torch.arange(w, device=x.device, dtype=x.dtype), indexing="ij")
    px = gx + flow[..., 0].to(x.dtype)
    py = gy + flow[..., 1].to(x.dtype)
    grid = torch.stack((2.0 * px / max(w - 1, 1) - 1.0, 2.0 * py / max(h - 1, 1) - 1.0), dim=3)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding_mode, align_corners=True)


def absolute_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, threshold: torch.Tensor,
                       temperature: float = CFR_TEMPERATURE, chunk: int | None = 1024) -> torch.Tensor:
    """out = relu((q kᵀ/√d − threshold) / temperature) v, per head; q, k, v [B, H, L, d], threshold [B, H, L].

    Computed `chunk` query rows at a time (exact: each row is independent); None = all rows at once."""
    b, heads, rows, d = q.shape
    step = rows if chunk is None else max(1, chunk)
    q3, k3, v3 = q.reshape(b * heads, rows, d), k.reshape(b * heads, -1, d), v.reshape(b * heads, -1, v.shape[-1])
    kt = k3.transpose(-1, -2)
    bias = (threshold.reshape(b * heads, rows, 1) / -temperature).to(q.dtype)
    alpha = 1.0 / (math.sqrt(d) * temperature)
    out = q.new_empty(b * heads, rows, v.shape[-1])
    for s in range(0, rows, step):  # relu(α·q kᵀ − τ/T) in one GEMM with its epilogue, then in-place relu
        attn = torch.baddbmm(bias[:, s:s + step], q3[:, s:s + step], kt, alpha=alpha).relu_()
        out[:, s:s + step] = torch.bmm(attn, v3)
    return out.view(b, heads, rows, -1)


def dloral_x0(eps: torch.Tensor, latent8: torch.Tensor) -> torch.Tensor:
    """DLoRAL's one-step estimate at t = 1: the fused current latent (channels 4:8 of the UNet input) minus ε."""
    return latent8[:, 4:8] - eps


def flow_input(frames: torch.Tensor) -> torch.Tensor:
    """The images SPyNet sees: [−1, 1] frames [N, 3, H, W] downsampled ×1/8 with bicubic interpolation (the
    official `is_low_res_input=False` path; note the frames stay in [−1, 1] although SPyNet normalises for [0, 1])."""
    check_flow_size(*frames.shape[-2:])
    return F.interpolate(frames, scale_factor=0.125, mode="bicubic")


def check_flow_size(height: int, width: int) -> None:
    if height // 8 < MIN_FLOW_SIDE or width // 8 < MIN_FLOW_SIDE:
        raise ValueError(f"DLoRAL's flow network needs (upscaled) frames of at least {8 * MIN_FLOW_SIDE}×"
                         f"{8 * MIN_FLOW_SIDE} px: it sees them at 1/8 and its pyramid needs ≥ {MIN_FLOW_SIDE} px; "
                         f"got {width}×{height}. Raise `min_side` or the upscale factor.")
