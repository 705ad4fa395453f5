"""core.onestep against float64 references written from the papers' equations."""

import math

import pytest
import torch

from swiftstep.core import onestep
from swiftstep.core.onestep import FewStepSampler, NoiseSchedule, StepRule

from ..tolerance import assert_close_to_scale

AC = onestep.alphas_cumprod()
VP = NoiseSchedule.vp(AC)


def ab(t):  # ᾱ_t in float64
    return AC.double()[int(t)]


def test_alphas_cumprod_is_the_scaled_linear_ddpm_schedule():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    ref = torch.cumprod(1 - betas, 0)
    torch.testing.assert_close(AC.double(), ref, rtol=1e-5, atol=0)
    assert abs(AC[999].item() - 0.00466) < 1e-5 and abs(AC[399].item() - 0.426) < 1e-3


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_x0_and_eps_invert_the_forward_process(pred):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 5, 7, generator=g, dtype=torch.float64), torch.randn(2, 4, 5, 7, generator=g,
                                                                                     dtype=torch.float64)
    t = 623
    a, b = ab(t).sqrt(), (1 - ab(t)).sqrt()
    x = a * x0 + b * eps
    out = {"epsilon": eps, "v_prediction": a * eps - b * x0, "sample": x0}[pred]  # v: Salimans & Ho eq. (B.?)
    x0_hat, eps_hat = onestep.x0_and_eps(out, x, a, b, pred)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, eps)


def test_flow_x0_follows_instaflow_euler_convention():
    x, v = torch.randn(3, 4), torch.randn(3, 4)
    x0, _ = onestep.x0_and_eps(v, x, *NoiseSchedule.flow().scales(1000.0), "flow")
    torch.testing.assert_close(x0, x + v)  # one Euler step from t = T with dt = 1


def test_unknown_prediction_type_is_an_error():
    with pytest.raises(ValueError, match="prediction_type"):
        onestep.x0_and_eps(torch.zeros(1), torch.zeros(1), 1.0, 0.0, "x_start")


class Scripted:
    """A fake network: returns fixed outputs per step and records the inputs and timesteps it saw."""

    def __init__(self, outputs):
        self.outputs, self.calls = outputs, []

    def run(self, sampler, x, noises):
        noises = list(noises)
        for i in range(len(sampler)):
            self.calls.append(sampler.model_timestep(i))
            x, _ = sampler.step(self.outputs[i].float(), i, x, lambda: noises.pop(0).float())
        return x, noises


def _data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 4, 3, 3, generator=g, dtype=torch.float64) for _ in range(n)]


def test_consistency_multistep_reference():
    """CM Alg. 1 / DMD2: x0 = (x − √(1−ᾱ)ε)/√ᾱ, x_next = √ᾱ_next·x0 + √(1−ᾱ_next)·z; output the last x0."""
    ts = [999, 749, 499, 249]
    eps, z, (x,) = _data(4), _data(3, seed=1), _data(1, seed=2)
    ref = x.clone()
    for i, t in enumerate(ts):
        x0 = (ref - (1 - ab(t)).sqrt() * eps[i]) / ab(t).sqrt()
        ref = x0 if i == 3 else ab(ts[i + 1]).sqrt() * x0 + (1 - ab(ts[i + 1])).sqrt() * z[i]
    out, left = Scripted(eps).run(FewStepSampler(VP, ts, "epsilon", StepRule("consistency")), x.float(), z)
    assert not left  # exactly one draw per non-final step
    assert_close_to_scale(out.double(), ref)


@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("final", ["x0", "t0"])
def test_tcd_gamma_sampling_reference(gamma, final):
    """TCD eq. 9: s = ⌊(1−γ)t'⌋, x_s = √ᾱ_s x0 + √(1−ᾱ_s) ε, x_t' = √(ᾱ_t'/ᾱ_s) x_s + √(1−ᾱ_t'/ᾱ_s) z."""
    ts = [999, 759, 499, 259]
    eps, z, (x,) = _data(4), _data(3, seed=1), _data(1, seed=2)
    ref, zs = x.clone(), list(z)
    for i, t in enumerate(ts):
        x0 = (ref - (1 - ab(t)).sqrt() * eps[i]) / ab(t).sqrt()
        t_next = ts[i + 1] if i < 3 else 0
        if i == 3 and final == "x0":
            ref = x0
            break
        s = math.floor((1 - gamma) * t_next)
        x_s = ab(s).sqrt() * x0 + (1 - ab(s)).sqrt() * eps[i]
        if i == 3 or gamma == 0:
            ref = x_s
        else:
            r = ab(t_next) / ab(s)
            ref = r.sqrt() * x_s + (1 - r).sqrt() * zs.pop(0)
    sampler = FewStepSampler(VP, ts, "epsilon", StepRule("tcd", gamma=gamma, final=final))
    out, left = Scripted(eps).run(sampler, x.float(), z)
    assert len(left) == (3 if gamma == 0 else 0)  # γ = 0 never draws noise
    assert_close_to_scale(out.double(), ref)


