"""One-/few-step sampling on ComfyUI's own MODEL: preset sigmas and a SAMPLER for SamplerCustom(Advanced).

The maths is `core.onestep` (`FewStepSampler` driven by `sample_sigma_space`); the numbers are `core.presets`.
This file only translates ComfyUI's model sampling objects, seeds, progress and interruption.

Distilled flow-matching DiTs (FLUX.1-schnell, FLUX.2-klein, SD3.5-Large-Turbo, Z-Image-Turbo, Qwen-Image-Lightning)
need only their σ grid: ComfyUI's flow models (model sampling CONST) compute x0 = x − σ·v, and its plain `euler`
sampler steps x ← x + (σ' − σ)·v exactly as diffusers' FlowMatchEulerDiscreteScheduler does.
"""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..core import onestep
from ..core.presets import DIT_FAMILY_NAMES, FAMILY_NAMES, FLOW_PRESETS, PRESETS, FlowPreset, Preset, get_preset

# UNet presets for SwiftStepOneStepSampler. The rectified-flow UNet (InstaFlow) has no ComfyUI model-sampling
# equivalent: it stays diffusers-only.
COMFY_PRESETS = [name for name, p in PRESETS.items() if p.schedule == "vp"]
# DiT presets, sampled by ComfyUI's own `euler`. SANA-Sprint (TrigFlow angles) is a model ComfyUI cannot load.
COMFY_FLOW_PRESETS = [name for name, p in FLOW_PRESETS.items() if p.schedule == "flow-match"]
SIGMA_PRESETS = COMFY_PRESETS + COMFY_FLOW_PRESETS

_FAMILY_OF_CONFIG = {  # comfy.supported_models class name → family (a key of FAMILY_NAMES or DIT_FAMILY_NAMES)
    "SD15": "sd1", "SD20": "sd2", "SD21UnclipL": "sd2", "SD21UnclipH": "sd2", "SDXL": "sdxl", "SSD1B": "sdxl",
    "Segmind_Vega": "sdxl", "KOALA_700M": "sdxl", "KOALA_1B": "sdxl", "SDXL_instructpix2pix": "sdxl",
    # FLUX.2-klein and FLUX.2-dev both load as Flux2 (they differ in the text encoder); ZImage subclasses Lumina2.
    # ComfyUI 0.3.64 has no Flux2 or ZImage.
    "Flux": "flux", "FluxSchnell": "flux", "FluxInpaint": "flux", "Flux2": "flux2", "SD3": "sd3",
    "ZImage": "zimage", "QwenImage": "qwenimage",
}


def model_prediction_type(model_sampling) -> str:
    """'epsilon' | 'v_prediction' | 'sample' for discrete VP model sampling, else a description of what it is."""
    import comfy.model_sampling as ms

    if not isinstance(model_sampling, ms.ModelSamplingDiscrete) or isinstance(model_sampling, ms.ModelSamplingDiscreteEDM):
        return f"{type(model_sampling).__name__} (not discrete VP sampling)"
    for kind, name in ((ms.X0, "sample"), (ms.V_PREDICTION, "v_prediction"), (ms.EPS, "epsilon")):
        if isinstance(model_sampling, kind):
            return name
    return type(model_sampling).__name__


def is_flow_model(model_sampling) -> bool:
    import comfy.model_sampling as ms

    return isinstance(model_sampling, ms.CONST)


def describe_family(model) -> tuple[str | None, str]:
    """(family key or None, readable name) of a MODEL, from its ComfyUI model config class."""
    config = type(model.model.model_config).__name__
    family = _FAMILY_OF_CONFIG.get(config)
    names = {**FAMILY_NAMES, **DIT_FAMILY_NAMES}
    return family, names[family] if family else f"a ComfyUI `{config}` model"


