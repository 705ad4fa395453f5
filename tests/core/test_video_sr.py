"""DLoRAL maths: flow warp and the chunked cross-frame absolute attention against float64 references."""

import pytest
import torch

from swiftstep.core import video_sr

from ..video_fixtures import ref_flow_warp


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("h, w", [(7, 9), (16, 16), (33, 20)])
def test_flow_warp_is_bilinear_sampling_with_zeros_outside(dtype, tol, h, w):
    g = torch.Generator().manual_seed(h * w)
    x = torch.randn(2, 3, h, w, generator=g, dtype=dtype)
    flow = torch.randn(2, h, w, 2, generator=g, dtype=dtype) * 3  # reaches outside the frame
    out = video_sr.flow_warp(x, flow)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out.double(), ref_flow_warp(x, flow), rtol=0, atol=tol)
    zero = video_sr.flow_warp(x, torch.zeros_like(flow))
    torch.testing.assert_close(zero, x, rtol=0, atol=tol)  # no motion, no change
    shifted = video_sr.flow_warp(x, torch.ones_like(flow) * torch.tensor([1.0, 0.0], dtype=dtype))
    torch.testing.assert_close(shifted[..., :-1], x[..., 1:], rtol=0, atol=tol)  # u = +1 reads one pixel right
    assert shifted[..., -1].abs().max() == 0


def test_flow_warp_checks_sizes():
    with pytest.raises(ValueError, match=r"the input is \(8, 8\) but the flow is \(4, 4\)"):
        video_sr.flow_warp(torch.zeros(1, 1, 8, 8), torch.zeros(1, 4, 4, 2))


def _reference_attention(q, k, v, threshold):
    sim = q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5
    return torch.relu((sim - threshold.double()[..., None]) / video_sr.CFR_TEMPERATURE) @ v.double()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.float16, 3e-3)])
@pytest.mark.parametrize("chunk", [None, 1, 7, 64, 4096])
def test_absolute_attention_chunks_are_exact(dtype, tol, chunk):
    g = torch.Generator().manual_seed(0)
    b, heads, n, d = 2, 3, 63, 16
    q, k, v = (torch.randn(b, heads, n, d, generator=g) * 20 for _ in range(3))
    threshold = torch.randn(b, heads, n, generator=g) * 20
    threshold[..., :5] = 1e4  # rows that match nothing: all zero (no softmax to renormalise them)
    ref = _reference_attention(q, k, v, threshold)
    assert (ref == 0).any() and (ref != 0).any()  # some rows below threshold, some above
    out = video_sr.absolute_attention(q.to(dtype), k.to(dtype), v.to(dtype), threshold.to(dtype), chunk=chunk)
    assert out.dtype == dtype and out.shape == (b, heads, n, d)
    err = (out.double() - ref).abs().max() / ref.abs().max()
    assert err <= tol, err


def test_x0_and_the_flow_size_rule():
    latent8 = torch.arange(16.0).view(1, 8, 1, 2)
    eps = torch.ones(1, 4, 1, 2)
    torch.testing.assert_close(video_sr.dloral_x0(eps, latent8), latent8[:, 4:] - 1)
    video_sr.check_flow_size(512, 520)
    with pytest.raises(ValueError, match=r"at least 512×512 px.*got 1024×504"):
        video_sr.check_flow_size(504, 1024)
