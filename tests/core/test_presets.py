"""The preset table: schedules equal what the referenced diffusers schedulers compute, and lookups fail clearly."""

import pytest
from diffusers import DDIMScheduler, EulerDiscreteScheduler, LCMScheduler, TCDScheduler

from swiftstep.core.presets import UNET_PRESETS, get_preset, lcm_timesteps, trailing_timesteps

CFG = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False)


@pytest.mark.parametrize("n", range(1, 9))
def test_trailing_matches_euler_and_ddim(n):
    euler = EulerDiscreteScheduler(timestep_spacing="trailing", **{k: v for k, v in CFG.items() if k != "set_alpha_to_one"})
    euler.set_timesteps(n)
    ddim = DDIMScheduler(timestep_spacing="trailing", **CFG)
    ddim.set_timesteps(n)
    assert trailing_timesteps(n) == tuple(int(t) for t in euler.timesteps) == tuple(ddim.timesteps.tolist())


@pytest.mark.parametrize("n", range(1, 9))
def test_lcm_schedule_matches_lcm_and_tcd_schedulers(n):
    lcm, tcd = LCMScheduler(**CFG), TCDScheduler(**CFG)
    lcm.set_timesteps(n)
    tcd.set_timesteps(n)
    assert lcm_timesteps(n) == tuple(lcm.timesteps.tolist()) == tuple(tcd.timesteps.tolist())


def test_published_timesteps():
    assert get_preset("dmd2-sdxl-4step").timesteps_for(None) == (999, 749, 499, 249)
    assert get_preset("dmd2-sdxl-1step").timesteps_for(1) == (399,)
    assert get_preset("hyper-sd-1step").timesteps_for(1) == (800,)
    assert get_preset("lcm").timesteps_for(4) == (999, 759, 499, 259)  # LCM's own default differs from DMD2's
    assert get_preset("instaflow").timesteps_for(1) == (1000.0,)
    assert get_preset("nitrofusion-realism").timestep_shift == 0.25
    assert get_preset("nitrofusion-vibrant").timestep_shift == 0.5
    assert get_preset("sdxl-lightning-1step").prediction_type == "sample"
    assert get_preset("tcd").rule.gamma == 0.3 and get_preset("hyper-sd-lora-1step").rule.gamma == 1.0


def test_every_preset_is_consistent():
    for p in UNET_PRESETS.values():
        assert p.default_steps in p.timesteps, p.name
        assert set(p.families) <= {"sd1", "sd2", "sdxl"}, p.name
        for n, ts in p.timesteps.items():
            assert len(ts) == n and list(ts) == sorted(ts, reverse=True), p.name
        assert p.reference and p.source, p.name


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ValueError, match=r"Unknown preset 'dmd3'.*sd-turbo.*dmd2-sdxl-4step"):
        get_preset("dmd3")


def test_unsupported_step_count_names_the_supported_ones():
    with pytest.raises(ValueError, match=r"supports num_inference_steps in \[4\], got 2"):
        get_preset("dmd2-sdxl-4step").timesteps_for(2)