def check_flow_model_fits(node: str, model, preset: FlowPreset) -> None:
    family, name = describe_family(model)
    model_sampling = model.get_model_object("model_sampling")
    if not is_flow_model(model_sampling):
        pred = model_prediction_type(model_sampling)
        fitting = [n for n in COMFY_PRESETS if PRESETS[n].prediction_type == pred]
        raise ValueError(
            f"{node}: input `preset` = {preset.name!r} is for {DIT_FAMILY_NAMES[preset.family]} (flow matching) "
            f"models, but this MODEL is {name} and samples as {pred}. Presets that fit it: {fitting or 'none'}.")
    if family != preset.family:
        fitting = [n for n in COMFY_FLOW_PRESETS if FLOW_PRESETS[n].family == family]
        raise ValueError(f"{node}: input `preset` = {preset.name!r} is for {DIT_FAMILY_NAMES[preset.family]} "
                         f"models; this MODEL is {name}. Presets that fit it: {fitting or 'none'}.")


def check_model_fits(node: str, model, preset: Preset | FlowPreset) -> None:
    """Raise a ValueError naming the node, the input and what fits, when `preset` cannot drive `model`."""
    if isinstance(preset, FlowPreset):
        return check_flow_model_fits(node, model, preset)
    model_sampling = model.get_model_object("model_sampling")
    if is_flow_model(model_sampling):
        family, name = describe_family(model)
        fitting = [n for n in COMFY_FLOW_PRESETS if FLOW_PRESETS[n].family == family]
        raise ValueError(f"{node}: input `preset` = {preset.name!r} is for SD/SDXL UNets; this MODEL is {name} "
                         f"(flow matching). Presets that fit it: {fitting or 'none'}.")
    pred = model_prediction_type(model_sampling)
    if pred != preset.prediction_type:
        fitting = [n for n in COMFY_PRESETS if PRESETS[n].prediction_type == pred]
        raise ValueError(
            f"{node}: input `preset` = {preset.name!r} needs a {preset.prediction_type} model, but this MODEL samples "
            f"as {pred}. Presets that fit it: {fitting or 'none'}"
            + (" (an x0 UNet needs ModelSamplingDiscrete set to x0)." if preset.prediction_type == "sample" else ".")
        )
    family = _FAMILY_OF_CONFIG.get(type(model.model.model_config).__name__)
    if family is not None and family not in preset.families:
        wanted = " or ".join(FAMILY_NAMES[f] for f in preset.families)
        raise ValueError(f"{node}: input `preset` = {preset.name!r} is for {wanted} models; this MODEL is "
                         f"{FAMILY_NAMES[family]}.")


def vp_schedule(model_sampling) -> onestep.NoiseSchedule:
    """The model's own ᾱ table, recovered from ComfyUI's σ table (σ² = (1 − ᾱ)/ᾱ)."""
    sigmas = model_sampling.sigmas.double().cpu()
    return onestep.NoiseSchedule.vp((1.0 / (1.0 + sigmas**2)).float())


