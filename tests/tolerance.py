"""Tolerances relative to the values' scale.

Two float32 computations of the same maths (another CPU's BLAS, a CUDA graph, a batched vs a looped call) differ in
summation order, so they agree to a few float32 ulps *of the largest values involved*, not of each element: an
element near a cancellation can differ by 1e-4 relative while being exact to 1e-7 of the tensor's scale. An
element-wise `rtol` then fails on one machine and passes on another; a bound relative to the scale cannot.
"""

from __future__ import annotations

import torch

FLOAT32_ORDER = 1e-5  # reordering float32 sums over ~10³ terms: ≈ 2⁻²⁴·√10³·(a few); measured ≤ 3e-6 here


def assert_close_to_scale(actual, expected, rel: float = FLOAT32_ORDER, scale: float | None = None,
                          what: str = ""):
    """max |actual − expected| ≤ rel · scale, where scale defaults to max |expected| (1 where that is 0)."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert actual.shape == expected.shape, f"{what} shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(expected).all(), f"{what} reference is not finite"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if scale is None:
        scale = e.abs().max().item() if e.numel() else 1.0
        scale = scale or 1.0
    err = (a - e).abs().max().item() if e.numel() else 0.0
    assert err <= rel * scale, (f"{what} max |Δ| = {err:.3g} > {rel:g} × scale {scale:.3g} "
                                f"(relative {err / scale:.3g})")  # NaN in `actual` fails here too
