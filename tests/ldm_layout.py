"""Write diffusers components as one checkpoint in the original Stability (LDM/SGM) key layout.

Test-only: it produces the files users download (`sd_turbo.safetensors`, `sd_xl_base_1.0.safetensors`) from our
random-weight models, so `from_single_file` is exercised through diffusers' real converters. The layout is the
published one (CompVis/Stability `model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*`,
`conditioner.embedders.{0,1}.*`); the mapping below is written from those key names.
"""

from __future__ import annotations

import torch
from safetensors.torch import save_file

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RESNET[head]}.{tail}"


def unet_to_ldm(state: dict, layers_per_block: int) -> dict:
    out = {}
    n = layers_per_block
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "conv_in":
            new = "input_blocks.0.0." + parts[1]
        elif parts[0] == "time_embedding":
            new = {"linear_1": "time_embed.0", "linear_2": "time_embed.2"}[parts[1]] + "." + parts[2]
        elif parts[0] == "add_embedding":
            new = {"linear_1": "label_emb.0.0", "linear_2": "label_emb.0.2"}[parts[1]] + "." + parts[2]
        elif parts[0] == "conv_norm_out":
            new = "out.0." + parts[1]
        elif parts[0] == "conv_out":
            new = "out.2." + parts[1]
        elif parts[0] == "down_blocks":
            i, kind = int(parts[1]), parts[2]
            rest = ".".join(parts[4:])
            if kind == "downsamplers":
                new = f"input_blocks.{(i + 1) * (n + 1)}.0.op." + ".".join(parts[5:])
            else:
                j = int(parts[3])
                idx = 1 + i * (n + 1) + j
                new = f"input_blocks.{idx}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{idx}.1.{rest}"
        elif parts[0] == "mid_block":
            kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            new = f"middle_block.{2 * j}.{_resnet(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
        elif parts[0] == "up_blocks":
            i, kind = int(parts[1]), parts[2]
            has_attn = any(k.startswith(f"up_blocks.{i}.attentions.") for k in state)
            if kind == "upsamplers":
                new = f"output_blocks.{i * (n + 1) + n}.{2 if has_attn else 1}.conv." + ".".join(parts[5:])
            else:
                j, rest = int(parts[3]), ".".join(parts[4:])
                idx = i * (n + 1) + j
                new = f"output_blocks.{idx}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{idx}.1.{rest}"
        else:
            raise KeyError(key)
        out["model.diffusion_model." + new] = value
    return out


def vae_to_ldm(state: dict, num_blocks: int, prefix: str = "first_stage_model.") -> dict:
    out = {}
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    for key, value in state.items():
        new = key
        for i in range(num_blocks):
            new = new.replace(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.")
            new = new.replace(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.")
            new = new.replace(f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{num_blocks - 1 - i}.block.")
            new = new.replace(f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{num_blocks - 1 - i}.upsample.")
        new = new.replace("mid_block.resnets.0.", "mid.block_1.").replace("mid_block.resnets.1.", "mid.block_2.")
        new = new.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        if "mid_block.attentions.0." in new:
            head, rest = new.split("mid_block.attentions.0.")
            name, _, param = rest.rpartition(".")
            new = f"{head}mid.attn_1.{attn[name]}.{param}"
        elif ".attentions." in new:  # attention inside an encoder level (MAR's KL-16 lowest level)
            level_part, rest = new.split(".attentions.")
            j, _, rest = rest.partition(".")
            name, _, param = rest.rpartition(".")
            level = level_part.rsplit(".", 1)[-1]
            new = f"encoder.down.{level}.attn.{j}.{attn[name]}.{param}"
        if "attn" in new and value.ndim == 2:  # LDM keeps the attention projections as 1×1 convolutions
            value = value[:, :, None, None]
        out[prefix + new] = value
    return out


def clip_to_ldm(state: dict, prefix: str) -> dict:
    """HF CLIP-L layout under `prefix` (`cond_stage_model.transformer.` / `conditioner.embedders.0.transformer.`)."""
    return {prefix + "text_model." + k.removeprefix("text_model."): v for k, v in state.items()}


def openclip_to_ldm(state: dict, prefix: str, num_layers: int) -> dict:
    """OpenCLIP layout (`cond_stage_model.model.` for SD2, `conditioner.embedders.1.model.` for SDXL)."""
    s = {k.removeprefix("text_model."): v for k, v in state.items()}
    out = {
        "token_embedding.weight": s["embeddings.token_embedding.weight"],
        "positional_embedding": s["embeddings.position_embedding.weight"],
        "ln_final.weight": s["final_layer_norm.weight"],
        "ln_final.bias": s["final_layer_norm.bias"],
    }
    hidden = s["final_layer_norm.weight"].shape[0]
    # OpenCLIP applies x @ text_projection; SD2 files carry it even though SD2 does not use it.
    out["text_projection"] = s["text_projection.weight"].T.contiguous() if "text_projection.weight" in s \
        else torch.eye(hidden)
    for i in range(num_layers):
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            out[dst + f"attn.in_proj_{p}"] = torch.cat(
                [s[src + f"self_attn.{x}_proj.{p}"] for x in ("q", "k", "v")], dim=0)
            out[dst + f"attn.out_proj.{p}"] = s[src + f"self_attn.out_proj.{p}"]
            out[dst + f"ln_1.{p}"] = s[src + f"layer_norm1.{p}"]
            out[dst + f"ln_2.{p}"] = s[src + f"layer_norm2.{p}"]
            out[dst + f"mlp.c_fc.{p}"] = s[src + f"mlp.fc1.{p}"]
            out[dst + f"mlp.c_proj.{p}"] = s[src + f"mlp.fc2.{p}"]
    return {prefix + k: v for k, v in out.items()}


def save_single_file(pipe, path, dtype=None) -> None:
    """One `.safetensors` in the original layout from a pipeline's unet/vae/text encoder(s)."""
    sd = {}
    sd.update(unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config.layers_per_block))
    sd.update(vae_to_ldm(pipe.vae.state_dict(), len(pipe.vae.config.block_out_channels)))
    te = pipe.text_encoder
    if pipe.text_encoder_2 is not None:
        sd.update(clip_to_ldm(te.state_dict(), "conditioner.embedders.0.transformer."))
        te2 = pipe.text_encoder_2
        sd.update(openclip_to_ldm(te2.state_dict(), "conditioner.embedders.1.model.", te2.config.num_hidden_layers))
    elif te.config.hidden_act == "gelu":  # SD2.x: OpenCLIP ViT-H
        n = te.config.num_hidden_layers
        sd.update(openclip_to_ldm(te.state_dict(), "cond_stage_model.model.", n))
        if n == 23:  # real SD2 files hold all 24 OpenCLIP blocks; diffusers drops the last, ComfyUI skips it
            last = "cond_stage_model.model.transformer.resblocks.22."
            sd.update({k.replace(".resblocks.22.", ".resblocks.23."): v.clone() for k, v in sd.items()
                       if k.startswith(last)})
    else:
        sd.update(clip_to_ldm(te.state_dict(), "cond_stage_model.transformer."))
    save_file({k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in sd.items()}, str(path))