def test_tcd_gamma_zero_is_ddim():
    """γ = 0: x_next = √ᾱ_next·x0 + √(1−ᾱ_next)·ε (DDIM η = 0, Song et al. 2021 eq. 12)."""
    ts = [999, 499]
    eps, (x,) = _data(2), _data(1, seed=2)
    x0 = (x - (1 - ab(999)).sqrt() * eps[0]) / ab(999).sqrt()
    x1 = ab(499).sqrt() * x0 + (1 - ab(499)).sqrt() * eps[0]
    ref = (x1 - (1 - ab(499)).sqrt() * eps[1]) / ab(499).sqrt()
    out, _ = Scripted(eps).run(FewStepSampler(VP, ts, "epsilon", StepRule("tcd", gamma=0.0, final="x0")), x.float(), [])
    assert_close_to_scale(out.double(), ref)


def test_ancestral_reference():
    """Euler-ancestral in σ = √((1−ᾱ)/ᾱ) space: x_VE ← x0 + σ_down·ε + σ_up·z, σ_up² = σ_n²(σ²−σ_n²)/σ²."""
    ts = [999, 499]
    eps, z, (x,) = _data(2), _data(1, seed=1), _data(1, seed=2)
    sig = lambda t: ((1 - ab(t)) / ab(t)).sqrt()  # noqa: E731
    x_ve = x / ab(999).sqrt()
    x0 = x_ve - sig(999) * eps[0]
    up = (sig(499) ** 2 * (sig(999) ** 2 - sig(499) ** 2) / sig(999) ** 2).sqrt()
    down = (sig(499) ** 2 - up**2).sqrt()
    x_ve = x0 + down * eps[0] + up * z[0]
    ref = x_ve - sig(499) * eps[1]  # last step: x0
    out, _ = Scripted(eps).run(FewStepSampler(VP, ts, "epsilon", StepRule("ancestral")), x.float(), z)
    assert_close_to_scale(out.double(), ref)


def test_lcm_boundary_condition():
    c_skip, c_out = onestep.lcm_boundary(249)
    assert c_skip == pytest.approx(0.25 / (2490**2 + 0.25))  # LCM: σ_data = 0.5, t scaled ×10
    assert c_out == pytest.approx(2490 / math.sqrt(2490**2 + 0.25))
    c_skip0, c_out0 = onestep.lcm_boundary(0)
    assert (c_skip0, c_out0) == (1.0, 0.0)  # f(x, 0) = x


def test_timestep_shift_feeds_the_network_the_shifted_timestep():
    sampler = FewStepSampler(VP, [999, 749, 499, 249], "epsilon", StepRule("consistency"), timestep_shift=0.25)
    net = Scripted(_data(4))
    net.run(sampler, torch.zeros(1, 4, 3, 3), _data(3))
    assert net.calls == [249, 187, 124, 62]  # (t·250/1000).long(), NitroFusion-Realism


def test_guidance_embedding_is_sinusoidal_in_w_times_1000():
    emb = onestep.guidance_scale_embedding(torch.tensor([7.5]), 8)
    freqs = torch.exp(-math.log(10000.0) * torch.arange(4, dtype=torch.float64) / 3)
    ref = torch.cat([torch.sin(7500 * freqs), torch.cos(7500 * freqs)])
    torch.testing.assert_close(emb[0].double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("timesteps,match", [
    ([1000], r"integers in \[0, 1000\)"), ([-1], r"\[0, 1000\)"), ([499, 999], "decreasing"), ([], "empty"),
    ([500.5], "integers"),
])
def test_bad_timesteps_are_rejected(timesteps, match):
    with pytest.raises(ValueError, match=match):
        FewStepSampler(VP, timesteps, "epsilon")


def test_bad_rules_are_rejected():
    with pytest.raises(ValueError, match=r"gamma.*\[0, 1\]"):
        StepRule("tcd", gamma=1.5)
    with pytest.raises(ValueError, match="rule"):
        StepRule("euler")
    with pytest.raises(ValueError, match="deterministic"):
        FewStepSampler(NoiseSchedule.flow(), [1000.0], "flow", StepRule("consistency"))
    with pytest.raises(ValueError, match="does not fit"):
        FewStepSampler(VP, [999], "flow")
