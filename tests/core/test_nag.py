"""core.nag edge cases that the processor references do not reach."""

import pytest
import torch

from swiftstep.core import nag, nasa


def test_nag_stays_finite_when_z_pos_is_zero():
    z_pos, z_neg = torch.zeros(1, 3, 8), torch.randn(1, 3, 8)
    out = nag.nag_combine(z_pos, z_neg, nag_scale=3.0, tau=2.5, alpha=0.5)
    assert torch.isfinite(out).all()


def test_nag_clip_bounds_the_norm_growth_by_tau():
    g = torch.Generator().manual_seed(0)
    z_pos, z_neg = torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    out = nag.nag_combine(z_pos, z_neg, nag_scale=10.0, tau=1.5, alpha=1.0)
    ratio = out.norm(p=1, dim=-1) / z_pos.norm(p=1, dim=-1)
    assert (ratio <= 1.5 + 1e-5).all() and (ratio > 1.4).any()


def test_no_guidance_returns_z_pos_exactly():
    z_pos, z_neg = torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    assert torch.equal(nag.nag_combine(z_pos, z_neg, 1.0, 2.5, 0.375), z_pos)
    assert torch.equal(nasa.nasa_combine(z_pos, z_neg, 0.0), z_pos)


def test_l2_ratio_is_the_official_joint_attention_formula():
    # ChenDarYen/Normalized-Attention-Guidance attention_flux_nag.py: g = s·Z+ − (s−1)·Z−, r = ‖g‖₂/‖Z+‖₂ per token,
    # g·min(r, τ)/r, then α·g + (1−α)·Z+
    g = torch.Generator().manual_seed(0)
    z_pos, z_neg = torch.randn(2, 7, 24, generator=g, dtype=torch.float64), torch.randn(2, 7, 24, generator=g,
                                                                                         dtype=torch.float64)
    s, tau, a = 5.0, 2.5, 0.25
    guided = z_pos * s - z_neg * (s - 1)
    r = guided.pow(2).sum(-1, keepdim=True).sqrt() / z_pos.pow(2).sum(-1, keepdim=True).sqrt()
    expected = guided * torch.minimum(r, torch.tensor(tau, dtype=torch.float64)) / r * a + z_pos * (1 - a)
    torch.testing.assert_close(nag.nag_combine(z_pos, z_neg, s, tau, a, norm=2), expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(nag.nag_combine(z_pos, z_neg, s, tau, a, norm=1), expected)
    with pytest.raises(ValueError, match="`nag_norm` must be 1"):
        nag.check_params(s, tau, a, norm=3)
