"""OSEDiff / PiSA-SR / DLoRAL weight files: which layout a file holds, reading it, and its LoRA layers by module name.

Shared by `pipelines.OneStepSRPipeline` / `VideoSRPipeline` (peft adapters on diffusers modules) and the ComfyUI node
`SwiftStepUpscaleV2` (patches on ComfyUI's own MODEL/VAE), which must not need diffusers: nothing here imports it.
Module names are diffusers' (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`), as the official files
store them; tensor names are peft's (`<module>.lora_A.default_encoder_pix.weight`).

LoRA strength: the official code builds `LoraConfig(r=4)` without `lora_alpha`, so peft's default alpha 8 applies
and every ΔW is (8/r)·B·A = 2·B·A. A loader that assumes alpha = rank halves the effect.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import weight_files

LORA_ALPHA = 8  # peft's default, which the official LoraConfig(r=4, …) inherits: scale 8/4 = 2
UNET_PARTS = ("encoder", "decoder", "others")
SD_PARTS = ("unet", "vae", "bpp")  # state_dict_<part> entries of the official files
LAYOUTS = {
    "osediff": "OSEDiff .pkl: vae_lora_encoder_modules, unet_lora_{encoder,decoder,others}_modules, rank_unet, "
               "rank_vae, state_dict_unet (LoRA + full conv_in), state_dict_vae",
    "pisa-sr": "PiSA-SR .pkl: unet_lora_{encoder,decoder,others}_modules_{pix,sem}, lora_rank_unet_{pix,sem}, "
               "state_dict_unet",
    "dloral": "DLoRAL model.pkl: unet_lora_{encoder,decoder,others}_modules_{quality,consistency}, "
              "lora_rank_unet_{quality,consistency}, state_dict_unet (the whole UNet, 8-channel conv_in), "
              "state_dict_bpp (the CFR module)",
    "swiftstep-sr": "swiftstep safetensors export (save_sr_weights): metadata `swiftstep_sr` + unet./vae./bpp. "
                    "tensors",
}
SAFETENSORS_WHAT = "SR weights exported by save_sr_weights (metadata `swiftstep_sr` + unet./vae./bpp. tensors)"
PICKLE_WHAT = "SR weights (the official osediff.pkl, pisa_sr.pkl or DLoRAL model.pkl: a dict of module lists and " \
              "state dicts)"
# LoRA groups of each image method: (state dict part, module-list suffix, adapter-name suffix, rank key)
LORA_GROUPS = {
    ("osediff", "unet"): ("unet", "", "", "rank_unet"),
    ("osediff", "vae"): ("vae", None, "", "rank_vae"),
    ("pisa-sr", "pix"): ("unet", "_pix", "_pix", "lora_rank_unet_pix"),
    ("pisa-sr", "sem"): ("unet", "_sem", "_sem", "lora_rank_unet_sem"),
}


def detect_layout(sd: dict) -> str:
    if "vae_lora_encoder_modules" in sd and "state_dict_unet" in sd:
        return "osediff"
    if "unet_lora_encoder_modules_pix" in sd and "state_dict_unet" in sd:
        return "pisa-sr"
    if "unet_lora_encoder_modules_quality" in sd and "state_dict_unet" in sd:
        return "dloral"
    known = "\n  ".join(f"{k}: {v}" for k, v in LAYOUTS.items())
    raise ValueError(f"Unknown SR weights layout (top-level keys {sorted(sd)[:8]}); known layouts:\n  {known}")


def read_sr_weights(path: str | Path) -> dict:
    """The official .pkl (torch.load, weights_only) or our safetensors export, as the official dict layout."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No SR weights file at {path.resolve()}.")
    if path.suffix == ".safetensors":
        with weight_files.open_safetensors(path, SAFETENSORS_WHAT) as f:
            meta = (f.metadata() or {}).get("swiftstep_sr")
            if meta is None:
                raise ValueError(f"{path.name}: a safetensors file without `swiftstep_sr` metadata; expected one "
                                 f"written by save_sr_weights, or an official osediff.pkl / pisa_sr.pkl.")
            sd = json.loads(meta)
            for part in SD_PARTS:
                keys = [k for k in f.keys() if k.startswith(part + ".")]
                if keys:
                    sd[f"state_dict_{part}"] = {k[len(part) + 1:]: f.get_tensor(k) for k in keys}
        return sd
    # memory-mapped: a DLoRAL model.pkl holds a whole UNet; tensors are read when copied into the model
    sd = weight_files.read_torch_file(path, PICKLE_WHAT, mmap=True)
    if not isinstance(sd, dict):
        raise ValueError(f"{path.name}: expected a dict of SR weights, found {type(sd).__name__}.")
    return sd


