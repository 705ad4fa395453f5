"""DiSA step annealing (arXiv 2505.20297) and the maths of MAR's sampler (arXiv 2406.11838), torch/numpy only.

MAR generates 256 latent tokens over `num_iter` iterations; each iteration draws its new tokens with a small
diffusion head (IDDPM: 1000-step cosine β schedule, ε-prediction with learned variance, respaced to T steps).
DiSA lowers T as tokens accumulate: many head steps early, few late (training-free).

* `step_schedule`: T per iteration — linear / cosine / two-stage / constant between `steps_start` and `steps_end`
  (DiSA `diffloss.py`).
* `HeadDiffusion(T, clip)`: the respaced head diffusion. DiSA's released code clips every respaced timestep at 950
  (`official_compat`: chains start at t=950, and T ≥ 22 then runs fewer than T steps after de-duplication);
  `clip=None` is MAR's own respacing.
* `mask_lengths`, `cfg_scale`: MAR's cosine mask schedule and linear CFG schedule over the next mask length.
"""

from __future__ import annotations

import math

import numpy as np
import torch

STRATEGIES = ("disa-linear", "disa-cosine", "disa-two-stage", "constant")
OFFICIAL_CLIP = 950  # DiSA's create_diffusion(clip_timesteps=950)


def step_schedule(strategy: str, num_iter: int, steps_start: int, steps_end: int) -> list[int]:
    """Head diffusion steps T for AR iterations 0 … num_iter−1 (DiSA `diffloss.py`: index = AR step)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"`step_schedule` must be one of {STRATEGIES}, got {strategy!r}.")
    if num_iter < 1 or steps_end < 1 or steps_start < steps_end:
        raise ValueError(f"need num_iter ≥ 1 and steps_start ≥ steps_end ≥ 1, got {num_iter}, {steps_start}, "
                         f"{steps_end}.")
    upper, span = max(num_iter - 1, 1), steps_start - steps_end
    out = []
    for step in range(num_iter):
        if strategy == "disa-linear":
            out.append(steps_end + math.floor((upper - step) / upper * span))
        elif strategy == "disa-cosine":
            out.append(steps_end + math.floor((math.cos(math.pi * step / upper) + 1) / 2 * span))
        elif strategy == "disa-two-stage":
            out.append(steps_start if step < upper / 2 else steps_end)
        else:  # DiSA's "constant" runs the lower count throughout (pass equal counts for MAR's own constant T)
            out.append(steps_end)
    return out


def space_timesteps(num_timesteps: int, count: int) -> list[int]:
    """IDDPM respacing with one section: `count` evenly spaced timesteps, rounded (Python's round), ends included."""
    if not 1 <= count <= num_timesteps:
        raise ValueError(f"cannot take {count} steps from {num_timesteps}.")
    stride = 1 if count <= 1 else (num_timesteps - 1) / (count - 1)
    return sorted({round(i * stride) for i in range(count)})


def cosine_betas(num_timesteps: int = 1000, max_beta: float = 0.999) -> np.ndarray:
    """IDDPM cosine schedule: β_i = min(1 − ᾱ(t_{i+1})/ᾱ(t_i), 0.999), ᾱ(t) = cos²((t + 0.008)/1.008 · π/2)."""
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
                     for i in range(num_timesteps)], dtype=np.float64)


