"""DLoRAL's Cross-Frame Retrieval (CFR) module under the official parameter names (`state_dict_bpp` in model.pkl).

Written from the paper and the released architecture (SPyNet, BasicVSR-style flow warping, the cross-frame absolute
attention), without mmcv: `ConvModule(conv + ReLU)` keeps its `.conv` name so the official keys load. The official
`CFR_model` also carries layers its forward pass never uses (`feat_extract`, `weight_predict*`,
`reconstruction_feat`, `conv_hr`, `conv_last`); `load_official` checks they are there and drops them.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from ..core import video_sr

UNUSED_PREFIXES = ("feat_extract.", "weight_predict.", "weight_predict_final.", "reconstruction_feat.", "conv_hr.",
                   "conv_last.")


class _ConvReLU(nn.Module):
    """mmcv `ConvModule(norm_cfg=None)`: a conv named `conv`, optionally followed by ReLU."""

    def __init__(self, cin, cout, relu=True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 7, 1, 3)
        self.relu = relu

    def forward(self, x):
        x = self.conv(x)
        return F.relu(x) if self.relu else x


class SPyNetBasicModule(nn.Module):
    """One pyramid level: [reference (3), warped support (3), upsampled flow (2)] → flow residual (2)."""

    def __init__(self):
        super().__init__()
        chans = [8, 32, 64, 32, 16, 2]
        self.basic_module = nn.Sequential(*[_ConvReLU(a, b, relu=i < 4) for i, (a, b) in
                                            enumerate(zip(chans[:-1], chans[1:]))])

    def forward(self, x):
        return self.basic_module(x)


class SPyNet(nn.Module):
    """SPyNet (Ranjan & Black 2017) as BasicVSR uses it: 6 levels, no batch norm; flow from `ref` to `supp`."""

    def __init__(self):
        super().__init__()
        self.basic_module = nn.ModuleList(SPyNetBasicModule() for _ in range(6))
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def compute_flow(self, ref, supp):
        n, _, h, w = ref.shape
        ref = [(ref - self.mean) / self.std]
        supp = [(supp - self.mean) / self.std]
        for _ in range(5):
            ref.append(F.avg_pool2d(ref[-1], kernel_size=2, stride=2, count_include_pad=False))
            supp.append(F.avg_pool2d(supp[-1], kernel_size=2, stride=2, count_include_pad=False))
        ref, supp = ref[::-1], supp[::-1]
        flow = ref[0].new_zeros(n, 2, h // 32, w // 32)
        for level in range(len(ref)):
            up = flow if level == 0 else F.interpolate(flow, scale_factor=2, mode="bilinear", align_corners=True) * 2
            warped = video_sr.flow_warp(supp[level], up.permute(0, 2, 3, 1), padding_mode="border")
            flow = up + self.basic_module[level](torch.cat([ref[level], warped, up], 1))
        return flow

    def forward(self, ref, supp):
        """Flow [N, 2, H, W] (pixels) from ref to supp; sizes are rounded up to a multiple of 32 internally."""
        h, w = ref.shape[2:]
        h_up, w_up = -(-h // 32) * 32, -(-w // 32) * 32
        ref = F.interpolate(ref, size=(h_up, w_up), mode="bilinear", align_corners=False)
        supp = F.interpolate(supp, size=(h_up, w_up), mode="bilinear", align_corners=False)
        flow = F.interpolate(self.compute_flow(ref, supp), size=(h, w), mode="bilinear", align_corners=False)
        return torch.stack([flow[:, 0] * (w / w_up), flow[:, 1] * (h / h_up)], dim=1)


class CrossFrameAbsoluteAttn(nn.Module):
    """Q from the current latent, K from the warped previous latent, V from the warped previous latent (1×1 convs);
    `relu((QKᵀ/√d − τ(Q)) / 3000)` without softmax; `proj_out` back to the latent's channels, added to it."""

    def __init__(self, in_channels=4, feat_dim=4, embed_dim=64, heads=9):
        super().__init__()
        self.heads, self.embed_dim = heads, embed_dim
        self.query_conv = nn.Conv2d(in_channels, embed_dim * heads, 1)
        self.key_conv = nn.Conv2d(in_channels, embed_dim * heads, 1)
        self.value_conv = nn.Conv2d(feat_dim, embed_dim * heads, 1)
        self.proj_out = nn.Conv2d(embed_dim * heads, feat_dim, 1)
        self.threshold_fc = nn.Linear(embed_dim, 1)

    def forward(self, current, previous_aligned, chunk: int | None = 1024):
        b, _, h, w = current.shape

        def heads(x):  # [B, heads·d, H, W] → [B, heads, HW, d]
            return x.view(b, self.heads, self.embed_dim, h * w).transpose(-1, -2)

        q = heads(self.query_conv(current))
        k = heads(self.key_conv(previous_aligned))
        v = heads(self.value_conv(previous_aligned))
        threshold = self.threshold_fc(q).squeeze(-1)
        out = video_sr.absolute_attention(q, k, v, threshold, video_sr.CFR_TEMPERATURE, chunk)
        out = out.transpose(-1, -2).reshape(b, self.heads * self.embed_dim, h, w)
        return current + self.proj_out(out)


