"""Image-to-image with OneStepPipeline: the same latents as diffusers' stock img2img pipelines (the SD-Turbo /
SDXL-Turbo card recipe: Euler trailing, 2 steps, strength 0.5, no CFG) for the same seed."""

import numpy as np
import pytest
import torch
from diffusers import (EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline,
                       StableDiffusionXLImg2ImgPipeline)
from PIL import Image

from swiftstep.pipelines.fast_path import GraphedCall

from ..fixtures import gen, load_pipes

PROMPT = "a cat in the style of a woodcut"


@pytest.fixture(scope="module")
def pipes(models):
    return load_pipes(models, ("sd2", "sdxl"))


def picture(h=32, w=40, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))


def stock(pipe):
    c = pipe.components
    if pipe.family == "sdxl":
        sched = EulerAncestralDiscreteScheduler.from_config(c["scheduler"].config, timestep_spacing="trailing")
        return StableDiffusionXLImg2ImgPipeline(vae=c["vae"], text_encoder=c["text_encoder"],
                                                text_encoder_2=c["text_encoder_2"], tokenizer=c["tokenizer"],
                                                tokenizer_2=c["tokenizer_2"], unet=c["unet"], scheduler=sched)
    sched = EulerDiscreteScheduler.from_config(c["scheduler"].config, timestep_spacing="trailing")
    return StableDiffusionImg2ImgPipeline(vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"],
                                          unet=c["unet"], scheduler=sched, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)


@pytest.mark.parametrize("family, preset, steps, strength", [("sd2", "sd-turbo", 2, 0.5), ("sd2", "sd-turbo", 4, 0.6),
                                                            ("sdxl", "sdxl-turbo", 2, 0.5)])
def test_matches_the_stock_img2img_pipeline(pipes, family, preset, steps, strength):
    pipe = pipes[family]
    ref_pipe = stock(pipe)
    ref_pipe.set_progress_bar_config(disable=True)
    kw = dict(image=picture(), num_inference_steps=steps, strength=strength, output_type="latent")
    ref = ref_pipe(PROMPT, guidance_scale=0.0, generator=gen(2), **kw).images
    ours = pipe(PROMPT, preset=preset, generator=gen(2), **kw).images
    assert ours.shape == ref.shape == (1, 4, 16, 20)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    txt = pipe(PROMPT, preset=preset, num_inference_steps=steps, height=32, width=40, generator=gen(2),
               output_type="latent").images
    assert (ours - txt).abs().max() > 1e-2  # the image matters


def test_batches_fast_path_and_errors(pipes):
    pipe = pipes["sd2"]
    kw = dict(preset="sd-turbo", num_inference_steps=2, image=picture(), output_type="pt")
    two = pipe([PROMPT, PROMPT + "!"], generator=gen(1), **kw).images
    assert two.shape == (2, 3, 32, 40)
    plain = pipe(PROMPT, generator=gen(1), **kw).images
    pipe.enable_fast_path().graphs = GraphedCall(capture=False)
    try:
        torch.testing.assert_close(pipe(PROMPT, generator=gen(1), **kw).images, plain, rtol=0, atol=1e-3)
    finally:
        pipe.disable_fast_path()
    with pytest.raises(ValueError, match=r"1 step\(s\) × strength 0.5 leaves no step to run"):
        pipe(PROMPT, preset="sd-turbo", num_inference_steps=1, image=picture())
    with pytest.raises(ValueError, match=r"`strength` must be in \(0, 1\]"):
        pipe(PROMPT, preset="sd-turbo", image=picture(), strength=0.0)
    with pytest.raises(ValueError, match="3 images for 2 images to make"):
        pipe([PROMPT] * 2, preset="sd-turbo", num_inference_steps=2, image=[picture()] * 3)
    pair = pipe([PROMPT, PROMPT], preset="sd-turbo", num_inference_steps=2, image=[picture(), picture(seed=1)],
                num_images_per_prompt=2, generator=gen(1), output_type="latent").images
    assert pair.shape[0] == 4 and torch.equal(pair[0], pair[0])
    with pytest.raises(ValueError, match="either `image` or `latents`"):
        pipe(PROMPT, preset="sd-turbo", num_inference_steps=2, image=picture(), latents=torch.zeros(1, 4, 16, 20))


def test_stream_takes_a_picture_per_prompt(pipes):
    pipe = pipes["sd2"]
    pictures = [picture(seed=i) for i in range(3)]
    kw = dict(preset="sd-turbo", num_inference_steps=2, strength=0.5, output_type="pt")
    streamed = list(pipe.generate_stream(["a", "b", "c"], images=iter(pictures), batch_size=2, seed=4, **kw))
    assert len(streamed) == 3
    one = pipe("b", image=pictures[1], generator=gen(5), **kw).images[0]
    torch.testing.assert_close(streamed[1], one, rtol=0, atol=1e-5)


def test_cli_image_to_image(models, tmp_path):
    import json

    from swiftstep.cli import main

    picture().save(tmp_path / "in.png")
    rc = main(["generate", "--model", str(models["sd2"]["folder"]), "--preset", "sd-turbo", "--steps", "2",
               "--prompt", PROMPT, "--image", str(tmp_path / "in.png"), "--device", "cpu",
               "--out", str(tmp_path / "out.png")])
    out = Image.open(tmp_path / "out.png")
    params = json.loads(out.text["swiftstep"])
    assert rc == 0 and out.size == (40, 32) and params["strength"] == 0.5 and params["timesteps"] == [499]
