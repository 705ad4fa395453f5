"""One- and few-step sampling for distilled generators, written once for diffusers and ComfyUI.

A step turns the network output into a clean estimate ``x0`` (and the matching noise estimate ``eps``), then moves
to the next timestep by one of two rules:

* ``"consistency"`` — consistency-model multistep sampling (Song et al. 2023, Alg. 1), as used by DMD2, LCM, ADD
  (SD/SDXL-Turbo), Hyper-SD's 1-step UNet and NitroFusion: re-noise ``x0`` with fresh noise,
  ``x_next = a_next·x0 + b_next·z``; the last step returns ``x0``.
* ``"tcd"`` — gamma sampling of TCD (Zheng et al. 2024, eq. 9; the VP form of CTM's γ-sampling): go to the
  intermediate ``s = floor((1−γ)·t_next)`` along the predicted trajectory, then re-noise to ``t_next``:
  ``x_s = a_s·x0 + b_s·eps``, ``x_next = (a_next/a_s)·x_s + sqrt(1 − a_next²/a_s²)·z``. γ=0 is deterministic
  (DDIM, and Euler in σ-space), γ=1 re-noises fully. The last step returns ``x_s`` at ``t = 0`` (``final="t0"``,
  what TCD and trailing DDIM output) or ``x0`` (``final="x0"``, what Euler outputs).
* ``"ancestral"`` — ancestral sampling (DDPM posterior, η=1; Euler-ancestral in σ = b/a space, the sampler of the
  SDXL-Turbo folder): ``σ_up = σ_n·sqrt(1 − σ_n²/σ²)``, ``σ_down = sqrt(σ_n² − σ_up²)``,
  ``x_next = a_next·(x0 + σ_down·eps + σ_up·z)``; the last step returns ``x0``.

Timesteps are in the model's training units (0 … T−1 for VP models, T … 0 for rectified flow). ``a``/``b`` are the
signal and noise scales of ``x_t = a·x0 + b·eps``: VP ``a = √ᾱ_t, b = √(1−ᾱ_t)``; rectified flow (InstaFlow)
``a = 1 − t/T, b = t/T``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch

PredictionType = Literal["epsilon", "v_prediction", "sample", "flow"]
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")
RULES = ("consistency", "tcd", "ancestral")
INIT_NOISE = ("unit", "sigma_max")


def alphas_cumprod(beta_start: float = 0.00085, beta_end: float = 0.012, num_train_timesteps: int = 1000,
                   beta_schedule: str = "scaled_linear") -> torch.Tensor:
    """ᾱ_t of the DDPM forward process, float32 and in the same operation order as diffusers' schedulers."""
    if beta_schedule == "scaled_linear":  # LDM: linear in √β
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    else:
        raise ValueError(f"`beta_schedule` must be 'scaled_linear' or 'linear', got {beta_schedule!r}.")
    return torch.cumprod(1.0 - betas, dim=0)


@dataclass(frozen=True)
class NoiseSchedule:
    """``x_t = a(t)·x0 + b(t)·eps``: VP (DDPM ᾱ table) or rectified flow (linear interpolation)."""

    kind: Literal["vp", "flow"]
    num_train_timesteps: int = 1000
    alphas_cumprod: torch.Tensor | None = None  # [T] float32, VP only

    @classmethod
    def vp(cls, alphas_cumprod: torch.Tensor) -> "NoiseSchedule":
        return cls("vp", len(alphas_cumprod), alphas_cumprod)

    @classmethod
    def flow(cls, num_train_timesteps: int = 1000) -> "NoiseSchedule":
        return cls("flow", num_train_timesteps)

    def alpha_bar(self, t: float) -> torch.Tensor:
        if self.kind != "vp":
            raise ValueError("ᾱ is defined for VP schedules only; rectified flow has no ᾱ table.")
        return self.alphas_cumprod[int(t)]

    def scales(self, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) at timestep ``t``, as 0-dim float32 tensors."""
        if self.kind == "vp":
            ab = self.alpha_bar(t)
            return ab.sqrt(), (1 - ab).sqrt()
        s = torch.full((), t / self.num_train_timesteps, dtype=torch.float32)  # like the VP path: no host-data tensor
        return 1 - s, s

    def check_timesteps(self, timesteps: Sequence[float]) -> None:
        if len(timesteps) == 0:
            raise ValueError("`timesteps` is empty; give at least one timestep.")
        T = self.num_train_timesteps
        for t in timesteps:
            if self.kind == "vp" and not (0 <= t < T and float(t).is_integer()):
                raise ValueError(f"`timesteps` must be integers in [0, {T}) for this model, got {list(timesteps)}.")
            if self.kind == "flow" and not (0 < t <= T):
                raise ValueError(f"`timesteps` must lie in (0, {T}] for a rectified-flow model, got {list(timesteps)}.")
        if any(b >= a for a, b in zip(timesteps, timesteps[1:])):
            raise ValueError(f"`timesteps` must be strictly decreasing, got {list(timesteps)}.")


def x0_and_eps(model_output: torch.Tensor, x: torch.Tensor, a, b, prediction_type: str):
    """Clean and noise estimates from the network output at ``x_t = a·x0 + b·eps``."""
    if prediction_type == "epsilon":
        return (x - b * model_output) / a, model_output
    if prediction_type == "v_prediction":  # v = a·eps − b·x0 (Salimans & Ho 2022)
        return a * x - b * model_output, a * model_output + b * x
    if prediction_type == "sample":
        return model_output, (x - a * model_output) / b
    if prediction_type == "flow":  # InstaFlow: v = x0 − eps, so x0 = x + b·v and eps = x − a·v
        return x + b * model_output, x - a * model_output
    raise ValueError(f"`prediction_type` must be one of {PREDICTION_TYPES}, got {prediction_type!r}.")


def lcm_boundary(t: float, timestep_scaling: float = 10.0, sigma_data: float = 0.5) -> tuple[float, float]:
    """LCM's consistency-function parameterisation f = c_skip·x + c_out·x0 (LCM eq. 9, discrete-time scaling)."""
    st = t * timestep_scaling
    return sigma_data**2 / (st**2 + sigma_data**2), st / (st**2 + sigma_data**2) ** 0.5


