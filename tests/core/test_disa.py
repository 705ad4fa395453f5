"""core.disa against the numbers of DiSA's released code and MAR's sampler (shared/notes/disa_mar.md) and a float64
reference of the IDDPM reverse step."""

import math

import numpy as np
import pytest
import torch

from swiftstep.core import disa


def test_linear_50_to_5_over_64_iterations():
    expected = [50, 49, 48, 47, 47, 46, 45, 45, 44, 43, 42, 42, 41, 40, 40, 39, 38, 37, 37, 36, 35, 35, 34, 33, 32,
                32, 31, 30, 30, 29, 28, 27, 27, 26, 25, 25, 24, 23, 22, 22, 21, 20, 20, 19, 18, 17, 17, 16, 15, 15, 14,
                13, 12, 12, 11, 10, 10, 9, 8, 7, 7, 6, 5, 5]
    assert disa.step_schedule("disa-linear", 64, 50, 5) == expected


def test_other_strategies():
    assert disa.step_schedule("disa-two-stage", 5, 50, 5) == [50, 50, 5, 5, 5]
    assert disa.step_schedule("constant", 3, 50, 5) == [5, 5, 5]
    cos = disa.step_schedule("disa-cosine", 64, 50, 5)
    assert cos[0] == 50 and cos[-1] == 5 and cos == sorted(cos, reverse=True)
    with pytest.raises(ValueError, match="must be one of"):
        disa.step_schedule("exponential", 4, 8, 2)


def test_reference_trace_of_the_950_clip():
    """DiSA trace: N=4, linear 8→2: T = 8, 6, 4, 2 with these timestep maps."""
    assert disa.step_schedule("disa-linear", 4, 8, 2) == [8, 6, 4, 2]
    maps = [disa.HeadDiffusion(t, clip=950).timestep_map for t in (8, 6, 4, 2)]
    assert maps == [[0, 143, 285, 428, 571, 714, 856, 950], [0, 200, 400, 599, 799, 950], [0, 333, 666, 950],
                    [0, 950]]
    assert disa.HeadDiffusion(5, clip=950).timestep_map == [0, 250, 500, 749, 950]
    t50 = disa.HeadDiffusion(50, clip=950).timestep_map
    assert t50[-3:] == [917, 938, 950] and len(t50) == 48
    for t in range(5, 51):  # de-duplication after the clip: T ≥ 22 runs T−1 steps, T = 42…50 runs T−2
        n = len(disa.HeadDiffusion(t, clip=950))
        assert n == (t if t < 22 else t - 1 if t < 42 else t - 2), t


def test_mar_respacing_without_the_clip():
    d = disa.HeadDiffusion(100)
    assert len(d) == 100 and d.timestep_map[0] == 0 and d.timestep_map[-1] == 999


def test_mar_mask_schedule():
    tokens = disa.tokens_per_iteration(256, 64)
    assert tokens[:18] == [1] * 13 + [2, 3, 2, 2, 3] and sum(tokens) == 256
    assert disa.cfg_scale(3.0, "linear", 128, 256) == pytest.approx(2.0)
    assert disa.cfg_scale(3.0, "constant", 128, 256) == 3.0


def iddpm_reference(eps, v, x, t_index, d, noise, temperature):
    """IDDPM (Nichol & Dhariwal 2021) eqs. 10–13 with the learned-range variance, in float64."""
    ac = np.cumprod(1 - d.betas)
    ac_prev = np.append(1.0, ac[:-1])
    b, a, ap = d.betas[t_index], ac[t_index], ac_prev[t_index]
    x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
    mean = b * math.sqrt(ap) / (1 - a) * x0 + (1 - ap) * math.sqrt(1 - b) / (1 - a) * x
    post = d.betas * (1 - ac_prev) / (1 - ac)
    min_log = math.log(post[t_index] if t_index > 0 else post[1])
    log_var = (v + 1) / 2 * math.log(b) + (1 - (v + 1) / 2) * min_log
    return mean if t_index == 0 else mean + torch.exp(0.5 * log_var) * noise * temperature


@pytest.mark.parametrize("index", [0, 3, 7])
def test_p_sample_matches_iddpm(index):
    d = disa.HeadDiffusion(8, clip=950)
    g = torch.Generator().manual_seed(index)
    x, eps, noise = (torch.randn(6, 16, generator=g, dtype=torch.float64) for _ in range(3))
    v = torch.rand(6, 16, generator=g, dtype=torch.float64) * 2 - 1
    got = d.p_sample(torch.cat([eps, v], -1).float(), x.float(), index, noise.float(), temperature=0.9)
    ref = iddpm_reference(eps, v, x, index, d, noise, 0.9)
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)
