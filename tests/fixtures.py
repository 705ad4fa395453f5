"""Tiny random-weight SD1.x / SD2.x (ε and v) / SDXL models, written with the real writers, built once per session."""

from __future__ import annotations

from pathlib import Path

import torch

from swiftstep.pipelines import OneStepPipeline
from swiftstep.tiny_models import build_components

from .ldm_layout import save_single_file


def write_model(family: str, root: Path) -> dict[str, Path]:
    """{'folder': diffusers folder (save_pretrained), 'single_file': original-layout .safetensors}."""
    folder = root / f"{family}-folder"
    pipe = OneStepPipeline(**build_components(family))
    pipe.save_pretrained(folder)
    single = root / f"{family}.safetensors"
    save_single_file(pipe, single)
    return {"folder": folder, "single_file": single}


def stock_pipeline(pipe: OneStepPipeline, scheduler):
    """The stock diffusers pipeline for the same modules: StableDiffusionPipeline or StableDiffusionXLPipeline."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    c = pipe.components
    if pipe.family == "sdxl":
        return StableDiffusionXLPipeline(vae=c["vae"], text_encoder=c["text_encoder"], text_encoder_2=c["text_encoder_2"],
                                         tokenizer=c["tokenizer"], tokenizer_2=c["tokenizer_2"], unet=c["unet"],
                                         scheduler=scheduler)
    return StableDiffusionPipeline(vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"],
                                   unet=c["unet"], scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def load_pipes(models: dict, families=("sd1", "sd2", "sdxl")) -> dict:
    """family → OneStepPipeline from the session's tiny folders, progress bars off (one set per test module, so a
    module's changes to its pipelines stay in it)."""
    out = {f: OneStepPipeline.from_pretrained(models[f]["folder"]) for f in families}
    for p in out.values():
        p.set_progress_bar_config(disable=True)
    return out
