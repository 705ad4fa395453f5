"""The scale-relative comparison used across the suite: it must pass summation-order noise and fail real errors."""

import pytest
import torch

from .tolerance import assert_close_to_scale


def test_reordered_float32_sums_pass_and_real_errors_fail():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1000, generator=g) * 1000
    w = torch.randn(1000, 8, generator=g)
    ref = (x.double() @ w.double())
    reordered = (x[:, torch.randperm(1000, generator=g)] @ w[torch.randperm(1000, generator=g)])  # other values
    assert_close_to_scale((x @ w), ref)                                     # float32 vs float64: passes
    assert_close_to_scale(x.flip(1) @ w.flip(0), x @ w)                     # summed in the other order: passes
    with pytest.raises(AssertionError, match="relative"):
        assert_close_to_scale(reordered, ref)                               # different maths: fails
    wrong = ref.clone()
    wrong.view(-1)[ref.abs().argmax()] *= 1.0001                            # 1e-4 of the largest value
    with pytest.raises(AssertionError):
        assert_close_to_scale(wrong, ref, rel=1e-5)
    nan = ref.clone()
    nan[0, 0] = float("nan")
    with pytest.raises(AssertionError):
        assert_close_to_scale(nan, ref)
    with pytest.raises(AssertionError, match="shape"):
        assert_close_to_scale(ref[:1], ref)
