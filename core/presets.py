"""The preset table: per published one-/few-step model, its timesteps, prediction type, step rule and defaults.

Presets are data. Pipelines and nodes read this table; nothing else hard-codes a timestep. Each entry names the
stock diffusers recipe it reproduces (``reference``) and where the numbers come from (``source``); the tests run
that recipe and compare latents.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .onestep import StepRule

FAMILY_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}


def trailing_timesteps(n: int, num_train_timesteps: int = 1000) -> tuple[int, ...]:
    """`timestep_spacing="trailing"` (Lin et al. 2024, Table 2): round(T − k·T/n) − 1, k = 0…n−1."""
    return tuple(int(t) for t in np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / n)) - 1)


def lcm_timesteps(n: int, origin_steps: int = 50, num_train_timesteps: int = 1000) -> tuple[int, ...]:
    """LCM/TCD schedule: n of the `origin_steps` distillation timesteps (k·T/origin − 1), evenly picked from the top."""
    k = num_train_timesteps // origin_steps
    origin = (np.arange(1, origin_steps + 1) * k - 1)[::-1]
    return tuple(int(t) for t in origin[np.floor(np.linspace(0, origin_steps, n, endpoint=False)).astype(np.int64)])


def flow_timesteps(n: int, num_train_timesteps: int = 1000) -> tuple[float, ...]:
    """InstaFlow's Euler grid: t_i = (1 − i/n)·T (float timesteps, starting at T itself)."""
    return tuple((1 - i / n) * num_train_timesteps for i in range(n))


@dataclass(frozen=True)
class Preset:
    name: str
    families: tuple[str, ...]  # UNet families it applies to: "sd1", "sd2", "sdxl"
    prediction_type: str  # "epsilon" | "v_prediction" | "sample" | "flow"
    timesteps: dict[int, tuple[float, ...]]  # step count → timesteps, in training units
    default_steps: int
    rule: StepRule
    reference: str  # the stock diffusers recipe (or official formula) this preset reproduces
    source: str
    timestep_shift: float = 1.0  # the UNet sees floor(t·shift) (NitroFusion)
    guidance_scale: float | None = None  # guidance *embedding* w for UNets with time_cond_proj_dim (LCM); no CFG
    nasa_alpha: float | None = None  # SNOOPI's NASA α for this backbone (None: the paper gives none)
    notes: str = ""
    schedule: str = "vp"  # "vp" | "flow"
    init_noise: str = "unit"  # "sigma_max" for recipes run with diffusers' Euler schedulers (see FewStepSampler)

    def timesteps_for(self, steps: int | None) -> tuple[float, ...]:
        steps = self.default_steps if steps is None else steps
        if steps not in self.timesteps:
            raise ValueError(
                f"Preset {self.name!r} supports num_inference_steps in {sorted(self.timesteps)}, got {steps}. "
                f"Pass `timesteps=[...]` for a custom schedule."
            )
        return self.timesteps[steps]


_EULER = StepRule("tcd", gamma=0.0, final="x0")  # deterministic Euler (σ-space) ≡ DDIM η=0 ending at x0
_DDIM = StepRule("tcd", gamma=0.0, final="t0")  # DDIM η=0 with set_alpha_to_one=False ends at ᾱ_0
_LCM = StepRule("consistency", boundary="lcm")  # LCMScheduler: re-noise, c_skip/c_out boundary

