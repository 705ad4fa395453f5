"""The tiny SANA-Sprint fixture runs through the stock diffusers SanaSprintPipeline the way the real checkpoints do:
default 2-step SCM schedule, embedded guidance, complex human instruction, save/load round trip."""

import numpy as np
import pytest
import torch
from diffusers import SanaSprintPipeline

from .dit_fixtures.sana_sprint import (SMALLEST_SIZE, SPRINT_SCHEDULER_CONFIG, SPRINT_TRANSFORMER_OPTIONS,
                                       build_sana_sprint, gemma_tokenizer)


@pytest.fixture(scope="module")
def pipe():
    return build_sana_sprint(seed=0)


def generate(pipe, prompt="a cat on a mat", size=SMALLEST_SIZE, **kwargs):
    """The stock call at the smallest size; binning off so the image is generated at that size (binning would map
    it to 1024², see test_default_resolution_binning)."""
    kwargs = dict(height=size, width=size, output_type="np", use_resolution_binning=False,
                  generator=torch.Generator().manual_seed(0)) | kwargs
    return pipe(prompt, **kwargs).images


def test_tokenizer_is_gemma_like(tmp_path):
    tok = gemma_tokenizer()
    ids = tok(["a cat", "a dog"], padding="max_length", max_length=12).input_ids
    assert ids[0][0] == tok.bos_token_id == 2 and tok.pad_token_id == 0 and tok.eos_token_id == 1
    assert ids[0][-1] == tok.pad_token_id  # right padding
    assert ids[0] != ids[1]
    tok.save_pretrained(tmp_path)
    reloaded = type(tok).from_pretrained(tmp_path)
    text = "Ünïcode prompt, with punctuation!"
    assert reloaded(text).input_ids == tok(text).input_ids and reloaded.padding_side == "right"


def test_builds_are_identical_and_configured_as_sprint():
    a, b = build_sana_sprint(seed=0), build_sana_sprint(seed=0)
    for name in ("text_encoder", "transformer", "vae"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
        assert not getattr(a, name).training
    assert {k: a.transformer.config[k] for k in SPRINT_TRANSFORMER_OPTIONS} == SPRINT_TRANSFORMER_OPTIONS
    assert {k: a.scheduler.config[k] for k in SPRINT_SCHEDULER_CONFIG} == SPRINT_SCHEDULER_CONFIG
    assert a.vae_scale_factor == 32 and a.vae.config.latent_channels == a.transformer.config.in_channels == 32
    assert a.text_encoder.config.hidden_size == a.transformer.config.caption_channels


def test_two_step_default_schedule(pipe):
    image = generate(pipe)  # defaults: 2 steps, max 1.5708, intermediate 1.3, guidance 4.5
    assert image.shape == (1, SMALLEST_SIZE, SMALLEST_SIZE, 3) and np.isfinite(image).all()
    assert 0 <= image.min() and image.max() <= 1 and image.std() > 0
    torch.testing.assert_close(pipe.scheduler.timesteps, torch.tensor([1.5708, 1.3, 0.0]))


def test_save_load_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    reloaded = SanaSprintPipeline.from_pretrained(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(generate(reloaded), generate(pipe), rtol=0, atol=1e-6)


def test_prompt_and_guidance_reach_the_image(pipe):
    image = generate(pipe)
    assert np.abs(generate(pipe, prompt="a red dog in the snow") - image).max() > 1e-3
    assert np.abs(generate(pipe, guidance_scale=1.0) - image).max() > 1e-4


@pytest.mark.parametrize("steps", [1, 4])
def test_other_step_counts_need_no_intermediate_timestep(pipe, steps):
    image = generate(pipe, num_inference_steps=steps, intermediate_timesteps=None)
    assert image.shape == (1, SMALLEST_SIZE, SMALLEST_SIZE, 3) and np.isfinite(image).all()
    torch.testing.assert_close(pipe.scheduler.timesteps, torch.linspace(1.5708, 0, steps + 1))


@pytest.mark.parametrize("steps", [1, 4])
def test_intermediate_timestep_with_other_step_counts_raises(pipe, steps):
    """diffusers rejects it (check_inputs) where NVlabs' own SCMScheduler warns and falls back to linspace."""
    with pytest.raises(ValueError, match="Intermediate timesteps for SCM is not supported"):
        generate(pipe, num_inference_steps=steps, intermediate_timesteps=1.3)


def test_default_resolution_binning(pipe):
    """With binning on (the default) the pipeline needs transformer sample_size 32, generates at the 1024 bin of
    the aspect ratio and resizes back."""
    image = generate(pipe, use_resolution_binning=True)
    assert image.shape == (1, SMALLEST_SIZE, SMALLEST_SIZE, 3) and np.isfinite(image).all()
