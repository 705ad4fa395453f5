"""The preset table: per published one-/few-step model, its timesteps, prediction type, step rule and defaults.

Presets are data. Pipelines and nodes read this table; nothing else hard-codes a timestep. Each entry names the
stock diffusers recipe it reproduces (``reference``) and where the numbers come from (``source``); the tests run
that recipe and compare latents.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

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
                f"Pass `timesteps=[...]` (CLI: --timesteps) for a custom schedule."
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

UNET_PRESETS: dict[str, Preset] = {p.name: p for p in _PRESET_LIST}


# --------------------------------------------------------------------------- flow-matching DiTs
# Rectified-flow transformers (x_σ = (1 − σ)·x0 + σ·ε, velocity prediction; `core.flow_match`) and SANA-Sprint's
# TrigFlow consistency model. Each entry is the recipe of the model card / official inference code, and names the
# stock diffusers pipeline class its folders carry (model_index.json `_class_name`).

DIT_FAMILY_NAMES = {"flux": "FLUX.1", "flux2": "FLUX.2", "sd3": "SD3/SD3.5", "zimage": "Z-Image",
                    "qwenimage": "Qwen-Image", "sana-sprint": "SANA-Sprint"}


@dataclass(frozen=True)
class FlowPreset:
    """A distilled flow-matching DiT's sampling recipe.

    σ grid for n steps (flow presets): the base grid linspace(1, 1/n, n) — or linspace(1, σ_min, n) with
    `base_end="sigma_min"`, σ_min = shift(1/T) the smallest σ of the shifted training grid, as SD3's reference sampler
    and diffusers' default `set_timesteps` build it —, or `base_sigmas[n]`; shifted by the static
    SD3 shift `shift`, or, with `mu_rule="flux2"`, by FLUX.2's exponential shift with μ = flux2_mu(tokens, n); a final
    σ = 0 is appended. SANA-Sprint (`schedule="scm"`) samples TrigFlow angles instead: [max_t, intermediate_t, 0] at
    exactly 2 steps, else linspace(max_t, 0, n + 1)."""

    name: str
    family: str  # key of DIT_FAMILY_NAMES
    pipeline: str  # the stock diffusers pipeline class the model's folder names
    steps: tuple[int, ...]  # step counts (network evaluations) the model was distilled for
    default_steps: int
    reference: str  # the stock diffusers call this preset reproduces
    source: str  # where the numbers come from, with the line
    shift: float = 1.0
    mu_rule: str | None = None  # "flux2": μ from the image-token count and the step count
    base_sigmas: dict[int, tuple[float, ...]] | None = None
    base_end: str = "1/n"  # "1/n" | "sigma_min": where the unshifted base grid ends
    guidance_embed: float | None = None  # guidance fed to the network as an embedding (no CFG)
    max_sequence_length: int | None = None  # text tokens the recipe encodes (None: the pipeline's default)
    lora: str | None = None  # the LoRA this preset needs on top of the base model, as published
    max_timesteps: float | None = None  # SCM: first TrigFlow angle
    intermediate_timesteps: float | None = None  # SCM: second angle, valid at exactly 2 steps
    notes: str = ""
    schedule: str = "flow-match"  # "flow-match" | "scm"

    @property
    def families(self) -> tuple[str, ...]:
        return (self.family,)

    def check_steps(self, steps: int | None) -> int:
        steps = self.default_steps if steps is None else steps
        if steps not in self.steps:
            raise ValueError(
                f"Preset {self.name!r} supports num_inference_steps in {list(self.steps)}, got {steps}"
                f"{'; ' + self.notes if self.notes else ''}. Pass `sigmas=[...]` (CLI: --timesteps, 1000·σ) for a custom schedule."
            )
        return steps

    def sigmas(self, steps: int | None = None, image_seq_len: int | None = None):
        """The σ grid (steps + 1 values, float64, ending in 0) for a flow preset."""
        from .flow_match import flow_sigmas, flux2_mu, static_shift

        if self.schedule != "flow-match":
            raise ValueError(f"Preset {self.name!r} samples TrigFlow angles (SCM), not flow-matching σ; use "
                             f"`scm_timesteps()`.")
        steps = self.check_steps(steps)
        base = self.base_sigmas[steps] if self.base_sigmas else None
        if self.mu_rule == "flux2":
            if image_seq_len is None:
                raise ValueError(f"Preset {self.name!r} shifts σ by the image size: pass `image_seq_len`.")
            return flow_sigmas(steps, base, mu=flux2_mu(image_seq_len, steps), shift_kind="exponential")
        sigma_min = static_shift(torch.tensor(1 / 1000, dtype=torch.float64), self.shift).item() \
            if self.base_end == "sigma_min" else None
        return flow_sigmas(steps, base, shift=self.shift, sigma_min=sigma_min)

    def scm_timesteps(self, steps: int | None = None) -> tuple[float, ...]:
        """SANA-Sprint's TrigFlow angles (steps + 1 values, ending in 0)."""
        steps = self.check_steps(steps)
        if self.intermediate_timesteps is not None and steps == 2:
            return (self.max_timesteps, self.intermediate_timesteps, 0.0)
        return tuple(float(t) for t in np.linspace(self.max_timesteps, 0.0, steps + 1))

    def intermediate_for(self, steps: int) -> float | None:
        """The intermediate angle to use at `steps` (SCM's intermediate step exists only for 2-step sampling)."""
        return self.intermediate_timesteps if steps == 2 else None