class HeadDiffusion:
    """MAR's head diffusion respaced to T steps (float64 tables, cast to float32 on use as the official code does).

    `clip=950` reproduces DiSA's released code (`official_compat`); `clip=None` is MAR's respacing."""

    def __init__(self, steps: int, clip: int | None = None, num_timesteps: int = 1000):
        kept = space_timesteps(num_timesteps, steps)
        if clip is not None:
            kept = sorted({min(t, clip) for t in kept})
        base_ac = np.cumprod(1.0 - cosine_betas(num_timesteps))
        betas, last = [], 1.0
        for t in kept:  # SpacedDiffusion: β'_i = 1 − ᾱ_{t_i}/ᾱ_{t_{i−1}}
            betas.append(1.0 - base_ac[t] / last)
            last = base_ac[t]
        self.timestep_map = kept
        self.betas = np.array(betas, dtype=np.float64)
        ac = np.cumprod(1.0 - self.betas)
        ac_prev = np.append(1.0, ac[:-1])
        self.alphas_cumprod = ac
        self.posterior_variance = self.betas * (1.0 - ac_prev) / (1.0 - ac)
        # log of the posterior variance, clipped: the first entry (0) is replaced by the second
        # (T = 1: never used — the only step adds no noise; IDDPM leaves the table empty and cannot run T = 1)
        self.posterior_log_variance_clipped = (
            np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:])) if len(kept) > 1 else
            np.zeros(1))
        self.posterior_mean_coef1 = self.betas * np.sqrt(ac_prev) / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - ac_prev) * np.sqrt(1.0 - self.betas) / (1.0 - ac)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / ac)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / ac - 1.0)
        self.log_betas = np.log(self.betas)
        self._device_tables: dict = {}

    def __len__(self) -> int:
        return len(self.timestep_map)

    def _at(self, table: np.ndarray, i: int, like: torch.Tensor) -> torch.Tensor:
        """table[i] as a float32 scalar on `like`'s device (the official float32 cast). The tables go to the device
        once per diffusion, not once per step: the head is launch-bound and per-step copies dominate its time."""
        key = (id(table), like.device)
        cached = self._device_tables.get(key)
        if cached is None:
            cached = self._device_tables[key] = torch.tensor(table, dtype=torch.float32, device=like.device)
        return cached[i]

    def p_sample(self, model_output: torch.Tensor, x: torch.Tensor, i: int, noise: torch.Tensor,
                 temperature: float = 1.0) -> torch.Tensor:
        """One reverse step at respaced index i (IDDPM, learned-range variance, no x0 clipping; MAR scales the added
        noise by `temperature`). `model_output` = [ε, v] along the last dim; the network sees `timestep_map[i]`."""
        eps, v = model_output.chunk(2, dim=-1)
        x0 = self._at(self.sqrt_recip_alphas_cumprod, i, x) * x - self._at(self.sqrt_recipm1_alphas_cumprod, i, x) * eps
        mean = self._at(self.posterior_mean_coef1, i, x) * x0 + self._at(self.posterior_mean_coef2, i, x) * x
        frac = (v + 1) / 2
        log_var = frac * self._at(self.log_betas, i, x) + \
            (1 - frac) * self._at(self.posterior_log_variance_clipped, i, x)
        if i == 0:
            return mean  # no noise on the last step (the official code still draws it: `noise` is consumed)
        return mean + torch.exp(0.5 * log_var) * noise * temperature


def mask_lengths(seq_len: int, num_iter: int) -> list[int]:
    """MAR `sample_tokens`' mask length per iteration: floor(L·cos(π/2·(step+1)/N)) kept in [1, remaining − 1].
    Iteration `step` unmasks `remaining − mask_len` tokens, and the last iteration unmasks all that remain; the
    clamped length is also what the linear CFG schedule reads."""
    out, masked = [], seq_len
    for step in range(num_iter):
        mask_len = math.floor(seq_len * math.cos(math.pi / 2 * (step + 1) / num_iter))
        mask_len = max(1, min(masked - 1, mask_len))
        out.append(mask_len)
        masked = mask_len
    return out


def tokens_per_iteration(seq_len: int, num_iter: int) -> list[int]:
    lengths = mask_lengths(seq_len, num_iter)
    prev = [seq_len] + lengths[:-1]
    return [p - m for p, m in zip(prev[:-1], lengths[:-1])] + [prev[-1]]


def cfg_scale(cfg: float, schedule: str, mask_len: int, seq_len: int) -> float:
    """MAR's CFG per iteration: linear ramps with the *next* mask length, `1 + (cfg − 1)·(L − mask_len)/L`."""
    if schedule == "linear":
        return 1 + (cfg - 1) * (seq_len - mask_len) / seq_len
    if schedule == "constant":
        return cfg
    raise ValueError(f"`cfg_schedule` must be 'linear' or 'constant', got {schedule!r}.")


