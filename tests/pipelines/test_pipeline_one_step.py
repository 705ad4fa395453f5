"""OneStepPipeline behaviour a user relies on: loading, seeds, batching, outputs, callbacks and clear errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from swiftstep.pipelines import OneStepPipeline

from ..fixtures import gen
from ..tolerance import assert_close_to_scale

PROMPT = "a watercolor of a mountain lake"


@pytest.fixture(scope="module")
def pipes(models):
    out = {f: OneStepPipeline.from_pretrained(m["folder"]) for f, m in models.items()}
    for p in out.values():
        p.set_progress_bar_config(disable=True)
    return out


def latents(pipe, seed=0, **kw):
    kw.setdefault("timesteps", [999])
    return pipe(PROMPT, generator=gen(seed), output_type="latent", **kw).images


@pytest.mark.parametrize("family,expected", [("sd1", "sd1"), ("sd2", "sd2"), ("sd2-v", "sd2"), ("sdxl", "sdxl")])
def test_family_detected_from_components(pipes, family, expected):
    assert pipes[family].family == expected


@pytest.mark.parametrize("family", ["sd1", "sd2", "sd2-v", "sdxl"])
def test_single_file_and_folder_give_the_same_image(models, pipes, family):
    m = models[family]
    single = OneStepPipeline.from_single_file(m["single_file"], config=str(m["folder"]))
    single.set_progress_bar_config(disable=True)
    a = pipes[family](PROMPT, timesteps=[999], generator=gen(), output_type="np").images
    b = single(PROMPT, timesteps=[999], generator=gen(), output_type="np").images
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert a.std() > 0.05


def test_save_pretrained_round_trip_keeps_output_and_preset(pipes, tmp_path):
    pipe = pipes["sdxl"]
    pipe.register_to_config(preset="dmd2-sdxl-4step")
    try:
        pipe.save_pretrained(tmp_path)
    finally:
        pipe.register_to_config(preset=None)
    assert json.loads((tmp_path / "model_index.json").read_text())["preset"] == "dmd2-sdxl-4step"
    loaded = OneStepPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.resolve_preset(None).name == "dmd2-sdxl-4step"
    a = pipe(PROMPT, preset="dmd2-sdxl-4step", generator=gen(), output_type="latent").images
    b = loaded(PROMPT, generator=gen(), output_type="latent").images
    assert_close_to_scale(a, b)


def test_preset_inferred_only_when_unambiguous(pipes):
    assert pipes["sd2"].resolve_preset(None).name == "sd-turbo"  # SD2 + trailing Euler ε: the sd-turbo folder
    assert pipes["sd1"].resolve_preset(None) is None
    with pytest.raises(ValueError, match=r"pass `preset=` \(one of: sd-turbo"):
        pipes["sd1"](PROMPT)


def test_same_seed_same_image_and_different_seed_different_image(pipes):
    pipe = pipes["sd1"]
    kw = dict(preset="tcd", num_inference_steps=4)
    torch.testing.assert_close(latents(pipe, 3, timesteps=None, **kw), latents(pipe, 3, timesteps=None, **kw),
                               rtol=0, atol=0)
    assert (latents(pipe, 3, timesteps=None, **kw) - latents(pipe, 4, timesteps=None, **kw)).abs().max() > 0.1


def test_explicit_latents_replace_the_first_noise_draw(pipes):
    pipe = pipes["sd1"]
    x_T = torch.randn(1, 4, 16, 16, generator=gen(0))
    torch.testing.assert_close(latents(pipe, 0), pipe(PROMPT, latents=x_T, timesteps=[999], output_type="latent").images)
    with pytest.raises(ValueError, match=r"`latents` must have shape \(1, 4, 16, 16\)"):
        pipe(PROMPT, latents=torch.zeros(1, 4, 8, 8), timesteps=[999])


def test_batch_of_prompts_and_images_per_prompt(pipes):
    pipe = pipes["sdxl"]
    out = pipe(["a cat", "a dog"], num_images_per_prompt=3, timesteps=[999], generator=gen(), output_type="pt").images
    assert out.shape == (6, 3, 32, 32) and out.dtype == torch.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    embeds, pooled = pipe.encode_prompt(["a cat", "a dog"], 3)
    assert embeds.shape[0] == pooled.shape[0] == 6
    assert torch.equal(embeds[0], embeds[2]) and not torch.equal(embeds[0], embeds[3])


@pytest.mark.parametrize("output_type", ["pil", "np", "pt", "latent"])
def test_output_types(pipes, output_type):
    pipe = pipes["sd2"]
    images = pipe(PROMPT, height=48, width=32, generator=gen(), output_type=output_type).images
    if output_type == "pil":
        assert isinstance(images[0], Image.Image) and images[0].size == (32, 48)
    elif output_type == "np":
        assert images.shape == (1, 48, 32, 3)
    elif output_type == "pt":
        assert images.shape == (1, 3, 48, 32)
    else:
        assert images.shape == (1, 4, 24, 16)


def test_callback_sees_every_step_and_can_interrupt(pipes):
    pipe = pipes["sdxl"]
    seen = []

    def record(p, i, t, kw):
        seen.append((i, t, kw["x0"].shape))
        return kw

    pipe(PROMPT, preset="dmd2-sdxl-4step", generator=gen(), output_type="latent", callback_on_step_end=record,
         callback_on_step_end_tensor_inputs=["latents", "x0"])
    assert [(i, t) for i, t, _ in seen] == [(0, 999), (1, 749), (2, 499), (3, 249)]

    calls = []

    def stop_after_two(p, i, t, kw):
        calls.append(i)
        if i == 1:
            p._interrupt = True
        return kw

    pipe(PROMPT, preset="dmd2-sdxl-4step", generator=gen(), output_type="latent", callback_on_step_end=stop_after_two)
    assert calls == [0, 1]
    assert not pipe.interrupt or calls  # the flag is reset by the next call
    assert len(pipe(PROMPT, timesteps=[999], output_type="latent").images) == 1


def test_callback_can_replace_latents(pipes):
    pipe = pipes["sd1"]
    zeros = pipe(PROMPT, preset="lcm", num_inference_steps=2, generator=gen(), output_type="latent",
                 callback_on_step_end=lambda p, i, t, kw: {"latents": torch.zeros_like(kw["latents"])}).images
    assert torch.count_nonzero(zeros) == 0


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(height=31), ValueError, r"`height` must be a positive multiple of 2 \(the VAE factor\), got 31"),
    (dict(width=0), ValueError, r"`width` must be a positive multiple"),
    (dict(preset="dmd3"), ValueError, r"Unknown preset 'dmd3'; valid presets: sd-turbo"),
    (dict(preset="dmd2-sdxl-4step"), ValueError, r"is for SDXL UNets, but this pipeline's UNet is SD1.x-shaped"),
    (dict(timesteps=[1000]), ValueError, r"integers in \[0, 1000\)"),
    (dict(timesteps=[999, 999]), ValueError, "strictly decreasing"),
    (dict(timesteps=[999], num_inference_steps=2), ValueError, "disagrees"),
    (dict(preset="tcd", num_inference_steps=9), ValueError, r"supports num_inference_steps in \[1, 2"),
    (dict(gamma=2.0, timesteps=[999]), ValueError, r"`gamma` must be in \[0, 1\]"),
    (dict(output_type="jpeg", timesteps=[999]), ValueError, "`output_type` must be one of"),
    (dict(num_images_per_prompt=0, timesteps=[999]), ValueError, "num_images_per_prompt"),
])
def test_bad_input_is_a_clear_error(pipes, kwargs, error, match):
    with pytest.raises(error, match=match):
        pipes["sd1"](PROMPT, **kwargs)


def test_nan_latents_name_the_step_and_the_remedy(pipes):
    pipe = pipes["sd1"]
    handle = pipe.unet.register_forward_hook(lambda m, args, out: (out[0] * float("nan"),))
    try:
        with pytest.raises(FloatingPointError, match=r"NaN/inf in latents after step 1 \(t=999\).*bfloat16"):
            pipe(PROMPT, timesteps=[999], output_type="latent")
    finally:
        handle.remove()


def test_single_file_errors(tmp_path, models):
    with pytest.raises(FileNotFoundError, match="No checkpoint file at"):
        OneStepPipeline.from_single_file(tmp_path / "missing.safetensors")
    flux = tmp_path / "flux1-schnell.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(2, 2)}, str(flux))
    with pytest.raises(ValueError, match=r"not an SD1.x/SD2.x/SDXL checkpoint .*looks like a FLUX transformer"):
        OneStepPipeline.from_single_file(flux)
    with pytest.raises(ValueError, match="loading offline needs `config=`"):
        OneStepPipeline.from_single_file(models["sd1"]["single_file"], local_files_only=True)


def test_wrong_text_encoder_pairing_is_rejected(pipes):
    c = dict(pipes["sd1"].components)
    c["text_encoder_2"], c["tokenizer_2"] = pipes["sdxl"].text_encoder_2, pipes["sdxl"].tokenizer_2
    with pytest.raises(ValueError, match="SD1.x/SD2.x UNet takes none"):
        OneStepPipeline(**c)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="model CPU offload needs an accelerator")
def test_model_cpu_offload_gives_the_same_image(pipes):
    pipe = pipes["sd1"]
    a = latents(pipe).cpu()
    pipe.enable_model_cpu_offload()
    try:
        b = pipe(PROMPT, timesteps=[999], generator=gen(), output_type="latent").images.cpu()
    finally:
        pipe.remove_all_hooks()
        pipe.to("cpu")
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_stock_diffusers_folders_load_and_imply_their_preset(pipes, tmp_path):
    """Folders written by stock pipelines (what users download) load directly; extra components are ignored."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline

    from ..fixtures import stock_pipeline

    src = pipes["sdxl"]
    turbo_scheduler = EulerAncestralDiscreteScheduler.from_config(src.scheduler.config, timestep_spacing="trailing")
    stock = stock_pipeline(src, turbo_scheduler)
    assert isinstance(stock, StableDiffusionXLPipeline)
    stock.save_pretrained(tmp_path / "sdxl-turbo-like")
    pipe = OneStepPipeline.from_pretrained(tmp_path / "sdxl-turbo-like")
    assert pipe.resolve_preset(None).name == "sdxl-turbo"
    pipe.set_progress_bar_config(disable=True)
    a = pipe(PROMPT, generator=gen(), output_type="latent").images
    b = stock(PROMPT, num_inference_steps=1, guidance_scale=0.0, generator=gen(), output_type="latent").images
    assert_close_to_scale(a, b)

    sd1 = stock_pipeline(pipes["sd1"], pipes["sd1"].scheduler)  # safety_checker/feature_extractor saved as null
    sd1.save_pretrained(tmp_path / "sd15-like")
    assert OneStepPipeline.from_pretrained(tmp_path / "sd15-like").family == "sd1"


def test_fp16_vae_overflow_falls_back_to_float32(models, caplog):
    import logging

    pipe = OneStepPipeline.from_pretrained(models["sd1"]["folder"])
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.to(torch.float16)
    pipe.vae.register_to_config(force_upcast=False)  # a VAE that claims to be fp16-safe
    # an fp16 decode that overflows, as SDXL's VAE does at large activations
    handle = pipe.vae.decoder.register_forward_hook(
        lambda m, a, out: out * float("inf") if out.dtype == torch.float16 else out)
    try:
        with caplog.at_level(logging.WARNING, logger="swiftstep"):
            image = pipe(PROMPT, timesteps=[999], generator=gen(), output_type="pt").images
    finally:
        handle.remove()
    assert torch.isfinite(image).all() and pipe.vae.dtype == torch.float16
    assert "decoding in float32 instead" in caplog.text
    ref_pipe = OneStepPipeline.from_pretrained(models["sd1"]["folder"])
    ref_pipe.set_progress_bar_config(disable=True)
    ref = ref_pipe(PROMPT, timesteps=[999], generator=gen(), output_type="pt").images
    torch.testing.assert_close(image, ref, atol=1e-3, rtol=1e-3)
