"""The flow-matching σ grids and Euler step against diffusers' FlowMatchEulerDiscreteScheduler (the stock scheduler
of the SD3, FLUX, Z-Image and Qwen-Image pipelines) and against the formulas' own properties."""

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from swiftstep.core import flow_match

from ..tolerance import assert_close_to_scale


def stock_sigmas(steps, mu=None, **config):
    """What the FLUX/SD3-style pipelines do: σ = linspace(1, 1/n, n) into `set_timesteps(sigmas=…, mu=…)`."""
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return scheduler


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
@pytest.mark.parametrize("case", [
    dict(config=dict(shift=1.0), ours=dict(shift=1.0)),                                  # no shift
    dict(config=dict(shift=3.0), ours=dict(shift=3.0)),                                  # static shift 3
    dict(config=dict(use_dynamic_shifting=True, time_shift_type="exponential"), mu=0.92,
         ours=dict(mu=0.92)),                                                           # resolution-dependent
    dict(config=dict(use_dynamic_shifting=True, time_shift_type="linear"), mu=1.7,
         ours=dict(mu=1.7, shift_kind="linear")),
    dict(config=dict(shift=3.0, shift_terminal=0.02), ours=dict(shift=3.0, terminal=0.02)),
], ids=["none", "static3", "exponential", "linear", "terminal"])
def test_sigmas_match_the_stock_scheduler(steps, case):
    if "terminal" in case["ours"] and steps == 1:
        with pytest.raises(ValueError, match="terminal stretch needs a grid ending below"):
            flow_match.flow_sigmas(steps, **case["ours"])
        return
    scheduler = stock_sigmas(steps, case.get("mu"), **case["config"])
    ours = flow_match.flow_sigmas(steps, **case["ours"])
    assert_close_to_scale(ours, scheduler.sigmas.double(), rel=1e-6)
    assert ours[-1] == 0 and (ours[1:] < ours[:-1]).all()


def test_exponential_shift_at_log_s_is_the_static_shift():
    """Why Qwen-Image-Lightning sets base_shift = max_shift = log 3: μ = log 3 for every resolution, i.e. shift 3."""
    mu = flow_match.resolution_mu(4096, base_shift=math.log(3), max_shift=math.log(3))
    assert mu == pytest.approx(math.log(3))
    assert_close_to_scale(flow_match.flow_sigmas(8, mu=mu), flow_match.flow_sigmas(8, shift=3.0), rel=1e-12)


def test_resolution_mu_is_fluxs_line():
    assert flow_match.resolution_mu(256) == pytest.approx(0.5)
    assert flow_match.resolution_mu(4096) == pytest.approx(1.15)
    assert flow_match.resolution_mu(1024 * 1024 // 256) == pytest.approx(1.15)    # 1024² px, 16 px per token
    assert flow_match.resolution_mu(2176) == pytest.approx(0.5 + 0.65 * 1920 / 3840)


@pytest.mark.parametrize("seq_len", [256, 1024, 4096, 4300, 4301, 16384])
@pytest.mark.parametrize("steps", [1, 4, 28, 50])
def test_flux2_mu_matches_the_stock_pipeline(seq_len, steps):
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    assert flow_match.flux2_mu(seq_len, steps) == pytest.approx(compute_empirical_mu(seq_len, steps), rel=1e-12)


def test_euler_step_and_x0_match_the_stock_scheduler():
    g = torch.Generator().manual_seed(0)
    scheduler = stock_sigmas(4, shift=3.0)
    ours = flow_match.flow_sigmas(4, shift=3.0)
    x = torch.randn(2, 16, 8, 8, generator=g)
    for i, t in enumerate(scheduler.timesteps):
        v = torch.randn(2, 16, 8, 8, generator=g)
        expected = scheduler.step(v, t, x).prev_sample
        x_next = flow_match.flow_euler_step(v, x, float(ours[i]), float(ours[i + 1]))
        assert_close_to_scale(x_next, expected, rel=1e-6)
        x = expected
    x0 = flow_match.flow_x0(v, x, 0.5)
    eps = x0 + v
    assert_close_to_scale(0.5 * x0 + 0.5 * eps, x)                                  # x_σ = (1 − σ)·x0 + σ·ε


def test_bad_grids_are_refused():
    with pytest.raises(ValueError, match="strictly decreasing"):
        flow_match.flow_sigmas(sigmas=[0.5, 0.9])
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        flow_match.flow_sigmas(sigmas=[1.5, 0.5])
    with pytest.raises(ValueError, match="positive integer"):
        flow_match.flow_sigmas(0)
    with pytest.raises(ValueError, match="'exponential' or 'linear'"):
        flow_match.dynamic_shift(torch.tensor([0.5]), 1.0, "cosine")
