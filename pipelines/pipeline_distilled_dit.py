"""Distilled DiTs (FLUX.1-schnell, FLUX.2-klein, Z-Image-Turbo, Qwen-Image-Lightning, SD3.5-Large-Turbo, SANA-Sprint)
run with their published recipe, through the stock diffusers pipeline of their folder.

The stock `__call__` of each family is the family glue (prompt encoding, latent packing and position ids, the
guidance embedding, its timestep convention — Z-Image feeds 1 − σ and negates the output —, VAE decode, callbacks,
progress bar, interruption); re-writing it per family would copy stock code. What differs per model and what
users get wrong is the σ grid: `core.presets.FlowPreset.sigmas` computes it once, and the call hands it to the
stock pipeline through a flow-matching Euler scheduler with no shift of its own, so the grid the network sees is
exactly the preset's, whatever shift the folder's scheduler config carries. SANA-Sprint's TrigFlow angles go to its
stock SCM scheduler as the preset's `max_timesteps` / `intermediate_timesteps`.

A negative prompt (every family) acts inside attention, NASA or NAG on the joint attention with one image stream
and two text streams (`nasa_joint.apply_joint_guidance`), installed for the call and removed after it.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect

from ..core import nag, nasa
from ..core.finite import check_finite_tensor
from ..core.flow_match import flow_sigmas
from ..core.presets import DIT_FAMILY_NAMES, FLOW_PRESETS, FlowPreset, get_preset

# stock pipeline class → family; the classes whose folders `load_one_step` recognises as distilled DiTs
PIPELINE_FAMILIES = {"FluxPipeline": "flux", "Flux2KleinPipeline": "flux2", "StableDiffusion3Pipeline": "sd3",
                     "ZImagePipeline": "zimage", "QwenImagePipeline": "qwenimage", "SanaSprintPipeline": "sana-sprint"}
# latent pixels per packed image token: VAE factor × the 2×2 patch every flow family here packs
_PATCH = 2
# family → (module, installer) of its NASA/NAG on joint attention; defaults per family in core.nag / core.nasa
NEGATIVE_PROMPT_ROUTES = {"flux": ("nasa_joint", "apply_joint_guidance"), "sd3": ("nasa_joint_sd3", "apply_sd3_guidance"),
                          "zimage": ("nasa_joint_zimage", "apply_zimage_guidance"),
                          "qwenimage": ("nasa_joint_qwenimage", "apply_qwenimage_guidance"),
                          "flux2": ("nasa_joint_flux2", "apply_flux2_guidance"),
                          # SANA has text cross-attention: the cross-attention processors (SNOOPI's own setting)
                          "sana-sprint": ("nasa_processor", "apply_guidance")}
_DEFAULTS_FAMILY = {"sana-sprint": "sana"}  # core.nag / core.nasa key of a pipeline family, where it differs
NEGATIVE_PROMPT_FAMILIES = tuple(NEGATIVE_PROMPT_ROUTES)
FLUX_NAG = nag.DEFAULTS["flux"]  # kept for older imports
FLUX_NASA_ALPHA = nasa.DEFAULT_ALPHA["flux"]


def presets_for(family: str) -> list[str]:
    return [name for name, p in FLOW_PRESETS.items() if p.family == family]


def check_preset_fits(preset: FlowPreset, family: str, what: str = "this pipeline") -> None:
    if preset.family != family:
        fitting = presets_for(family)
        raise ValueError(
            f"Preset {preset.name!r} is for {DIT_FAMILY_NAMES[preset.family]} ({preset.pipeline}), but {what} is "
            f"{DIT_FAMILY_NAMES[family]}; presets that fit: {', '.join(fitting) or 'none'}."
        )


def has_lora(pipe) -> bool:
    """Whether a LoRA is loaded (as a peft adapter) or fused into the pipeline's weights."""
    if getattr(pipe, "num_fused_loras", 0):
        return True
    get = getattr(pipe, "get_list_adapters", None)
    return bool(get and any(get().values()))


