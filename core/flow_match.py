"""Flow matching (rectified-flow DiTs: SD3, FLUX.1/FLUX.2, Z-Image, Qwen-Image, …): the σ grid, its time shifts and
the Euler step, written once for every pipeline and node.

Convention (SD3 paper, Esser et al. 2024, eq. 1 / §3.1): x_σ = (1 − σ)·x0 + σ·ε, σ ∈ [0, 1]; the network predicts
the velocity v = ε − x0, so x0 = x_σ − σ·v and one Euler step to σ' is x_σ' = x_σ + (σ' − σ)·v. The network sees
t = σ·T (T = 1000 training steps).

Shifts (a monotone map of σ ∈ (0, 1] onto itself that spends more steps at high noise):
- static, SD3 §5.3.2 eq. 23: σ' = s·σ / (1 + (s − 1)·σ) — `shift` in diffusers' FlowMatchEulerDiscreteScheduler;
- resolution-dependent (FLUX.1's sampling code): σ' = e^μ / (e^μ + (1/σ − 1)), with μ linear in the number of image
  tokens between (base_seq_len, base_shift) and (max_seq_len, max_shift) — `use_dynamic_shifting` with
  `time_shift_type="exponential"`; the "linear" type uses μ in place of e^μ. FLUX.2 makes μ depend on the step
  count too (`flux2_mu`). With μ = log s the exponential shift is
  the static shift s (Qwen-Image-Lightning fixes base_shift = max_shift = log 3 for that reason);
- terminal stretch (LTX-Video): the shifted grid rescaled so that its last σ equals `shift_terminal`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def static_shift(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3 eq. 23: σ' = s·σ / (1 + (s − 1)·σ)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def dynamic_shift(sigmas: torch.Tensor, mu: float, kind: str = "exponential") -> torch.Tensor:
    """Resolution-dependent shift: σ' = m / (m + (1/σ − 1)) with m = e^μ ("exponential", FLUX.1) or μ ("linear")."""
    if kind not in ("exponential", "linear"):
        raise ValueError(f"`kind` must be 'exponential' or 'linear', got {kind!r}.")
    m = math.exp(mu) if kind == "exponential" else mu
    return m / (m + (1 / sigmas - 1))


def resolution_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                  max_shift: float = 1.15) -> float:
    """μ on the line through (base_seq_len, base_shift) and (max_seq_len, max_shift) (FLUX.1's defaults)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)


def flux2_mu(image_seq_len: int, steps: int) -> float:
    """FLUX.2's empirical μ (black-forest-labs/flux2 sampling; diffusers `compute_empirical_mu`): linear in the token
    count at 10 and at 200 steps, interpolated linearly in the step count between them; above 4300 tokens the
    200-step line alone."""
    at_200 = 0.00016927 * image_seq_len + 0.45666666
    if image_seq_len > 4300:
        return at_200
    at_10 = 8.73809524e-05 * image_seq_len + 1.89833333
    return at_200 + (at_200 - at_10) / 190.0 * (steps - 200)


def stretch_to_terminal(sigmas: torch.Tensor, terminal: float) -> torch.Tensor:
    """Rescale 1 − σ so that the last σ becomes `terminal` (the first stays where the shift put it)."""
    if not sigmas[-1] < 1:
        raise ValueError(f"a terminal stretch needs a grid ending below σ = 1 (one step at σ = 1 has nothing to "
                         f"stretch; the stock scheduler returns NaN there), got {sigmas.tolist()}.")
    return 1 - (1 - sigmas) * (1 - terminal) / (1 - sigmas[-1])


def flow_sigmas(steps: int | None = None, sigmas: Sequence[float] | None = None, shift: float = 1.0,
                mu: float | None = None, shift_kind: str = "exponential", terminal: float | None = None,
                sigma_max: float = 1.0, sigma_min: float | None = None) -> torch.Tensor:
    """The σ grid of a few-step flow recipe, with the final 0 appended (steps + 1 values, decreasing).

    The base grid is `sigmas` if given, else `steps` values evenly spaced from σ_max down to σ_min (default 1/steps,
    what the FLUX/SD3 pipelines pass). `mu` selects the resolution-dependent shift, else the static `shift`."""
    if sigmas is None:
        if not steps or steps < 1:
            raise ValueError(f"`steps` must be a positive integer, got {steps!r}.")
        sigmas = torch.linspace(sigma_max, 1 / steps if sigma_min is None else sigma_min, steps, dtype=torch.float64)
    else:
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
        if sigmas.ndim != 1 or len(sigmas) == 0 or not ((sigmas > 0) & (sigmas <= 1)).all() \
                or (sigmas[1:] >= sigmas[:-1]).any():
            raise ValueError(f"`sigmas` must be strictly decreasing values in (0, 1], got {sigmas.tolist()}.")
    shifted = dynamic_shift(sigmas, mu, shift_kind) if mu is not None else static_shift(sigmas, shift)
    if terminal:
        shifted = stretch_to_terminal(shifted, terminal)
    return torch.cat([shifted, shifted.new_zeros(1)])


def flow_x0(v: torch.Tensor, x: torch.Tensor, sigma) -> torch.Tensor:
    """x0 = x_σ − σ·v for a velocity-predicting network (v = ε − x0)."""
    return x - sigma * v


def flow_euler_step(v: torch.Tensor, x: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """One Euler step of dx/dσ = v from σ to σ_next (σ_next = 0 lands on x0)."""
    return x + (sigma_next - sigma) * v
