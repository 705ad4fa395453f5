"""Finite-number argument check: a NaN or ±inf strength, scale or temperature would run and return a NaN image."""

from __future__ import annotations

import math
import numbers


def check_finite(name: str, value) -> float:
    """`value` as a float; a ValueError naming the argument `name` unless it is a finite real number (bools too)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
    return float(value)


def check_finite_tensor(name: str, tensor, what: str = "finite values") -> None:
    """A ValueError naming `name` and counting the NaN/inf entries of a tensor argument (e.g. user `latents`)."""
    import torch

    bad = ~torch.isfinite(tensor)
    if bad.any():
        raise ValueError(f"`{name}` must be {what}, got {int(bad.sum())} NaN/inf values of {tensor.numel()}.")