def sample_swiftstep(model, x, sigmas, extra_args=None, callback=None, disable=None, preset="sd-turbo", gamma=None):
    """k-diffusion-style sampler function for `comfy.samplers.KSAMPLER` (model returns x0 for (x_ve, σ)).

    Seeds: the initial noise is ComfyUI's (`prepare_noise`: the seed's first draw); each re-noising step takes the
    seed's *next* draws, as diffusers' generator does, so the same seed gives the same latents as `OneStepPipeline`.
    """
    import comfy.model_management
    from tqdm.auto import trange

    extra_args = {} if extra_args is None else extra_args
    p = get_preset(preset)
    model_sampling = model.inner_model.inner_model.model_sampling
    pred = model_prediction_type(model_sampling)
    if pred != p.prediction_type:
        raise ValueError(f"SwiftStepOneStepSampler: input `preset` = {preset!r} needs a {p.prediction_type} "
                         f"model, but the MODEL samples as {pred}.")
    schedule = vp_schedule(model_sampling)
    sig = sigmas[:-1] if float(sigmas[-1]) == 0.0 else sigmas
    lo, hi = float(model_sampling.sigmas[0]), float(model_sampling.sigmas[-1])
    if len(sig) == 0 or any(not (lo * 0.999 <= float(s) <= hi * 1.001) for s in sig):
        raise ValueError(f"SwiftStepOneStepSampler: input `sigmas` must lie in the model's range "
                         f"[{lo:.4g}, {hi:.4g}] (plus a final 0), got {[round(float(s), 4) for s in sigmas]}.")
    timesteps = [int(model_sampling.timestep(s.reshape(1)).item()) for s in sig]
    rule = p.rule if gamma is None else p.rule.with_gamma(gamma)
    sampler = onestep.FewStepSampler(schedule, timesteps, "sample", rule, p.timestep_shift, p.init_noise)

    generator = torch.Generator("cpu").manual_seed(extra_args.get("seed", 0))
    torch.randn(x.shape, generator=generator)  # the initial noise ComfyUI already drew from this seed

    def noise_fn():
        return torch.randn(x.shape, generator=generator).to(x)

    s_in = x.new_ones([x.shape[0]])
    progress = trange(len(sampler), disable=disable)

    def denoise(x_ve, sigma):
        comfy.model_management.throw_exception_if_processing_interrupted()
        return model(x_ve, sigma * s_in, **extra_args)

    def on_step(i, x0, x_next):
        progress.update()
        if callback is not None:
            callback({"x": x_next, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": x0})

    # KSAMPLER hands us σ-scaled noise; the unit noise and the input latent sit on its KSamplerX0Inpaint wrapper.
    raw_noise = getattr(model, "noise", None)
    if raw_noise is None:
        raise TypeError("SwiftStepOneStepSampler: run the sampler through SamplerCustom / SamplerCustomAdvanced.")
    latent = getattr(model, "latent_image", None)
    out = onestep.sample_sigma_space(denoise, sampler, raw_noise.to(x), noise_fn, latent, on_step)
    progress.close()
    return out


class SwiftStepPresetSigmas(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SwiftStepPresetSigmas",
            display_name="SwiftStep Preset Sigmas",
            category="swiftstep/sampling",
            description="The published timesteps of a one-/few-step model as SIGMAS of the model's own schedule. "
                        "UNet presets: sample with SwiftStep One-Step Sampler. DiT presets (flux-schnell, "
                        "flux2-klein, sd35-large-turbo, zimage-turbo, qwen-image-lightning-*): sample with "
                        "ComfyUI's own `euler` (KSamplerSelect) at cfg 1.0.",
            inputs=[
                io.Model.Input("model", tooltip="The distilled model (SD-Turbo, DMD2, Hyper-SD, FLUX.1-schnell, "
                                                "FLUX.2-klein, SD3.5-Large-Turbo, Z-Image-Turbo, Qwen-Image + "
                                                "Lightning LoRA, …) from any loader."),
                io.Combo.Input("preset", options=SIGMA_PRESETS, default="sd-turbo",
                               tooltip="The model's recipe, e.g. dmd2-sdxl-4step = t 999/749/499/249, "
                                       "dmd2-sdxl-1step = t 399. UNet presets: use the same preset in SwiftStep "
                                       "One-Step Sampler. DiT presets (flux-schnell, flux2-klein, "
                                       "sd35-large-turbo, zimage-turbo, qwen-image-lightning-*): use ComfyUI's "
                                       "`euler` sampler."),
                io.Int.Input("steps", default=0, min=0, max=8,
                             tooltip="Number of steps; 0 = the preset's default. Only counts the preset supports."),
                io.Int.Input("width", default=1024, min=16, max=16384, step=16, optional=True,
                             tooltip="Image width in pixels, as given to the empty-latent node. Only "
                                     "resolution-dependent presets (flux2-klein) read it: set it to the latent's "
                                     "size in pixels."),
                io.Int.Input("height", default=1024, min=16, max=16384, step=16, optional=True,
                             tooltip="Image height in pixels, as given to the empty-latent node. Only "
                                     "resolution-dependent presets (flux2-klein) read it: set it to the latent's "
                                     "size in pixels."),
            ],
            outputs=[io.Sigmas.Output(tooltip="steps+1 sigmas ending in 0, for SamplerCustom(Advanced).")],
        )

    @classmethod
    def validate_inputs(cls, preset=None, steps=None):
        """Widget values are known before the run: refuse a step count the preset does not have, up front."""
        if preset is None or steps is None or preset not in PRESETS:
            return True  # linked values are checked in `execute`; ComfyUI checks combo options itself
        p = PRESETS[preset]
        counts = sorted(p.steps if isinstance(p, FlowPreset) else p.timesteps)
        if steps and steps not in counts:
            return (f"SwiftStepPresetSigmas: input `steps` = {steps} does not fit preset {preset!r}; allowed: 0 "
                    f"(the preset's default, {p.default_steps}) or {counts}.")
        return True

    @classmethod
    def execute(cls, model, preset, steps, width=1024, height=1024) -> io.NodeOutput:
        p = get_preset(preset)
        check_model_fits("SwiftStepPresetSigmas", model, p)
        if isinstance(p, FlowPreset):
            # ComfyUI's flow σ are diffusers' σ: each model's sampling converts σ to its own network input (SD3:
            # t = 1000·σ; Flux, Flux2, Qwen-Image: σ, embedded ×1000 by the network; Z-Image/Lumina2: σ, fed as
            # 1 − σ with the output negated, as ZImagePipeline does). Shifts (sampling settings, the ModelSampling*
            # nodes) act only on ComfyUI's own schedulers, never on σ given to the sampler.
            try:  # one image token per 16×16 pixels (VAE 8× × the 2×2 patch), as the diffusers pipelines count
                sigmas = p.sigmas(steps or None, image_seq_len=(height // 16) * (width // 16))
            except ValueError as e:
                raise ValueError(f"SwiftStepPresetSigmas: input `steps`: {e}") from None
            return io.NodeOutput(sigmas.float().cpu())
        try:
            timesteps = p.timesteps_for(steps or None)
        except ValueError as e:
            raise ValueError(f"SwiftStepPresetSigmas: input `steps`: {e}") from None
        model_sampling = model.get_model_object("model_sampling")
        sigmas = model_sampling.sigma(torch.tensor(timesteps, dtype=torch.float32))
        return io.NodeOutput(torch.cat([sigmas.float().cpu(), sigmas.new_zeros(1).float().cpu()]))


class SwiftStepOneStepSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SwiftStepOneStepSampler",
            display_name="SwiftStep One-Step Sampler",
            category="swiftstep/sampling",
            description="x0 sampling for distilled UNets: consistency re-noising, TCD gamma, ancestral or Euler, as "
                        "the preset's model card prescribes. Use cfg 1.0. Distilled DiTs (FLUX, SD3.5, Z-Image, "
                        "Qwen-Image) need no special sampler: use KSamplerSelect `euler`.",
            inputs=[
                io.Combo.Input("preset", options=COMFY_PRESETS, default="sd-turbo",
                               tooltip="The same preset as SwiftStep Preset Sigmas: it sets the step rule, the "
                                       "initial noise scale and NitroFusion's timestep shift. UNet presets only: "
                                       "DiT presets sample with ComfyUI's own `euler`."),
                io.Float.Input("gamma", default=-1.0, min=-1.0, max=1.0, step=0.01,
                               tooltip="-1: the preset's own rule. 0…1: TCD/CTM gamma sampling instead "
                                       "(0 deterministic, 1 full re-noise between steps)."),
            ],
            outputs=[io.Sampler.Output(tooltip="For SamplerCustom / SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, preset, gamma) -> io.NodeOutput:
        import comfy.samplers

        get_preset(preset)
        options = {"preset": preset, "gamma": None if gamma < 0 else float(gamma)}
        return io.NodeOutput(comfy.samplers.KSAMPLER(sample_swiftstep, extra_options=options))


NODES = [SwiftStepPresetSigmas, SwiftStepOneStepSampler]