def head_sample(net, z: torch.Tensor, diffusion: HeadDiffusion, temperature: float, cfg: float,
                randn) -> torch.Tensor:
    """MAR `DiffLoss.sample`: denoise one latent per condition row of `z` through `diffusion`'s steps.

    With CFG (`cfg != 1`) the rows are [cond; uncond]: one noise per pair, ε guided, each half keeping its own
    variance. `randn(shape)` supplies every Gaussian draw, in the official order: the start noise, then one draw
    per step (the last step draws too, and ignores it), on any device. `core.head_graph.GraphedHead` is the same
    computation from static buffers and CUDA graphs."""
    channels = net.in_channels
    if cfg != 1.0:
        half = randn((z.shape[0] // 2, channels)).to(z.device)
        x = torch.cat([half, half])
        fn = lambda x_, t_: net.forward_with_cfg(x_, t_, z, cfg)  # noqa: E731
    else:
        x = randn((z.shape[0], channels)).to(z.device)
        fn = lambda x_, t_: net(x_, t_, z)  # noqa: E731
    for i in reversed(range(len(diffusion))):
        t = torch.full((x.shape[0],), diffusion.timestep_map[i], device=x.device, dtype=torch.long)
        out = fn(x, t)
        x = diffusion.p_sample(out, x, i, randn(tuple(x.shape)).to(x.device), temperature)
    return x


def sample_tokens(model, bsz: int, labels: torch.Tensor | None, num_iter: int, cfg: float, cfg_schedule: str,
                  temperature: float, steps: list[int], clip: int | None, randn, orders: torch.Tensor,
                  on_iteration=None, head=None) -> torch.Tensor:
    """MAR `sample_tokens` (random order, cosine mask schedule, Muse-style CFG schedule) with DiSA's T per iteration.

    `model` has `seq_len`, `token_embed_dim`, `class_emb`, `fake_latent`, `encode(tokens, mask, class_embedding)`,
    `decode(x, mask)` and `diffloss.net` (see models/mar.py). `orders` [bsz, seq_len] is each image's generation
    order; `randn(shape)` supplies the head's Gaussian draws; `head` runs the head (default `head_sample`; a
    `GraphedHead` on CUDA). Returns tokens [bsz, seq_len, C]."""
    if len(steps) != num_iter:
        raise ValueError(f"`steps` has {len(steps)} entries for {num_iter} iterations.")
    device = orders.device
    seq_len = model.seq_len
    mask = torch.ones(bsz, seq_len, device=device)
    tokens = torch.zeros(bsz, seq_len, model.token_embed_dim, device=device)
    diffusions: dict = {}
    for step in range(num_iter):
        cur = tokens.clone()
        class_embedding = model.class_emb(labels) if labels is not None else model.fake_latent.repeat(bsz, 1)
        if cfg != 1.0:
            tokens = torch.cat([tokens, tokens])
            class_embedding = torch.cat([class_embedding, model.fake_latent.repeat(bsz, 1)])
            mask = torch.cat([mask, mask])
        z = model.decode(model.encode(tokens, mask, class_embedding), mask)
        mask_len = math.floor(seq_len * math.cos(math.pi / 2 * (step + 1) / num_iter))
        mask_len = int(max(1, min(int(mask[0].sum().item()) - 1, mask_len)))
        mask_next = torch.zeros(bsz, seq_len, device=device).scatter(-1, orders[:, :mask_len], 1.0).bool()
        to_pred = mask[:bsz].bool() if step >= num_iter - 1 else mask[:bsz].bool() ^ mask_next
        mask = mask_next.float()
        if cfg != 1.0:
            to_pred = torch.cat([to_pred, to_pred])
        rows = z[to_pred]
        if steps[step] not in diffusions:
            diffusions[steps[step]] = HeadDiffusion(steps[step], clip)
        sampled = (head or head_sample)(model.diffloss.net, rows, diffusions[steps[step]], temperature,
                              cfg_scale(cfg, cfg_schedule, mask_len, seq_len), randn)
        if cfg != 1.0:
            sampled, _ = sampled.chunk(2)
            to_pred, _ = to_pred.chunk(2)
        cur[to_pred] = sampled.to(cur.dtype)
        tokens = cur.clone()
        if on_iteration is not None:
            on_iteration(step, num_iter)
    return tokens
