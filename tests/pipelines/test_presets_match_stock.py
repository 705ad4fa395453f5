"""Every preset reproduces its documented stock recipe: same seed → same latents (≤ 1e-5) on the tiny models.

The stock side is diffusers' own StableDiffusion(XL)Pipeline / LatentConsistencyModelPipeline with the scheduler the
model card names, or — where diffusers has none (NitroFusion, InstaFlow, SwiftBrush) — the official formula written
out here from the authors' code.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                       LatentConsistencyModelPipeline, LCMScheduler, TCDScheduler, UNet2DConditionModel)

from swiftstep.core.presets import UNET_PRESETS
from swiftstep.pipelines import OneStepPipeline

from ..fixtures import gen, stock_pipeline

PROMPT = ["a photo of a red fox in the snow", "an oil painting of a lighthouse"]
# ≤ 1e-5 relative to the latent range: random-weight UNets give x0 up to ~60 where real models give ~4, and two
# algebraically equal float32 paths (σ-space Euler vs ᾱ-space) then differ by a few ulp of that range.
RTOL = 1e-5


@pytest.fixture(scope="module")
def pipes(models):
    return {f: OneStepPipeline.from_pretrained(m["folder"]) for f, m in models.items()}


def ours(pipe, preset, steps, seed=0, **kw):
    return pipe(PROMPT, preset=preset, num_inference_steps=steps, generator=gen(seed), output_type="latent", **kw).images


def stock(pipe, scheduler, seed=0, **kw):
    return stock_pipeline(pipe, scheduler)(PROMPT, guidance_scale=0.0, generator=gen(seed), output_type="latent",
                                           **kw).images


def assert_same(a, b):
    assert a.shape == b.shape
    err = (a - b).abs().max().item()
    tol = RTOL * max(1.0, b.abs().max().item())
    assert err <= tol, f"max |ours − stock| = {err:.3g} > {tol:.3g}"
    assert a.std() > 0.1  # a real sample, not zeros


class TimestepShiftLCMScheduler(LCMScheduler):
    """NitroFusion's scheduler as published in ChenDarYen/NitroFusion's README: the UNet (and x0) see
    `(t·shifted_timestep/1000).long()`; `step` re-noises to the *unshifted* next timestep."""

    def __init__(self, *args, shifted_timestep: int = 250, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_to_config(shifted_timestep=shifted_timestep)

    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        self.origin_timesteps = self.timesteps.clone()
        self.shifted_timesteps = (self.timesteps * self.config.shifted_timestep / self.config.num_train_timesteps).long()
        self.timesteps = self.shifted_timesteps

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        if self.step_index is None:
            self._init_step_index(timestep)
        self.timesteps = self.origin_timesteps
        output = super().step(model_output, timestep, sample, generator, return_dict)
        self.timesteps = self.shifted_timesteps
        return output


def _nitro(cfg, shift):
    scheduler = TimestepShiftLCMScheduler.from_config(cfg, shifted_timestep=shift)
    scheduler.config.original_inference_steps = 4  # the README's next line, verbatim
    return scheduler


def _euler(cfg, **kw):
    return EulerDiscreteScheduler.from_config(cfg, timestep_spacing="trailing", **kw)


# (preset, family, steps, stock scheduler factory, stock call kwargs)
CASES = [
    *[("sd-turbo", "sd2", n, _euler, {}) for n in (1, 2, 4)],
    *[("sdxl-turbo", "sdxl", n, lambda c: EulerAncestralDiscreteScheduler.from_config(c, timestep_spacing="trailing"),
       {}) for n in (1, 2, 4)],
    ("dmd2-sdxl-1step", "sdxl", 1, LCMScheduler.from_config, {"timesteps": [399]}),
    ("dmd2-sdxl-4step", "sdxl", 4, LCMScheduler.from_config, {"timesteps": [999, 749, 499, 249]}),
    ("hyper-sd-1step", "sdxl", 1, LCMScheduler.from_config, {"timesteps": [800]}),
    *[("hyper-sd-lora-1step", "sdxl", n, TCDScheduler.from_config, {"eta": 1.0}) for n in (1, 4)],
    *[("hyper-sd-lora", fam, n, lambda c: DDIMScheduler.from_config(c, timestep_spacing="trailing",
                                                                     set_alpha_to_one=False), {})
      for fam, n in (("sdxl", 2), ("sdxl", 8), ("sd1", 4))],
    *[("tcd", fam, n, TCDScheduler.from_config, {"eta": 0.3}) for fam, n in (("sdxl", 4), ("sd1", 2), ("sd1", 8))],
    ("sdxl-lightning-1step", "sdxl", 1, lambda c: _euler(c, prediction_type="sample"), {}),
    *[(f"sdxl-lightning-{n}step", "sdxl", n, _euler, {}) for n in (2, 4, 8)],
    *[(f"nitrofusion-{kind}", "sdxl", n, lambda c, s=shift: _nitro(c, s), {})
      for kind, shift in (("realism", 250), ("vibrant", 500)) for n in (1, 4)],
]


@pytest.mark.parametrize("preset,family,steps,make_scheduler,kwargs", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_preset_matches_stock_recipe(pipes, preset, family, steps, make_scheduler, kwargs):
    pipe = pipes[family]
    stock_kwargs = dict(kwargs)
    if "timesteps" not in stock_kwargs:
        stock_kwargs["num_inference_steps"] = steps
    assert_same(ours(pipe, preset, steps), stock(pipe, make_scheduler(pipe.scheduler.config), **stock_kwargs))


def _unit_noise(pipe, seed=11):
    size = pipe.unet.config.sample_size
    return torch.randn((len(PROMPT), pipe.unet.config.in_channels, size, size), generator=gen(seed))


FIRST_CASE = {}
for _case in CASES:
    FIRST_CASE.setdefault(_case[0], _case)


@pytest.mark.parametrize("preset,family,steps,make_scheduler,kwargs", FIRST_CASE.values(), ids=list(FIRST_CASE))
def test_user_latents_are_unit_noise_as_in_diffusers(pipes, preset, family, steps, make_scheduler, kwargs):
    """`latents=` means what it means in diffusers (unit noise, scaled by the scheduler's `init_noise_sigma`), so the
    same latents give the stock pipeline's result; the generator still drives the re-noising draws."""
    pipe = pipes[family]
    stock_kwargs = dict(kwargs) if "timesteps" in kwargs else dict(kwargs, num_inference_steps=steps)
    z = _unit_noise(pipe)
    a = ours(pipe, preset, steps, seed=3, latents=z)
    assert_same(a, stock(pipe, make_scheduler(pipe.scheduler.config), seed=3, latents=z, **stock_kwargs))
    assert (a - ours(pipe, preset, steps, seed=3)).abs().max() > 1e-3  # the latents were used


def test_non_finite_latents_are_refused_before_sampling(pipes):
    z = _unit_noise(pipes["sd2"])
    z[1, 2, 3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"`latents` must be finite unit Gaussian noise, got 1 NaN/inf values"):
        ours(pipes["sd2"], "sd-turbo", 1, latents=z)


def test_every_preset_has_a_stock_comparison():
    covered = {c[0] for c in CASES} | {"lcm", "instaflow", "swiftbrush-v2"}  # the last three are tested below
    assert covered == set(UNET_PRESETS)


def test_lcm_full_unet_with_guidance_embedding_matches_lcm_pipeline(pipes):
    base = pipes["sd1"]
    torch.manual_seed(1)
    unet = UNet2DConditionModel.from_config({**base.unet.config, "time_cond_proj_dim": 16}).eval()
    c = {**base.components, "unet": unet, "scheduler": LCMScheduler.from_config(base.scheduler.config)}
    pipe = OneStepPipeline(**c)
    assert pipe.resolve_preset(None).name == "lcm"  # inferred from the UNet's guidance embedding
    for w in (8.5, 3.0):
        a = pipe(PROMPT, guidance_scale=w, generator=gen(), output_type="latent").images
        ref = LatentConsistencyModelPipeline(vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"],
                                             unet=unet, scheduler=c["scheduler"], safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
        b = ref(PROMPT, num_inference_steps=4, guidance_scale=w, generator=gen(), output_type="latent").images
        assert_same(a, b)
    z = _unit_noise(pipe)
    a = pipe(PROMPT, guidance_scale=3.0, generator=gen(2), latents=z, output_type="latent").images
    assert_same(a, ref(PROMPT, num_inference_steps=4, guidance_scale=3.0, generator=gen(2), latents=z,
                       output_type="latent").images)
    w_small = pipe(PROMPT, guidance_scale=3.0, generator=gen(), output_type="latent").images
    w_large = pipe(PROMPT, guidance_scale=8.5, generator=gen(), output_type="latent").images
    assert (w_small - w_large).abs().max() > 1e-3  # the embedding is actually fed


def _stock_embeds(pipe):
    sp = stock_pipeline(pipe, pipe.scheduler)
    return sp.encode_prompt(PROMPT, torch.device("cpu"), 1, False)[0]


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_instaflow_matches_official_rectified_flow_loop(pipes, steps):
    pipe = pipes["sd1"]
    embeds = _stock_embeds(pipe)
    # gnobitab/InstaFlow code/pipeline_rf.py: t_i = (1 − i/N)·1000 (float), dt = 1/N, x ← x + dt·v
    x = torch.randn((2, 4, 16, 16), generator=gen())
    for i in range(steps):
        t = torch.full((2,), (1 - i / steps) * 1000.0)
        x = x + (1.0 / steps) * pipe.unet(x, t, encoder_hidden_states=embeds).sample
    assert_same(ours(pipe, "instaflow", steps), x)
    z = _unit_noise(pipe)  # the official loop starts from x = z: `latents=` is z itself
    for i in range(steps):
        t = torch.full((2,), (1 - i / steps) * 1000.0)
        z = z + (1.0 / steps) * pipe.unet(z, t, encoder_hidden_states=embeds).sample
    assert_same(ours(pipe, "instaflow", steps, latents=_unit_noise(pipe)), z)


def test_swiftbrush_v2_matches_official_formula(pipes):
    pipe = pipes["sd2"]
    embeds = _stock_embeds(pipe)
    z = torch.randn((2, 4, 16, 16), generator=gen())
    alpha_bar = DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod[999]
    eps = pipe.unet(z, 999, encoder_hidden_states=embeds).sample
    x0 = (z - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()  # SwiftBrush infer.py, t = T − 1
    assert_same(ours(pipe, "swiftbrush-v2", 1), x0)
    z = _unit_noise(pipe)
    eps = pipe.unet(z, 999, encoder_hidden_states=embeds).sample
    assert_same(ours(pipe, "swiftbrush-v2", 1, latents=z), (z - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt())


@pytest.mark.parametrize("family", ["sd2-v", "sd1"])
def test_custom_timesteps_follow_the_folder_prediction_type(pipes, family):
    """No preset (none is implied by these folders): `timesteps=` with the folder's own prediction type."""
    pipe = pipes[family]
    assert pipe.resolve_preset(None) is None
    # default rule without a preset: consistency re-noising (= LCMScheduler with explicit timesteps)
    for ts in ([999], [999, 499]):
        a = pipe(PROMPT, timesteps=ts, generator=gen(), output_type="latent").images
        assert_same(a, stock(pipe, LCMScheduler.from_config(pipe.scheduler.config), timesteps=ts))
    # gamma sampling = TCDScheduler with eta = gamma
    for gamma in (0.0, 0.5):
        a = pipe(PROMPT, timesteps=[999, 759, 499], gamma=gamma, generator=gen(), output_type="latent").images
        b = stock(pipe, TCDScheduler.from_config(pipe.scheduler.config), timesteps=[999, 759, 499], eta=gamma)
        assert_same(a, b)