_PRESET_LIST = [
    Preset("sd-turbo", ("sd2",), "epsilon", {n: trailing_timesteps(n) for n in (1, 2, 3, 4)}, 1, _EULER,
           reference="EulerDiscreteScheduler(timestep_spacing='trailing') — the sd-turbo folder's own scheduler",
           source="stabilityai/sd-turbo model card and scheduler_config.json", nasa_alpha=0.2,
           notes="ADD; 1–4 steps, guidance 0", init_noise="sigma_max"),
    Preset("sdxl-turbo", ("sdxl",), "epsilon", {n: trailing_timesteps(n) for n in (1, 2, 3, 4)}, 1,
           StepRule("ancestral"),
           reference="EulerAncestralDiscreteScheduler(timestep_spacing='trailing') — the sdxl-turbo folder's",
           source="stabilityai/sdxl-turbo model card and scheduler_config.json", notes="ADD; trained at 512²",
           init_noise="sigma_max"),
    Preset("swiftbrush-v2", ("sd2",), "epsilon", {1: (999,)}, 1, StepRule("consistency"),
           reference="official formula x0 = (z − √(1−ᾱ_999)·ε)/√ᾱ_999 (VinAIResearch/SwiftBrush infer.py)",
           source="SwiftBrush v2 (ECCV 2024); UNet fine-tuned from SD-Turbo", nasa_alpha=0.30,
           notes="one step at t=999 from pure noise; α from SNOOPI v1"),
    Preset("dmd2-sdxl-1step", ("sdxl",), "epsilon", {1: (399,)}, 1, _LCM,
           reference="LCMScheduler + timesteps=[399], guidance 0",
           source="tianweiy/DMD2 README, demo/text_to_image_sdxl.py", notes="starts from pure noise at t=399"),
    Preset("dmd2-sdxl-4step", ("sdxl",), "epsilon", {4: (999, 749, 499, 249)}, 4, _LCM,
           reference="LCMScheduler + timesteps=[999, 749, 499, 249], guidance 0",
           source="tianweiy/DMD2 README", notes="LCMScheduler's own 4-step default [999, 759, 499, 259] differs"),
    Preset("hyper-sd-1step", ("sdxl",), "epsilon", {1: (800,)}, 1, _LCM,
           reference="LCMScheduler + timesteps=[800], guidance 0",
           source="ByteDance/Hyper-SD model card (Hyper-SDXL-1step-Unet)"),
    Preset("hyper-sd-lora-1step", ("sd1", "sdxl"), "epsilon", {n: lcm_timesteps(n) for n in range(1, 9)}, 1,
           StepRule("tcd", gamma=1.0, final="t0"),
           reference="TCDScheduler, eta=1.0, guidance 0",
           source="ByteDance/Hyper-SD model card (unified 1-step LoRA)", notes="lower gamma gives more detail at >1 step"),
    Preset("hyper-sd-lora", ("sd1", "sdxl"), "epsilon", {n: trailing_timesteps(n) for n in (2, 4, 8)}, 4, _DDIM,
           reference="DDIMScheduler(timestep_spacing='trailing'), guidance 0",
           source="ByteDance/Hyper-SD model card (2/4/8-step LoRAs)", notes="use the LoRA that matches the step count"),
    Preset("tcd", ("sd1", "sdxl"), "epsilon", {n: lcm_timesteps(n) for n in range(1, 9)}, 4,
           StepRule("tcd", gamma=0.3, final="t0"),
           reference="TCDScheduler, eta=0.3, guidance 0", source="h1t/TCD-SDXL-LoRA card; diffusers TCD guide",
           notes="raise gamma with more steps; larger gamma is softer"),
    Preset("lcm", ("sd1", "sdxl"), "epsilon", {n: lcm_timesteps(n) for n in range(1, 9)}, 4, _LCM,
           reference="LCMScheduler (original_inference_steps=50); guidance embedding w = guidance_scale − 1",
           source="LCM (Luo et al. 2023); diffusers LatentConsistencyModelPipeline", guidance_scale=8.5,
           notes="full LCM UNets embed guidance (time_cond_proj_dim); LCM-LoRAs ignore guidance_scale"),
    Preset("sdxl-lightning-1step", ("sdxl",), "sample", {1: (999,)}, 1, _EULER,
           reference="EulerDiscreteScheduler(timestep_spacing='trailing', prediction_type='sample')",
           source="ByteDance/SDXL-Lightning model card (sdxl_lightning_1step_unet_x0)", notes="x0-prediction UNet",
           init_noise="sigma_max"),
    *[
        Preset(f"sdxl-lightning-{n}step", ("sdxl",), "epsilon", {n: trailing_timesteps(n)}, n, _EULER,
               reference="EulerDiscreteScheduler(timestep_spacing='trailing'), guidance 0",
               source="ByteDance/SDXL-Lightning model card", notes="step count must match the checkpoint",
               init_noise="sigma_max")
        for n in (2, 4, 8)
    ],
    *[
        Preset(f"nitrofusion-{kind}", ("sdxl",), "epsilon", {n: lcm_timesteps(n, origin_steps=4) for n in (1, 2, 3, 4)},
               1, _LCM, timestep_shift=shift / 1000,
               reference=f"NitroFusion TimestepShiftLCMScheduler(shifted_timestep={shift}, original_inference_steps=4)",
               source="ChenDarYen/NitroFusion README", notes="UNet and x0 at floor(t·shift); re-noise to unshifted t")
        for kind, shift in (("realism", 250), ("vibrant", 500))
    ],
    Preset("instaflow", ("sd1",), "flow", {n: flow_timesteps(n) for n in (1, 2, 4)}, 1, _EULER,
           reference="official RectifiedFlowPipeline: x ← x + v(x, t)/n, t = (1 − i/n)·1000",
           source="gnobitab/InstaFlow code/pipeline_rf.py", nasa_alpha=0.19, schedule="flow",
           notes="rectified flow (InstaFlow-0.9B); α from SNOOPI v1"),
]

PRESETS: dict[str, Preset] = {p.name: p for p in _PRESET_LIST}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"Unknown preset {name!r}; valid presets: {', '.join(PRESETS)}.") from None