class DistilledDiTPipeline:
    """A stock diffusers DiT pipeline plus the preset it runs with; called like `OneStepPipeline`.

    Everything else (`.to()`, `.transformer`, `enable_model_cpu_offload()`, `load_lora_weights()`,
    `save_pretrained()`, …) is the stock pipeline's, reachable as attributes of this object or as `.pipe`.
    """

    def __init__(self, pipe, preset: str | FlowPreset | None = None):
        name = type(pipe).__name__
        if name not in PIPELINE_FAMILIES:
            raise TypeError(f"`pipe` must be one of {', '.join(PIPELINE_FAMILIES)}, got {name}.")
        self.pipe = pipe
        self.family = PIPELINE_FAMILIES[name]
        self.preset = None
        self.preset = self.fitting_preset(preset)
        if self.family != "sana-sprint":
            from diffusers import FlowMatchEulerDiscreteScheduler

            # identity shift, no terminal stretch, no dynamic μ: the σ we pass are the σ the network sees
            self._grid_scheduler = FlowMatchEulerDiscreteScheduler(
                num_train_timesteps=pipe.scheduler.config.get("num_train_timesteps", 1000))

    def __getattr__(self, name):
        if name == "pipe":  # not yet set (during unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.pipe, name)

    def to(self, *args, **kwargs) -> "DistilledDiTPipeline":
        """The stock pipeline's `.to()`, returning this pipeline (not the stock one) for chaining."""
        self.pipe.to(*args, **kwargs)
        return self

    def __repr__(self) -> str:
        return f"DistilledDiTPipeline({type(self.pipe).__name__}, preset={getattr(self.preset, 'name', None)!r})"

    @property
    def num_train_timesteps(self) -> int:
        return self._grid_scheduler.config.num_train_timesteps

    def fitting_preset(self, preset: str | FlowPreset | None) -> FlowPreset | None:
        """`preset` (default: the pipeline's) as a `FlowPreset`, checked against this pipeline's family."""
        if preset is None:
            return self.preset
        p = get_preset(preset) if isinstance(preset, str) else preset
        what = f"this {type(self.pipe).__name__}"
        if not isinstance(p, FlowPreset):
            raise ValueError(f"Preset {p.name!r} is for SD/SDXL UNets, but {what} is {DIT_FAMILY_NAMES[self.family]}; "
                             f"presets that fit: {', '.join(presets_for(self.family))}.")
        check_preset_fits(p, self.family, what)
        return p

    # ------------------------------------------------------------------ the schedule of a call
    def default_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """The stock pipeline's default size (its transformer's native resolution) where not given."""
        p = self.pipe
        native = getattr(p, "default_sample_size", 128) * p.vae_scale_factor
        return height or native, width or native

    def image_seq_len(self, height: int, width: int) -> int:
        """Packed image tokens at this size (the count FLUX's and FLUX.2's resolution-dependent shift reads)."""
        step = self.pipe.vae_scale_factor * _PATCH
        return (height // step) * (width // step)

    def resolve(self, preset, num_inference_steps, timesteps, sigmas, height, width) -> dict:
        """The schedule arguments for the stock call: `sigmas` (flow) or SCM angles, from the preset unless given."""
        p = self.fitting_preset(preset)
        if p is not None:
            if p.lora and not has_lora(self.pipe):
                raise ValueError(f"Preset {p.name!r} needs its LoRA ({p.lora}); load it with "
                                 f"`load_one_step(..., lora=FILE)`, `pipe.load_lora_weights(FILE)` or the CLI's "
                                 f"`--lora FILE`.")
        if timesteps is not None and sigmas is not None:
            raise ValueError("Pass `timesteps` or `sigmas`, not both.")
        if self.family == "sana-sprint":
            return self._scm_schedule(p, num_inference_steps, timesteps, sigmas)
        if timesteps is not None:
            sigmas = [float(t) / self.num_train_timesteps for t in timesteps]
        if sigmas is not None:
            grid = flow_sigmas(sigmas=sigmas)  # validates: strictly decreasing in (0, 1]
        elif p is None:
            raise ValueError(f"No preset given and none can be inferred for this {type(self.pipe).__name__}; pass "
                             f"`preset=` (one of: {', '.join(presets_for(self.family))}) or `sigmas=[...]`.")
        else:
            grid = p.sigmas(num_inference_steps, self.image_seq_len(height, width))
        if num_inference_steps is not None and num_inference_steps != len(grid) - 1:
            raise ValueError(f"`num_inference_steps`={num_inference_steps} disagrees with the {len(grid) - 1} σ of "
                             f"the schedule.")
        return {"sigmas": grid[:-1].tolist(), "num_inference_steps": len(grid) - 1}

    def _scm_schedule(self, p, num_inference_steps, timesteps, sigmas) -> dict:
        if sigmas is not None:
            raise ValueError("SANA-Sprint samples TrigFlow angles, not flow σ: pass `timesteps=[...]` (steps + 1 "
                             "angles in radians, ending in 0) or a step count.")
        if timesteps is not None:
            steps = len(timesteps) - 1
            if steps < 1 or (num_inference_steps is not None and num_inference_steps != steps):
                raise ValueError(f"`timesteps` for SANA-Sprint are steps + 1 angles ending in 0; got {len(timesteps)} "
                                 f"for num_inference_steps={num_inference_steps}.")
            return {"timesteps": [float(t) for t in timesteps], "num_inference_steps": steps,
                    "max_timesteps": None, "intermediate_timesteps": None}
        p = p or FLOW_PRESETS["sana-sprint"]
        steps = p.check_steps(num_inference_steps)
        return {"num_inference_steps": steps, "max_timesteps": p.max_timesteps,
                "intermediate_timesteps": p.intermediate_for(steps)}

    def recipe_kwargs(self, preset: FlowPreset | None) -> dict:
        """The stock call's guidance and text-length arguments for the preset: CFG off everywhere (these models are
        distilled to run without it); SANA-Sprint's guidance is an embedding, not CFG."""
        kw = {"flux": {"guidance_scale": 0.0, "true_cfg_scale": 1.0}, "flux2": {"guidance_scale": 1.0},
              "sd3": {"guidance_scale": 0.0}, "zimage": {"guidance_scale": 0.0},
              "qwenimage": {"true_cfg_scale": 1.0}, "sana-sprint": {"guidance_scale": 4.5}}[self.family]
        if preset is not None:
            if preset.guidance_embed is not None:
                kw["guidance_scale"] = preset.guidance_embed
            if preset.max_sequence_length is not None:
                kw["max_sequence_length"] = preset.max_sequence_length
        return kw

    # ------------------------------------------------------------------ call
    def negative_guidance(self, guidance: str = "nag", nasa_scale: float | None = None, nag_scale: float | None = None,
                          nag_tau: float | None = None, nag_alpha: float | None = None) -> nasa.NegativeGuidance:
        """The NASA/NAG settings of a call with a negative prompt (the family's defaults where not given), validated."""
        if self.family not in NEGATIVE_PROMPT_FAMILIES:
            supported = ", ".join(DIT_FAMILY_NAMES[f] for f in NEGATIVE_PROMPT_FAMILIES)
            raise ValueError(f"`negative_prompt` is not supported yet for {DIT_FAMILY_NAMES[self.family]} presets "
                             f"(supported: {supported}, with guidance='nasa'|'nag'): these models run without CFG, so "
                             f"the stock negative prompt has no effect.")
        return nasa.NegativeGuidance.for_family(_DEFAULTS_FAMILY.get(self.family, self.family), guidance, nasa_scale,
                                                nag_scale, nag_tau, nag_alpha)

    def encode_negative(self, negative_prompt, prompt, call: dict, num_images_per_prompt: int):
        """(prompt_embeds, second input or None) of the negative prompt — the second is the pooled embedding (FLUX,
        SD3) or the text mask (Qwen-Image, SANA) — by the stock `encode_prompt` with the call's
        `max_sequence_length` (FLUX shares its text ids: both prompts need the same length)."""
        negatives = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
        if prompt is not None:
            n_prompts = 1 if isinstance(prompt, str) else len(prompt)
        else:
            n_prompts = call["prompt_embeds"].shape[0] if call.get("prompt_embeds") is not None else 1
        if len(negatives) not in (1, n_prompts):
            raise ValueError(f"`negative_prompt` has {len(negatives)} entries; expected 1 or one per prompt "
                             f"({n_prompts}).")
        length = call.get("max_sequence_length",
                          inspect.signature(self.pipe.__call__).parameters["max_sequence_length"].default)
        if self.family == "sana-sprint":  # (Gemma embeddings, their attention mask) with the call's instruction
            return self.pipe.encode_prompt(
                negatives, num_images_per_prompt=num_images_per_prompt if len(negatives) > 1 else 1,
                device=self.pipe._execution_device, max_sequence_length=length,
                complex_human_instruction=call.get("complex_human_instruction", inspect.signature(
                    self.pipe.__call__).parameters["complex_human_instruction"].default))
        if self.family == "flux2":  # (Qwen3 hidden states of the pipeline's text layers, text ids); no pooled
            layers = {k: call[k] for k in ("text_encoder_out_layers",) if call.get(k) is not None}
            return self.pipe.encode_prompt(prompt=negatives, device=self.pipe._execution_device,
                                           num_images_per_prompt=num_images_per_prompt if len(negatives) > 1 else 1,
                                           max_sequence_length=length, **layers)
        if self.family == "qwenimage":  # (embeds, mask) padded to the longest negative, mask None if none is
            # repeated here: diffusers 0.42.1's encode_prompt interleaves the embeds but tiles the mask for several
            # prompts × images
            embeds, mask = self.pipe.encode_prompt(prompt=negatives, device=self.pipe._execution_device,
                                                   num_images_per_prompt=1, max_sequence_length=length)
            if len(negatives) > 1 and num_images_per_prompt > 1:
                embeds = embeds.repeat_interleave(num_images_per_prompt, dim=0)
                mask = None if mask is None else mask.repeat_interleave(num_images_per_prompt, dim=0)
            return embeds, mask
        if self.family == "zimage":  # per-sample caption features, padding stripped; no pooled embedding
            # ZImagePipeline.encode_prompt applies its chat template to the list it is given, in place: a copy
            embeds, _ = self.pipe.encode_prompt(prompt=list(negatives), device=self.pipe._execution_device,
                                                do_classifier_free_guidance=False, max_sequence_length=length)
            if len(negatives) > 1:
                embeds = [e for e in embeds for _ in range(num_images_per_prompt)]
            return embeds, None
        common = dict(prompt=negatives, prompt_2=None, device=self.pipe._execution_device,
                      num_images_per_prompt=num_images_per_prompt if len(negatives) > 1 else 1,
                      max_sequence_length=length, lora_scale=(call.get("joint_attention_kwargs") or {}).get("scale"))
        if self.family == "sd3":  # (embeds, negative embeds, pooled, negative pooled); no CFG: no empty negative
            embeds, _, pooled, _ = self.pipe.encode_prompt(prompt_3=None, do_classifier_free_guidance=False,
                                                           clip_skip=call.get("clip_skip"), **common)
        else:
            embeds, pooled, _ = self.pipe.encode_prompt(**common)
        return embeds, pooled

    def __call__(self, prompt=None, negative_prompt=None, num_inference_steps: int | None = None, timesteps=None,
                 sigmas=None, height: int | None = None, width: int | None = None, generator=None, latents=None,
                 output_type: str = "pil", return_dict: bool = True, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",), num_images_per_prompt: int = 1, preset=None,
                 guidance: str = "nag", nasa_scale: float | None = None, nag_scale: float | None = None,
                 nag_tau: float | None = None, nag_alpha: float | None = None, **kwargs):
        r"""Generate images with the preset's recipe.

        Args:
            prompt: text prompt(s).
            negative_prompt: what to steer away from, inside the attention (`guidance`), with no second model pass;
                one string or one per prompt.
            num_inference_steps: network evaluations; a count the preset supports (default: the preset's).
            timesteps: explicit timesteps in training units (flow: t = 1000·σ; SANA-Sprint: TrigFlow angles,
                steps + 1 values ending in 0), instead of the preset's.
            sigmas: explicit flow σ in (0, 1], strictly decreasing, used as given (no shift).
            height, width: output size (default: the model's native size).
            generator, latents: as in the stock pipeline (`latents` in its packed layout, unit noise).
            output_type, return_dict, callback_on_step_end, callback_on_step_end_tensor_inputs,
            num_images_per_prompt: as in the stock pipeline.
            preset: a `FlowPreset` name for this call (default: the pipeline's).
            guidance: with `negative_prompt`: "nag" (default: the official NAG code's FLUX algorithm, the only one with
                published FLUX settings) or "nasa" (SNOOPI eq. 9, Z+ − α·Z−).
            nasa_scale: NASA α (default 0.2: SNOOPI publishes no value for these DiTs).
            nag_scale, nag_tau, nag_alpha: NAG's φ + 1, τ and α (defaults `core.nag.DEFAULTS`: FLUX.1 5, 2.5, 0.25
                with an L2 ratio as the official FLUX example; SD3.5 5, 2.5, 0.125 with L1 as its official processor;
                Z-Image, Qwen-Image, FLUX.2: FLUX.1's, no published setting).
            **kwargs: passed to the stock pipeline (e.g. `prompt_embeds`, `max_sequence_length`).
        """
        # 1. Check inputs
        negative = None
        if negative_prompt is not None:
            negative = self.negative_guidance(guidance, nasa_scale, nag_scale, nag_tau, nag_alpha)
        if latents is not None:
            check_finite_tensor("latents", latents, "finite unit Gaussian noise")
        p = self.fitting_preset(preset)
        height, width = self.default_size(height, width)
        # 2. The schedule, and the recipe's guidance / text length (explicit kwargs win)
        schedule = self.resolve(p, num_inference_steps, timesteps, sigmas, height, width)
        if kwargs.get("intermediate_timesteps") is not None and schedule["num_inference_steps"] != 2:
            raise ValueError(f"`intermediate_timesteps` ({kwargs['intermediate_timesteps']}) exists only for 2-step "
                             f"sampling (SCM); got {schedule['num_inference_steps']} steps: leave it unset.")
        call = {**self.recipe_kwargs(p), **schedule, **kwargs}
        # 3. The stock pipeline, with the grid scheduler for flow families (and NASA/NAG for a negative prompt)
        original = self.pipe.scheduler
        if self.family != "sana-sprint":
            self.pipe.scheduler = self._grid_scheduler
        with contextlib.ExitStack() as cleanup:
            cleanup.callback(setattr, self.pipe, "scheduler", original)
            if negative is not None:
                module, installer = NEGATIVE_PROMPT_ROUTES[self.family]
                apply_guidance = getattr(importlib.import_module(f".{module}", __package__), installer)
                embeds, second = self.encode_negative(negative_prompt, prompt, call, num_images_per_prompt)
                handle = apply_guidance(self.pipe.transformer, negative)
                cleanup.callback(handle.remove)  # removed however the call ends
                # the second: FLUX/SD3 pooled embedding, FLUX.2 text ids, Qwen-Image / SANA text mask
                handle.set_negative(embeds) if second is None else handle.set_negative(embeds, second)
            return self.pipe(prompt=prompt, height=height, width=width, generator=generator, latents=latents,
                             output_type=output_type, return_dict=return_dict,
                             callback_on_step_end=callback_on_step_end,
                             callback_on_step_end_tensor_inputs=list(callback_on_step_end_tensor_inputs),
                             num_images_per_prompt=num_images_per_prompt, **call)
