"""Tiny DLoRAL models and random weights in the official model.pkl layout, and float64 references written from the
DLoRAL equations (flow warp as explicit bilinear sampling, the cross-frame absolute attention without chunks, the
8-channel step with unmerged LoRAs as the official script runs them)."""

from __future__ import annotations

import copy
import math

import torch
from diffusers import AutoencoderKL
from peft import LoraConfig

from swiftstep.models.dloral import CrossFrameRetrieval
from swiftstep.tiny_models import build_components

from .sr_fixtures import _randomize_lora, official_unet_modules

# Unused layers of the official CFR_model that its state_dict_bpp carries (a few of them, with their real names)
UNUSED_BPP = {"feat_extract.main.0.weight": (64, 4, 3, 3), "feat_extract.main.0.bias": (64,),
              "weight_predict.main.2.0.conv1.weight": (64, 64, 3, 3), "conv_hr.weight": (64, 64, 3, 3),
              "conv_last.bias": (4,), "reconstruction_feat.main.0.weight": (64, 64, 3, 3)}


def video_components(seed=0) -> dict:
    """SD2-shaped tiny components with an 8× VAE (DLoRAL aligns 1/8-scale flow with the latent) and the UNet's
    attention at half resolution (frames are ≥ 512 px, so latents are ≥ 64²: keep CPU tests fast)."""
    from diffusers import UNet2DConditionModel

    comps = build_components("sd2", seed=seed)
    torch.manual_seed(seed + 1)
    comps["vae"] = AutoencoderKL(latent_channels=4, block_out_channels=(4, 4, 8, 8), layers_per_block=1,
                                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                                 norm_num_groups=4, sample_size=64, mid_block_add_attention=False).eval()
    comps["unet"] = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=64,
                                         down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                         up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                         cross_attention_dim=32, use_linear_projection=True).eval()
    return {k: comps[k] for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}


def tiny_cfr(seed=0, embed_dim=8, heads=2) -> CrossFrameRetrieval:
    torch.manual_seed(seed)
    cfr = CrossFrameRetrieval(embed_dim=embed_dim, heads=heads).eval()
    with torch.no_grad():  # SPyNet's flow grows with depth; keep the random flow to a few pixels
        for p in cfr.spynet.parameters():
            p.mul_(0.3)
        cfr.cross_attn_module.threshold_fc.bias.fill_(-0.5)  # some similarities pass the threshold
    return cfr


def official_unet(unet, rank_q=4, rank_c=4, seed=0):
    """The UNet as DLoRAL's Generator_eval builds it: 8-channel conv_in (both halves the SD weights), six adapters
    (default_{encoder,decoder,others}_{quality,consistency}) on the official module selection, random LoRAs."""
    unet = copy.deepcopy(unet)
    conv_in = torch.nn.Conv2d(8, unet.conv_in.out_channels, 3, padding=1)
    with torch.no_grad():
        conv_in.weight[:, :4] = unet.conv_in.weight
        conv_in.weight[:, 4:] = unet.conv_in.weight
        conv_in.bias.copy_(unet.conv_in.bias)
    unet.conv_in = conv_in
    parts = official_unet_modules(unet)
    names = []
    for kind, rank in (("quality", rank_q), ("consistency", rank_c)):
        for part, modules in parts.items():
            unet.add_adapter(LoraConfig(r=rank, init_lora_weights="gaussian", target_modules=modules),
                             f"default_{part}_{kind}")
            names.append(f"default_{part}_{kind}")
    _randomize_lora(unet, seed)
    return unet, parts, names


def make_dloral_pkl(unet, cfr, path, rank_q=4, rank_c=4, seed=0) -> dict:
    """A model.pkl in the official layout (Generator.save_model): module lists, ranks, the whole UNet state_dict
    (peft names, base_layer weights included) and the CFR's state_dict with its unused layers."""
    net, parts, _ = official_unet(unet, rank_q, rank_c, seed)
    g = torch.Generator().manual_seed(seed + 7)
    bpp = {k: v.clone() for k, v in cfr.state_dict().items()}
    bpp.update({k: torch.randn(shape, generator=g) for k, shape in UNUSED_BPP.items()})
    sd = {f"unet_lora_{part}_modules_{kind}": parts[part] for part in parts for kind in ("quality", "consistency")}
    sd.update(lora_rank_unet_quality=rank_q, lora_rank_unet_consistency=rank_c,
              state_dict_unet={k: v.clone() for k, v in net.state_dict().items()}, state_dict_bpp=bpp)
    torch.save(sd, path)
    return sd


def official_unet_from_pkl(unet, sd, stages="full"):
    """Load a model.pkl as Generator_eval.load_ckpt_from_state_dict does (every UNet parameter copied by name) and
    activate the adapters as test_DLoRAL.py does for `--stages`."""
    net, _, names = official_unet(unet, sd["lora_rank_unet_quality"], sd["lora_rank_unet_consistency"])
    with torch.no_grad():
        for n, p in net.named_parameters():
            p.copy_(sd["state_dict_unet"][n])
    net.set_adapters(names if stages == "full" else [n for n in names if n.endswith("consistency")])
    return net


# ---------------------------------------------------------------- float64 references from the equations
def ref_flow_warp(x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Bilinear sampling of x [N, C, H, W] at (j + u, i + v), zero outside, written out per corner (float64)."""
    x, flow = x.double(), flow.double()
    n, c, h, w = x.shape
    gy, gx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    px, py = gx + flow[..., 0], gy + flow[..., 1]
    x0, y0 = px.floor(), py.floor()
    out = torch.zeros(n, c, h, w, dtype=torch.float64)
    for dx in (0, 1):
        for dy in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            wgt = (1 - (px - xi).abs()) * (1 - (py - yi).abs())
            inside = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)
            idx = (yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)).long().view(n, 1, -1).expand(n, c, -1)
            vals = x.reshape(n, c, -1).gather(2, idx).view(n, c, h, w)
            out += vals * (wgt * inside)[:, None]
    return out


def ref_cross_frame_attention(attn_module, current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """DLoRAL's CrossFrameAbsoluteAttn in float64, the whole HW × HW similarity at once."""
    m = copy.deepcopy(attn_module).double()
    cur, prev = current.double(), previous.double()
    b, _, h, w = cur.shape
    heads, d = m.heads, m.embed_dim
    q = m.query_conv(cur).view(b, heads, d, h * w).permute(0, 1, 3, 2)
    k = m.key_conv(prev).view(b, heads, d, h * w)
    v = m.value_conv(prev).view(b, heads, d, h * w).permute(0, 1, 3, 2)
    sim = q @ k / math.sqrt(d)
    tau = m.threshold_fc(q).squeeze(-1)
    attn = torch.relu((sim - tau[..., None]) / 3000.0)
    out = (attn @ v).permute(0, 1, 3, 2).reshape(b, heads * d, h, w)
    return cur + m.proj_out(out)
