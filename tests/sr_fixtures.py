"""Random SR weights in the exact official .pkl layouts, and the official inference procedure written with
diffusers + peft (the way cswry/OSEDiff and csslc/PiSA-SR run it: adapters added and left unmerged, parameters
copied by name, DDPM x0 at t = 999 / x0 = z − ε at t = 1, AdaIN against the upscaled input)."""

from __future__ import annotations

import torch
from peft import LoraConfig

# the official module selection: parameter names (no bias/norm) matching these patterns, split by position
PATTERNS = ["to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_in", "conv_shortcut", "conv_out",
            "proj_out", "proj_in", "ff.net.2", "ff.net.0.proj"]


def official_unet_modules(unet) -> dict[str, list[str]]:
    parts = {"encoder": [], "decoder": [], "others": []}
    for n, _ in unet.named_parameters():
        if "bias" in n or "norm" in n:
            continue
        for pattern in PATTERNS:
            if pattern in n:
                name = n.replace(".weight", "")
                if "down_blocks" in n or "conv_in" in n:
                    parts["encoder"].append(name)
                elif "up_blocks" in n or "conv_out" in n:
                    parts["decoder"].append(name)
                else:
                    parts["others"].append(name)
                break
    return parts


def official_vae_modules(vae) -> list[str]:
    out = []
    for n, _ in vae.named_parameters():
        if "bias" in n or "norm" in n:
            continue
        for pattern in PATTERNS:
            if pattern in n and "encoder" in n:
                out.append(n.replace(".weight", ""))
                break
        if "quant_conv" in n and "post_quant_conv" not in n:
            out.append(n.replace(".weight", ""))
    return out


def _randomize_lora(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)  # gaussian init leaves B = 0: randomise both


def make_osediff_pkl(unet, vae, path, rank=4, seed=0):
    """An osediff.pkl with random LoRAs and a trained (perturbed) conv_in, in the official dict layout."""
    import copy

    unet, vae = copy.deepcopy(unet), copy.deepcopy(vae)
    parts = official_unet_modules(unet)
    for part, modules in parts.items():
        unet.add_adapter(LoraConfig(r=rank, init_lora_weights="gaussian", target_modules=modules), f"default_{part}")
    vae_modules = official_vae_modules(vae)
    vae.add_adapter(LoraConfig(r=rank, init_lora_weights="gaussian", target_modules=vae_modules), "default_encoder")
    _randomize_lora(unet, seed)
    _randomize_lora(vae, seed + 1)
    with torch.no_grad():
        unet.conv_in.base_layer.weight.add_(0.01)
    sd = {
        "vae_lora_encoder_modules": vae_modules + vae_modules[:3],  # the official list holds duplicates
        "unet_lora_encoder_modules": parts["encoder"], "unet_lora_decoder_modules": parts["decoder"],
        "unet_lora_others_modules": parts["others"], "rank_unet": rank, "rank_vae": rank,
        "state_dict_unet": {n: p.detach().clone() for n, p in unet.named_parameters() if "lora" in n or "conv_in" in n},
        "state_dict_vae": {n: p.detach().clone() for n, p in vae.named_parameters() if "lora" in n},
    }
    torch.save(sd, path)
    return sd


def make_pisa_pkl(unet, path, rank=4, seed=0):
    import copy

    unet = copy.deepcopy(unet)
    parts = official_unet_modules(unet)
    sd = {}
    for kind in ("pix", "sem"):
        for part, modules in parts.items():
            unet.add_adapter(LoraConfig(r=rank, init_lora_weights="gaussian", target_modules=modules),
                             f"default_{part}_{kind}")
            sd[f"unet_lora_{part}_modules_{kind}"] = modules
        sd[f"lora_rank_unet_{kind}"] = rank
    _randomize_lora(unet, seed)
    sd["state_dict_unet"] = {n: p.detach().clone() for n, p in unet.named_parameters() if "lora" in n}
    torch.save(sd, path)
    return sd


def _official_unet(unet, sd, kinds, weights=None):
    """The UNet as the official code holds it: every adapter added, parameters copied, listed adapters active."""
    import copy

    unet = copy.deepcopy(unet)
    names = []
    for kind in kinds:
        suffix = "" if kind is None else f"_{kind}"
        for part in ("encoder", "decoder", "others"):
            key = f"unet_lora_{part}_modules{suffix}"
            rank = sd["rank_unet"] if kind is None else sd[f"lora_rank_unet_{kind}"]
            unet.add_adapter(LoraConfig(r=rank, init_lora_weights="gaussian", target_modules=sd[key]),
                             f"default_{part}{suffix}")
            names.append(f"default_{part}{suffix}")
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if n in sd["state_dict_unet"]:
                p.copy_(sd["state_dict_unet"][n])
    unet.set_adapters(names, weights=weights)
    return unet


def official_sr(components, sd, method, x, generator, lambdas=(1.0, 1.0), prompt_embeds=None):
    """Latent-level official procedure on the pre-processed input x in [-1, 1]; returns the image in [0, 1]
    after AdaIN, float64 formulas for x0."""
    import copy

    from swiftstep.core.lora_sr import adain_color_fix

    vae, unet = copy.deepcopy(components["vae"]), components["unet"]
    sf = vae.config.scaling_factor
    if method == "osediff":
        vae.add_adapter(LoraConfig(r=sd["rank_vae"], init_lora_weights="gaussian",
                                   target_modules=sorted(set(sd["vae_lora_encoder_modules"]))), "default_encoder")
        with torch.no_grad():
            for n, p in vae.named_parameters():
                if n in sd["state_dict_vae"]:
                    p.copy_(sd["state_dict_vae"][n])
        vae.set_adapters(["default_encoder"])
    with torch.no_grad():
        z = vae.encode(x).latent_dist.sample(generator) * sf
        if method == "osediff":
            net = _official_unet(unet, sd, [None])
            eps = net(z, 999, encoder_hidden_states=prompt_embeds).sample.double()
            ab = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0)[999]
            x0 = (z.double() - (1 - ab).sqrt() * eps) / ab.sqrt()  # DDPM step at t = 999 to ᾱ_prev = 1
        else:
            both = _official_unet(unet, sd, ["pix", "sem"])
            eps_ps = both(z, 1, encoder_hidden_states=prompt_embeds).sample.double()
            if lambdas == (1.0, 1.0):
                eps = eps_ps
            else:
                pix = _official_unet(unet, sd, ["pix", "sem"], weights=[1.0] * 3 + [0.0] * 3)
                eps_pix = pix(z, 1, encoder_hidden_states=prompt_embeds).sample.double()
                eps = lambdas[0] * eps_pix + lambdas[1] * (eps_ps - eps_pix)  # PiSA-SR adjustable
            x0 = z.double() - eps
        out = vae.decode((x0 / sf).float()).sample.clamp(-1, 1)
    return adain_color_fix((out + 1) / 2, (x + 1) / 2).clamp(0, 1)
