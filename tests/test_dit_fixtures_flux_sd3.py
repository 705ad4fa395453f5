"""The tiny FLUX.1-schnell and SD3.5-Large-Turbo fixtures: the stock pipelines run on them, they survive diffusers'
own writers and readers, and the prompt reaches the model through every tokenizer."""

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

from .dit_fixtures.flux_sd3 import build_flux, build_sd3
from .tolerance import assert_close_to_scale

FAMILIES = {"flux": (build_flux, FluxPipeline, "prompt_2"), "sd3": (build_sd3, StableDiffusion3Pipeline, "prompt_3")}
PX = 32  # smallest multiple of 16 (VAE 8× and 2×2 patches)
T5_TOKENS = 32  # the pipelines' default 512/256 pad tokens only cost time (the T5 tokenizer is per character)


def generate(pipe, prompt="a red cube", **kwargs) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, height=PX, width=PX, num_inference_steps=2, guidance_scale=0.0, output_type="np",
                max_sequence_length=T5_TOKENS, generator=torch.Generator().manual_seed(0), **kwargs).images


def modules(pipe) -> dict:
    return {name: c for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}


@pytest.mark.parametrize("family", FAMILIES)
def test_stock_pipeline_runs_and_builds_are_seeded(family):
    build, _, _ = FAMILIES[family]
    pipe = build()
    image = generate(pipe)
    assert image.shape == (1, PX, PX, 3) and np.isfinite(image).all()
    again, other = modules(build()), modules(build(seed=1))
    for name, module in modules(pipe).items():
        weights = module.state_dict()
        assert all(torch.equal(w, again[name].state_dict()[k]) for k, w in weights.items()), name
        assert not all(torch.equal(w, other[name].state_dict()[k]) for k, w in weights.items()), name


@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_round_trip(family, tmp_path):
    """Weights and token ids come back exactly; the image to float32 order only, since weights read through mmap
    sit at other alignments than fresh ones and the CPU kernels then sum in another order."""
    build, cls, _ = FAMILIES[family]
    pipe = build()
    pipe.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path)
    for name, module in modules(pipe).items():
        back = modules(loaded)[name].state_dict()
        assert module.state_dict().keys() == back.keys(), name
        assert all(torch.equal(w, back[k]) for k, w in module.state_dict().items()), name
    for name in (n for n in pipe.components if n.startswith("tokenizer")):
        prompt = "A red cube, 3 spheres!"
        assert getattr(loaded, name)(prompt).input_ids == getattr(pipe, name)(prompt).input_ids, name
    assert_close_to_scale(generate(loaded), generate(pipe), what=f"{family} image after save/load")


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_reaches_the_model(family):
    build, _, t5_prompt = FAMILIES[family]
    pipe = build()
    image = generate(pipe)
    assert np.abs(generate(pipe, "a blue sphere") - image).max() > 1e-3
    # the T5 prompt alone: the T5 tokenizer and encoder are live
    assert np.abs(generate(pipe, **{t5_prompt: "a blue sphere"}) - image).max() > 1e-3