def guidance_scale_embedding(w: torch.Tensor, embedding_dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the guidance weight for LCM UNets with ``time_cond_proj_dim`` (VDM-style, w·1000)."""
    w = w.float() * 1000.0
    half = embedding_dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    emb = w[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if embedding_dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb  # [B, embedding_dim]


@dataclass(frozen=True)
class StepRule:
    """How a sampler moves between timesteps; see the module docstring."""

    rule: Literal["consistency", "tcd", "ancestral"] = "consistency"
    gamma: float = 1.0  # TCD's γ (diffusers' `eta`); used by "tcd" only
    final: Literal["x0", "t0"] = "x0"
    boundary: Literal["none", "lcm"] = "none"

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"`rule` must be one of {RULES}, got {self.rule!r}.")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"`gamma` must be in [0, 1] (0 deterministic, 1 full re-noise), got {self.gamma}.")
        if self.final not in ("x0", "t0"):
            raise ValueError(f"`final` must be 'x0' or 't0', got {self.final!r}.")
        if self.boundary not in ("none", "lcm"):
            raise ValueError(f"`boundary` must be 'none' or 'lcm', got {self.boundary!r}.")

    def with_gamma(self, gamma: float) -> "StepRule":
        """CTM/TCD γ-sampling in place of this rule; a TCD rule keeps its ending, others end as TCD does (t = 0)."""
        return StepRule("tcd", gamma=gamma, final=self.final if self.rule == "tcd" else "t0", boundary=self.boundary)


class FewStepSampler:
    """Runs a fixed list of timesteps with one :class:`StepRule`.

    ``timestep_shift`` scales the timestep the *network* sees and the one its output is converted at (NitroFusion
    evaluates its UNet at ``t·shift`` and re-noises to the unshifted next ``t``). Random numbers are drawn only by
    ``noise()`` and only where a step re-noises: one draw per non-final step (consistency, or TCD with γ>0), in step
    order — the same order as diffusers' LCM/TCD schedulers, so one generator gives the same latents in both.
    """

    def __init__(self, schedule: NoiseSchedule, timesteps: Sequence[float], prediction_type: str,
                 rule: StepRule = StepRule(), timestep_shift: float = 1.0, init_noise: str = "unit"):
        schedule.check_timesteps(timesteps)
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"`prediction_type` must be one of {PREDICTION_TYPES}, got {prediction_type!r}.")
        if (prediction_type == "flow") != (schedule.kind == "flow"):
            raise ValueError(f"prediction_type {prediction_type!r} does not fit a {schedule.kind!r} noise schedule.")
        if schedule.kind == "flow" and (rule.rule != "tcd" or rule.gamma > 0 or rule.boundary == "lcm"):
            raise ValueError("Rectified-flow models support deterministic steps only (rule='tcd', gamma=0).")
        if not 0.0 < timestep_shift <= 1.0:
            raise ValueError(f"`timestep_shift` must be in (0, 1], got {timestep_shift}.")
        if init_noise not in INIT_NOISE:
            raise ValueError(f"`init_noise` must be one of {INIT_NOISE}, got {init_noise!r}.")
        self.init_noise = init_noise
        self.schedule = schedule
        self.timesteps = [float(t) for t in timesteps]
        self.prediction_type = prediction_type
        self.rule = rule
        self.timestep_shift = timestep_shift

    def __len__(self) -> int:
        return len(self.timesteps)

    def initial_scale(self) -> torch.Tensor | float:
        """x_T = scale·z for z ~ N(0, I). "unit": 1 (LCM/TCD/DDIM, the papers). "sigma_max": b(t_0) = √(1−ᾱ_T), what
        diffusers' Euler schedulers do for trailing/linspace spacing (they start at σ_max·z in σ-space, not at
        √(σ_max²+1)·z), and hence what SD-Turbo/SDXL-Turbo/SDXL-Lightning model cards run."""
        if self.init_noise == "unit":
            return 1.0
        return self.schedule.scales(self.model_timestep(0))[1]

    def model_timestep(self, i: int) -> float:
        """The timestep fed to the network at step ``i``."""
        t = self.timesteps[i]
        if self.timestep_shift != 1.0:
            t = math.floor(t * self.timestep_shift)
        return int(t) if self.schedule.kind == "vp" else t

    def step(self, model_output: torch.Tensor, i: int, x: torch.Tensor,
             noise: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """One step from ``x`` at ``timesteps[i]``; returns ``(x_next, x0)`` (``x_next`` is the output at the end)."""
        sched, rule = self.schedule, self.rule
        t = self.model_timestep(i)
        a, b = sched.scales(t)
        x0, eps = x0_and_eps(model_output, x, a, b, self.prediction_type)
        if rule.boundary == "lcm":
            c_skip, c_out = lcm_boundary(t)
            x0 = c_out * x0 + c_skip * x
        last = i == len(self.timesteps) - 1

        if rule.rule == "consistency":
            if last:
                return x0, x0
            a_n, b_n = sched.scales(self.timesteps[i + 1])
            return a_n * x0 + b_n * noise(), x0

        if rule.rule == "ancestral":
            if last:
                return x0, x0
            a_n, b_n = sched.scales(self.timesteps[i + 1])
            sigma, sigma_n = b / a, b_n / a_n
            sigma_up = (sigma_n**2 * (sigma**2 - sigma_n**2) / sigma**2) ** 0.5
            sigma_down = (sigma_n**2 - sigma_up**2) ** 0.5
            return a_n * (x0 + sigma_down * eps + sigma_up * noise()), x0

        # TCD eq. 9: s = floor((1 − γ)·t_next); the last step targets t_next = 0.
        t_next = 0 if last else self.timesteps[i + 1]
        if last and rule.final == "x0":
            return x0, x0
        t_s = t_next if rule.gamma == 0 else math.floor((1 - rule.gamma) * t_next)
        a_s, b_s = sched.scales(t_s)
        x_s = a_s * x0 + b_s * eps
        if last or rule.gamma == 0:
            return x_s, x0
        ratio = sched.alpha_bar(t_next) / sched.alpha_bar(t_s)  # ᾱ_next/ᾱ_s
        return ratio.sqrt() * x_s + (1 - ratio).sqrt() * noise(), x0


def sample_sigma_space(denoise: Callable[[torch.Tensor, float], torch.Tensor], sampler: FewStepSampler,
                       noise: torch.Tensor, noise_fn: Callable[[], torch.Tensor],
                       latent: torch.Tensor | None = None,
                       on_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Run `sampler` through a σ-space denoiser, the k-diffusion / ComfyUI convention.

    ``denoise(x_ve, σ)`` returns x0 for ``x_ve = x0 + σ·eps`` with ``σ = b/a``; the VP sample the sampler works on is
    ``x = a·x_ve``. Starting point, from the raw unit noise ``z``: text-to-image (``latent`` None or all zeros) starts
    at ``x = initial_scale·z`` exactly like `OneStepPipeline` (pure noise even when ``t_0 < T``, as DMD2's 1-step
    model expects); otherwise ``x = a_0·latent + b_0·z`` (the forward process at ``t_0``, for img2img).
    ``on_step(i, x0, x_next)`` runs after every step. Returns the final VP sample (the clean latent).
    """
    if sampler.prediction_type != "sample":
        raise ValueError("sample_sigma_space feeds x0 to the sampler: build it with prediction_type='sample'.")
    if latent is None or not torch.any(latent):
        x = noise * sampler.initial_scale()
    else:
        a0, b0 = sampler.schedule.scales(sampler.timesteps[0])
        x = a0 * latent + b0 * noise
    for i in range(len(sampler)):
        a, b = sampler.schedule.scales(sampler.model_timestep(i))
        # the network sees x at its (possibly shifted) timestep: x_ve = x/a, σ = b/a
        x0 = denoise(x / a, float(b / a))
        x, x0 = sampler.step(x0, i, x, noise_fn)
        if on_step is not None:
            on_step(i, x0, x)
    return x