class CrossFrameRetrieval(ModelMixin, ConfigMixin):
    """DLoRAL's CFR: aligns the previous frame's latent to the current one and fuses it in.

    `forward(prev_frames, cur_frames, prev_latents, cur_latents)` with frames [N, 3, H, W] in [−1, 1] and latents
    [N, 4, H/8, W/8] returns (warped previous latents, fused current latents): the 8-channel UNet input is their
    concatenation in that order."""

    @register_to_config
    def __init__(self, latent_channels: int = 4, embed_dim: int = 64, heads: int = 9):
        super().__init__()
        self.spynet = SPyNet()
        self.cross_attn_module = CrossFrameAbsoluteAttn(latent_channels, latent_channels, embed_dim, heads)
        self.attention_chunk = 1024

    def forward(self, prev_frames, cur_frames, prev_latents, cur_latents):
        small = video_sr.flow_input(torch.cat([prev_frames, cur_frames]))
        prev_small, cur_small = small.chunk(2)
        flow = self.spynet(cur_small, prev_small)  # current → previous
        if flow.shape[-2:] != cur_latents.shape[-2:]:
            raise ValueError(f"CFR: frames at 1/8 are {tuple(flow.shape[-2:])} but the latents are "
                             f"{tuple(cur_latents.shape[-2:])}; the VAE must downsample by 8.")
        aligned = video_sr.flow_warp(prev_latents, flow.permute(0, 2, 3, 1).to(prev_latents.dtype))
        fused = self.cross_attn_module(cur_latents, aligned, chunk=self.attention_chunk)
        return aligned, fused

    @classmethod
    def load_official(cls, state: dict, source: str = "model.pkl") -> "CrossFrameRetrieval":
        """From the official `state_dict_bpp` (named parameters and buffers of `CFR_model`)."""
        missing_groups = [p for p in ("spynet.", "cross_attn_module.") if not any(k.startswith(p) for k in state)]
        if missing_groups:
            raise ValueError(f"{source}: `state_dict_bpp` has no {' / '.join(missing_groups)} weights; expected "
                             f"DLoRAL's CFR_model (SPyNet + cross-frame attention), found keys like "
                             f"{sorted(state)[:3]}.")
        used = {k: v for k, v in state.items() if not k.startswith(UNUSED_PREFIXES)}
        q = used.get("cross_attn_module.query_conv.weight")
        t = used.get("cross_attn_module.threshold_fc.weight")
        if q is None or t is None:
            raise ValueError(f"{source}: `state_dict_bpp` lacks the cross-frame attention's query_conv/threshold_fc.")
        embed = t.shape[1]
        model = cls(latent_channels=q.shape[1], embed_dim=embed, heads=q.shape[0] // embed)
        own = set(model.state_dict())
        optional = {"spynet.mean", "spynet.std"}  # constant buffers: in the official file, but harmless if absent
        unknown, lacking = sorted(set(used) - own), sorted(own - set(used) - optional)
        if unknown or lacking:
            raise ValueError(f"{source}: `state_dict_bpp` does not match DLoRAL's CFR: "
                             f"{len(unknown)} unknown keys (e.g. {unknown[:2]}), {len(lacking)} missing "
                             f"(e.g. {lacking[:2]}).")
        try:
            model.load_state_dict(used, strict=False)
        except RuntimeError as e:  # shape mismatches
            raise ValueError(f"{source}: `state_dict_bpp` does not fit DLoRAL's CFR: {e}") from None
        return model
