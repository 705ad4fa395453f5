"""The DiT presets' schedules against the official recipes they cite, each written from its source (not from
`core.flow_match`): BFL's FLUX.1 sampler, Tongyi-MAI's Z-Image generate(), ModelTC's Qwen-Image-Lightning
scheduler config, FLUX.2's empirical μ through the stock scheduler, and diffusers' SCM scheduler for SANA-Sprint."""

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SCMScheduler

from swiftstep.core.presets import DIT_FAMILY_NAMES, FLOW_PRESETS, PRESETS, UNET_PRESETS, FlowPreset, get_preset
from swiftstep.pipelines.pipeline_distilled_dit import PIPELINE_FAMILIES

from ..tolerance import assert_close_to_scale


def test_every_flow_preset_is_consistent():
    assert set(PRESETS) == set(UNET_PRESETS) | set(FLOW_PRESETS)
    for p in FLOW_PRESETS.values():
        assert p.default_steps in p.steps and p.reference and p.source, p.name
        assert p.family in DIT_FAMILY_NAMES and PIPELINE_FAMILIES[p.pipeline] == p.family, p.name
        for n in p.steps:
            grid = p.sigmas(n, 1024) if p.schedule == "flow-match" else torch.tensor(p.scm_timesteps(n))
            assert len(grid) == n + 1 and grid[-1] == 0 and (grid[1:] < grid[:-1]).all(), p.name


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
@pytest.mark.parametrize("tokens", [256, 1024, 4096])
def test_flux_schnell_is_the_unshifted_official_grid(steps, tokens):
    # black-forest-labs/flux cli.py: get_schedule(steps, tokens, shift=(name != "flux-schnell")) → linspace(1, 0, n+1)
    ours = FLOW_PRESETS["flux-schnell"].sigmas(steps, tokens)
    torch.testing.assert_close(ours, torch.linspace(1, 0, steps + 1, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("tokens", [64, 1024, 4096])
def test_zimage_turbo_is_the_official_nine_step_call(tokens):
    # Tongyi-MAI/Z-Image generate(): the folder's scheduler (shift 3), sigma_min = 0, set_timesteps(9); the last
    # timestep (t = 0) is skipped, so 8 evaluations and the final Euler step lands on σ = 0.
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    scheduler.sigma_min = 0.0
    scheduler.set_timesteps(9, mu=0.5)
    official = scheduler.sigmas[:9].double()  # 8 evaluated σ, then the σ the last step goes to
    assert scheduler.timesteps[-1] == 0
    assert_close_to_scale(FLOW_PRESETS["zimage-turbo"].sigmas(None, tokens), official, rel=1e-6)


@pytest.mark.parametrize("n", [4, 8])
@pytest.mark.parametrize("tokens", [256, 4096, 8192])
def test_qwen_image_lightning_is_modeltc_scheduler_config(n, tokens):
    # ModelTC/Qwen-Image-Lightning generate_with_diffusers.py: base_shift = max_shift = log 3, exponential dynamic
    # shift, shift_terminal None, linspace(1, 1/n, n) sigmas through QwenImagePipeline's calculate_shift.
    config = dict(base_image_seq_len=256, base_shift=math.log(3), invert_sigmas=False, max_image_seq_len=8192,
                  max_shift=math.log(3), num_train_timesteps=1000, shift=1.0, shift_terminal=None,
                  stochastic_sampling=False, time_shift_type="exponential", use_beta_sigmas=False,
                  use_dynamic_shifting=True, use_exponential_sigmas=False, use_karras_sigmas=False)
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    slope = (config["max_shift"] - config["base_shift"]) / (config["max_image_seq_len"] - config["base_image_seq_len"])
    mu = config["base_shift"] + slope * (tokens - config["base_image_seq_len"])
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
    assert_close_to_scale(FLOW_PRESETS[f"qwen-image-lightning-{n}step"].sigmas(n, tokens), scheduler.sigmas.double(),
                          rel=1e-6)


@pytest.mark.parametrize("tokens", [256, 1024, 4096, 6000])
def test_flux2_klein_follows_the_empirical_mu_with_the_image_size(tokens):
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4), mu=compute_empirical_mu(tokens, 4))
    ours = FLOW_PRESETS["flux2-klein"].sigmas(4, tokens)
    assert_close_to_scale(ours, scheduler.sigmas.double(), rel=1e-6)
    with pytest.raises(ValueError, match="pass `image_seq_len`"):
        FLOW_PRESETS["flux2-klein"].sigmas(4)


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_sana_sprint_angles_are_the_scm_schedulers(steps):
    p = FLOW_PRESETS["sana-sprint"]
    scheduler = SCMScheduler()
    scheduler.set_timesteps(steps, max_timesteps=p.max_timesteps, intermediate_timesteps=p.intermediate_for(steps))
    torch.testing.assert_close(torch.tensor(p.scm_timesteps(steps), dtype=torch.float32), scheduler.timesteps)
    with pytest.raises(ValueError, match="TrigFlow angles"):
        p.sigmas(steps)


def test_step_counts_outside_the_distillation_are_refused_with_the_valid_ones():
    with pytest.raises(ValueError, match=r"'zimage-turbo' supports num_inference_steps in \[8\], got 9.*skipped"):
        get_preset("zimage-turbo").sigmas(9, 1024)
    with pytest.raises(ValueError, match=r"'flux-schnell' supports num_inference_steps in \[1, 2, 3, 4\], got 8"):
        get_preset("flux-schnell").sigmas(8, 1024)
    assert isinstance(get_preset("sd35-large-turbo"), FlowPreset)


def test_sd35_large_turbo_is_the_reference_samplers_grid():
    # Stability-AI/sd3.5 sd3_infer.py get_sigmas: t = linspace(timestep(σ_max), timestep(σ_min), n) with the model's
    # discrete-flow sampling (σ(t) = shift·(t/1000) / (1 + (shift − 1)·t/1000), timestep(σ) = 1000·σ, σ_min = σ(1))
    def sigma(t, shift=3.0):
        return shift * (t / 1000) / (1 + (shift - 1) * t / 1000)

    ts = torch.linspace(1000 * sigma(torch.tensor(1000.0, dtype=torch.float64)),
                        1000 * sigma(torch.tensor(1.0, dtype=torch.float64)), 4, dtype=torch.float64)
    official = torch.cat([sigma(ts), torch.zeros(1, dtype=torch.float64)])
    assert_close_to_scale(FLOW_PRESETS["sd35-large-turbo"].sigmas(4, 1024), official, rel=1e-12)
    assert FLOW_PRESETS["sd35-large-turbo"].sigmas(4, 1024)[-2] < 0.01