_FLOW_PRESET_LIST = [
    FlowPreset("flux-schnell", "flux", "FluxPipeline", (1, 2, 3, 4), 4,
               reference="FluxPipeline(num_inference_steps=4, guidance_scale=0.0, max_sequence_length=256) with the "
                         "folder's scheduler (static shift 1.0: the plain grid)",
               source="black-forest-labs/flux src/flux/cli.py: get_schedule(..., shift=(name != 'flux-schnell')); "
                      "FLUX.1-schnell model card; scheduler_config.json shift 1.0, use_dynamic_shifting false",
               max_sequence_length=256,
               notes="timestep-distilled (LADD); no guidance embedding; unshifted (ComfyUI's `simple` scheduler on "
                     "its FluxSchnell sampling gives the same grid; a ModelSamplingFlux node would shift it)"),
    FlowPreset("flux2-klein", "flux2", "Flux2KleinPipeline", (4,), 4, mu_rule="flux2",
               reference="Flux2KleinPipeline(num_inference_steps=4) of a distilled folder (is_distilled: true, CFG off)",
               source="black-forest-labs/flux2 sampling (empirical μ); diffusers pipeline_flux2_klein.py "
                      "compute_empirical_mu; FLUX.2-klein model card: 4 steps, cfg 1",
               notes="step- and guidance-distilled; 4 steps"),
    FlowPreset("zimage-turbo", "zimage", "ZImagePipeline", (8,), 8, shift=3.0,
               reference="ZImagePipeline(num_inference_steps=8, guidance_scale=0.0) with the folder's scheduler "
                         "(static shift 3.0)",
               source="Tongyi-MAI/Z-Image src/zimage/pipeline.py generate(): sigma_min = 0, the last step (t = 0) "
                      "skipped, so the card's num_inference_steps=9 is 8 evaluations on linspace(1, 1/8, 8) shifted "
                      "by 3; scheduler_config.json shift 3.0; ComfyUI template ModelSamplingAuraFlow shift 3",
               notes="8 evaluations: the model card's `num_inference_steps=9` counts a skipped last step at σ = 0"),
    *[
        FlowPreset(f"qwen-image-lightning-{n}step", "qwenimage", "QwenImagePipeline", (n,), n, shift=3.0,
                   reference=f"QwenImagePipeline(num_inference_steps={n}, true_cfg_scale=1.0) + the {n}-step LoRA, "
                             "scheduler with base_shift = max_shift = log 3 (exponential), no terminal stretch",
                   source="ModelTC/Qwen-Image-Lightning generate_with_diffusers.py L82–97 (μ = log 3 for every "
                          "size, i.e. the static shift 3)",
                   lora=f"lightx2v/Qwen-Image-Lightning: Qwen-Image-Lightning-{n}steps-V1.0.safetensors (or newer "
                        f"{n}-step versions)",
                   notes=f"a LoRA on Qwen-Image; {n} steps with the {n}-step LoRA")
        for n in (4, 8)
    ],
    FlowPreset("sd35-large-turbo", "sd3", "StableDiffusion3Pipeline", (4,), 4, shift=3.0, base_end="sigma_min",
               reference="StableDiffusion3Pipeline(num_inference_steps=4, guidance_scale=0.0) with the folder's "
                         "scheduler (static shift 3.0)",
               source="stabilityai/stable-diffusion-3.5-large-turbo model card; Stability-AI/sd3.5 sd3_infer.py "
                      "get_sigmas: t = linspace(timestep(σ_max), timestep(σ_min), n), σ = shift(t/1000), then 0; "
                      "scheduler_config.json shift 3.0",
               notes="ADD; 4 steps, guidance 0. The last σ is ≈ 0.009, not 0.5: ComfyUI's `simple` scheduler "
                     "gives another grid"),
    FlowPreset("sana-sprint", "sana-sprint", "SanaSprintPipeline", (1, 2, 3, 4), 2, schedule="scm",
               guidance_embed=4.5, max_sequence_length=300, max_timesteps=1.5708, intermediate_timesteps=1.3,
               reference="SanaSprintPipeline(num_inference_steps=2, max_timesteps=1.5708, intermediate_timesteps=1.3, "
                         "guidance_scale=4.5); other step counts with intermediate_timesteps=None",
               source="NVlabs/Sana SANA-Sprint (sCM + LADD); diffusers pipeline_sana_sprint.py and "
                      "scheduling_scm.py set_timesteps (the intermediate angle is valid only at 2 steps)",
               notes="the intermediate angle 1.3 applies only at 2 steps"),
]

FLOW_PRESETS: dict[str, FlowPreset] = {p.name: p for p in _FLOW_PRESET_LIST}

PRESETS: dict[str, Preset | FlowPreset] = {**UNET_PRESETS, **FLOW_PRESETS}


def get_preset(name: str) -> Preset | FlowPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"Unknown preset {name!r}; valid presets: {', '.join(PRESETS)}.") from None