def sr_method(path: str | Path) -> str:
    """Which SR method a weights file holds ("osediff", "pisa-sr", "dloral"), without reading its tensors."""
    path = Path(path)
    if path.suffix == ".safetensors" and path.is_file():
        with weight_files.open_safetensors(path, SAFETENSORS_WHAT) as f:
            meta = (f.metadata() or {}).get("swiftstep_sr")
        if meta is not None:
            return json.loads(meta).get("method") or detect_layout(json.loads(meta))
    sd = read_sr_weights(path)
    return sd.get("method") or detect_layout(sd)


def expected_keys(sd: dict, method: str) -> dict[str, set[str]]:
    """Parameter names the file must hold, per model, from its own module lists (peft's naming)."""
    unet, vae = set(), set()
    kinds = [""] if method == "osediff" else ["_pix", "_sem"]
    for kind in kinds:
        for part in UNET_PARTS:
            for m in sd[f"unet_lora_{part}_modules{kind}"]:
                unet |= {f"{m}.lora_A.default_{part}{kind}.weight", f"{m}.lora_B.default_{part}{kind}.weight"}
    if method == "osediff":
        unet |= {"conv_in.base_layer.weight", "conv_in.base_layer.bias"}
        for m in set(sd["vae_lora_encoder_modules"]):
            vae |= {f"{m}.lora_A.default_encoder.weight", f"{m}.lora_B.default_encoder.weight"}
    return {"unet": unet, "vae": vae}


def expected_modules(sd: dict, method: str) -> dict[str, set[str]]:
    """Module names (diffusers') the file's parameters belong to, per model."""
    return {part: {k.split(".lora_")[0].removesuffix(".base_layer.weight").removesuffix(".base_layer.bias")
                   for k in keys}
            for part, keys in expected_keys(sd, method).items()}


def check_keys(sd: dict, method: str, source: str) -> None:
    """Every stored parameter belongs to a listed module and every listed module's parameters are stored."""
    want = expected_keys(sd, method)
    for part in ("unet", "vae"):
        have = set(sd.get(f"state_dict_{part}", {}))
        if have - want[part]:
            extra = sorted(have - want[part])
            raise ValueError(f"{source}: {len(extra)} of {len(have)} {part.upper()} keys match no LoRA module "
                             f"listed in the file, e.g. {extra[:2]}.")
        if want[part] - have:
            raise ValueError(f"{source}: the file lacks {len(want[part] - have)} {part.upper()} parameters, e.g. "
                             f"{sorted(want[part] - have)[:2]}.")


def image_method(sd: dict, source: str, dloral_hint: str) -> str:
    """"osediff" or "pisa-sr" for an image-SR file; DLoRAL's video weights are refused with `dloral_hint`."""
    method = sd.get("method") or detect_layout(sd)
    if method == "dloral":
        raise ValueError(f"{source} is a DLoRAL video SR checkpoint (quality/consistency adapters, CFR module): "
                         f"{dloral_hint}")
    if method not in ("osediff", "pisa-sr"):
        detect_layout({})
    return method


def lora_layers(sd: dict, method: str, group: str,
                source: str = "SR weights") -> list[tuple[str, torch.Tensor, torch.Tensor, int]]:
    """(module, A, B, rank) of every LoRA layer of a group: ("osediff", "unet" | "vae"), ("pisa-sr", "pix" | "sem").
    ΔW = (LORA_ALPHA / rank)·B·A (`core.lora_sr.lora_delta`); A is [r, in] or [r, in, kh, kw], B [out, r(, 1, 1)].
    Call `check_keys` first."""
    part, suffix, adapter, rank_key = LORA_GROUPS[(method, group)]
    rank = int(sd[rank_key])
    state = sd[f"state_dict_{part}"]
    if part == "vae":  # the official list holds duplicates
        named = [(m, "encoder") for m in sorted(set(sd["vae_lora_encoder_modules"]))]
    else:
        named = [(m, p) for p in UNET_PARTS for m in sd[f"unet_lora_{p}_modules{suffix}"]]
    layers = []
    for module, p in named:
        a = state[f"{module}.lora_A.default_{p}{adapter}.weight"]
        b = state[f"{module}.lora_B.default_{p}{adapter}.weight"]
        if a.shape[0] != rank or b.shape[1] != rank:
            raise ValueError(f"{source}: LoRA `{module}` has rank {a.shape[0]} (A) / {b.shape[1]} (B); the file "
                             f"declares {rank_key} = {rank}.")
        layers.append((module, a, b, rank))
    return layers
