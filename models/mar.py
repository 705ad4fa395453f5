"""MAR (Li et al. 2024, arXiv 2406.11838) without timm, with the parameter names of LTH14/mar's checkpoints.

Network code only; the sampling maths (DiSA schedules, head diffusion, mask/CFG schedules) is `core.disa`.
The official `checkpoint-last.pth` `model_ema` state dict loads with `load_state_dict(strict=True)`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

SIZES = {  # encoder = decoder depth, width, heads; diffusion head depth × width (README / models/mar.py)
    "base": dict(depth=12, width=768, heads=12, diffloss_d=6, diffloss_w=1024),
    "large": dict(depth=16, width=1024, heads=16, diffloss_d=8, diffloss_w=1280),
    "huge": dict(depth=20, width=1280, heads=16, diffloss_d=12, diffloss_w=1536),
}


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """timm's pre-norm ViT block (inference: dropouts are identities), same parameter names."""

    def __init__(self, dim, heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """[cos, sin] sinusoidal embedding of (possibly fractional) timesteps (DiT / MAR `TimestepEmbedder`)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class ResBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.in_ln = nn.LayerNorm(channels, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, channels))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 3 * channels))

    def forward(self, x, y):
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, channels, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(channels, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(channels, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 2 * channels))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    """The per-token diffusion head: ε and learned-variance values for each token latent given its condition z."""

    def __init__(self, in_channels, model_channels, out_channels, z_channels, num_res_blocks):
        super().__init__()
        self.in_channels = in_channels
        self.time_embed = TimestepEmbedder(model_channels)
        self.cond_embed = nn.Linear(z_channels, model_channels)
        self.input_proj = nn.Linear(in_channels, model_channels)
        self.res_blocks = nn.ModuleList(ResBlock(model_channels) for _ in range(num_res_blocks))
        self.final_layer = FinalLayer(model_channels, out_channels)

    def forward(self, x, t, c):
        x = self.input_proj(x)
        y = self.time_embed(t) + self.cond_embed(c)
        for block in self.res_blocks:
            x = block(x, y)
        return self.final_layer(x, y)

    def forward_with_cfg(self, x, t, c, cfg_scale):
        """CFG on ε only: rows [cond; uncond] share the cond half's x; variance channels kept per half."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, c)
        eps, rest = out[:, : self.in_channels], out[:, self.in_channels:]
        cond, uncond = eps.chunk(2)
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([guided, guided]), rest], dim=1)


class DiffLoss(nn.Module):
    """Holds the head under the official name `diffloss.net`."""

    def __init__(self, target_channels, z_channels, depth, width):
        super().__init__()
        self.in_channels = target_channels
        self.net = SimpleMLPAdaLN(target_channels, width, target_channels * 2, z_channels, depth)


class MAR(ModelMixin, ConfigMixin):
    """MAR's masked autoregressive encoder–decoder over `seq_len` latent tokens, plus its diffusion head
    (a diffusers ModelMixin so that `save_pretrained` / `from_pretrained` folders work)."""

    @register_to_config
    def __init__(self, img_size=256, vae_stride=16, patch_size=1, encoder_embed_dim=1024, encoder_depth=16,
                 encoder_num_heads=16, decoder_embed_dim=1024, decoder_depth=16, decoder_num_heads=16, mlp_ratio=4.0,
                 vae_embed_dim=16, class_num=1000, buffer_size=64, diffloss_d=3, diffloss_w=1024):
        super().__init__()
        self.vae_embed_dim, self.patch_size = vae_embed_dim, patch_size
        self.seq_h = self.seq_w = img_size // vae_stride // patch_size
        self.seq_len = self.seq_h * self.seq_w
        self.token_embed_dim = vae_embed_dim * patch_size**2
        self.buffer_size = buffer_size
        self.class_emb = nn.Embedding(class_num, encoder_embed_dim)
        self.fake_latent = nn.Parameter(torch.zeros(1, encoder_embed_dim))
        self.z_proj = nn.Linear(self.token_embed_dim, encoder_embed_dim)
        self.z_proj_ln = nn.LayerNorm(encoder_embed_dim, eps=1e-6)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len + buffer_size, encoder_embed_dim))
        self.encoder_blocks = nn.ModuleList(Block(encoder_embed_dim, encoder_num_heads, mlp_ratio)
                                            for _ in range(encoder_depth))
        self.encoder_norm = nn.LayerNorm(encoder_embed_dim, eps=1e-6)
        self.decoder_embed = nn.Linear(encoder_embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len + buffer_size, decoder_embed_dim))
        self.decoder_blocks = nn.ModuleList(Block(decoder_embed_dim, decoder_num_heads, mlp_ratio)
                                            for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len, decoder_embed_dim))
        self.diffloss = DiffLoss(self.token_embed_dim, decoder_embed_dim, diffloss_d, diffloss_w)

    @classmethod
    def from_size(cls, size: str, **kwargs) -> "MAR":
        if size not in SIZES:
            raise ValueError(f"`size` must be one of {tuple(SIZES)}, got {size!r}.")
        s = SIZES[size]
        return cls(encoder_embed_dim=s["width"], encoder_depth=s["depth"], encoder_num_heads=s["heads"],
                   decoder_embed_dim=s["width"], decoder_depth=s["depth"], decoder_num_heads=s["heads"],
                   diffloss_d=s["diffloss_d"], diffloss_w=s["diffloss_w"], **kwargs)

    def encode(self, tokens, mask, class_embedding):
        """MAE encoder on the visible tokens plus the class buffer (masked tokens are dropped)."""
        x = self.z_proj(tokens)
        b, _, d = x.shape
        x = torch.cat([torch.zeros(b, self.buffer_size, d, device=x.device, dtype=x.dtype), x], dim=1)
        keep = torch.cat([torch.ones(b, self.buffer_size, device=x.device, dtype=torch.bool), ~mask.bool()], dim=1)
        x[:, : self.buffer_size] = class_embedding.unsqueeze(1)
        x = self.z_proj_ln(x + self.encoder_pos_embed_learned)
        x = x[keep].reshape(b, -1, d)
        for block in self.encoder_blocks:
            x = block(x)
        return self.encoder_norm(x)

    def decode(self, x, mask):
        """MAE decoder: masked positions get `mask_token`; returns one condition vector per token."""
        x = self.decoder_embed(x)
        b = x.shape[0]
        keep = torch.cat([torch.ones(b, self.buffer_size, device=x.device, dtype=torch.bool), ~mask.bool()], dim=1)
        padded = self.mask_token.to(x.dtype).repeat(b, keep.shape[1], 1)
        padded[keep] = x.reshape(-1, x.shape[-1])
        x = padded + self.decoder_pos_embed_learned
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_norm(x)[:, self.buffer_size:]
        return x + self.diffusion_pos_embed_learned

    def unpatchify(self, tokens):
        """[B, seq_len, C·p²] → [B, C, h·p, w·p]."""
        b, p, c = tokens.shape[0], self.patch_size, self.vae_embed_dim
        x = tokens.reshape(b, self.seq_h, self.seq_w, c, p, p)
        return torch.einsum("nhwcpq->nchpwq", x).reshape(b, c, self.seq_h * p, self.seq_w * p)
