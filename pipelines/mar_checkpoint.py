"""Official MAR checkpoints → swiftstep: `checkpoint-last.pth` (`model_ema`) and the KL-16 tokenizer `kl16.ckpt`.

The KL-16 VAE is LDM's KL autoencoder (ch 128, ch_mult (1, 1, 2, 2, 4), 2 res blocks, 16 latent channels,
attention after each res block at the lowest encoder level and in both mid blocks), which diffusers'
`AutoencoderKL` expresses exactly with an `AttnDownEncoderBlock2D` last; `convert_kl16` maps the key names.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..core import weight_files

KL16_SCALE = 0.2325  # MAR: tokens = posterior.sample() · 0.2325
KL16_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2, norm_num_groups=32, sample_size=256,
    block_out_channels=(128, 128, 256, 256, 512),
    down_block_types=("DownEncoderBlock2D",) * 4 + ("AttnDownEncoderBlock2D",),
    up_block_types=("UpDecoderBlock2D",) * 5, scaling_factor=KL16_SCALE,
)

_RESNET = {"nin_shortcut": "conv_shortcut"}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def read_checkpoint(path: str | Path, key: str, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No {what} checkpoint at {path.resolve()}.")
    ckpt = weight_files.read_torch_file(path, f"a {what} checkpoint holding '{key}'")
    if isinstance(ckpt, dict) and key in ckpt:
        return ckpt[key]
    raise ValueError(f"{path.name}: expected a {what} checkpoint holding '{key}', found keys "
                     f"{sorted(ckpt)[:6] if isinstance(ckpt, dict) else type(ckpt).__name__}.")


def convert_kl16(sd: dict, levels: int = 5) -> dict:
    """LDM key names (encoder.down.i.block.j, mid.attn_1.q, …) → diffusers AutoencoderKL names."""
    out = {}
    for key, value in sd.items():
        new = key
        m = re.match(r"(encoder)\.down\.(\d+)\.(block|attn|downsample)\.?(\d*)\.?(.*)", key)
        u = re.match(r"(decoder)\.up\.(\d+)\.(block|attn|upsample)\.?(\d*)\.?(.*)", key)
        mid = re.match(r"(encoder|decoder)\.mid\.(block_1|block_2|attn_1)\.(.*)", key)
        if m or u:
            part, level, kind, idx, rest = (m or u).groups()
            level = int(level) if m else levels - 1 - int(level)
            blocks = "down_blocks" if m else "up_blocks"
            if kind == "block":
                head, _, tail = rest.partition(".")
                new = f"{part}.{blocks}.{level}.resnets.{idx}.{_RESNET.get(head, head)}.{tail}"
            elif kind == "attn":
                head, _, tail = rest.partition(".")
                new = f"{part}.{blocks}.{level}.attentions.{idx}.{_ATTN[head]}.{tail}"
            else:
                sampler = "downsamplers" if m else "upsamplers"
                new = f"{part}.{blocks}.{level}.{sampler}.0.{idx}.{rest}".replace("..", ".").rstrip(".")
        elif mid:
            part, name, rest = mid.groups()
            head, _, tail = rest.partition(".")
            if name == "attn_1":
                new = f"{part}.mid_block.attentions.0.{_ATTN[head]}.{tail}"
            else:
                new = f"{part}.mid_block.resnets.{0 if name == 'block_1' else 1}.{_RESNET.get(head, head)}.{tail}"
        elif key.startswith(("encoder.norm_out", "decoder.norm_out")):
            new = key.replace("norm_out", "conv_norm_out")
        if ".attentions." in new and value.dim() == 4:  # LDM attention projections are 1×1 convolutions
            value = value[:, :, 0, 0]
        out[new] = value
    return out
