"""NASA and NAG as diffusers guiders: a negative prompt without CFG in diffusers' modular pipelines.

```python
pipe.update_components(guider=NAGGuidance())          # or NASAGuidance(); then call with negative_prompt=...
```

Each denoising step runs the denoiser once, on the conditional batch; the negative prompt acts inside attention.
`prepare_models` installs the attention processors (and, for the joint-attention DiTs, hooks) for the step with the
negative side that `prepare_inputs` kept from the unconditional half of the pipeline's (conditional, unconditional)
fields (text embeddings; the pooled embedding, Qwen-Image's text mask, FLUX.2's text ids where passed);
`cleanup_models` restores the original processor objects and removes every hook. The attention routes are
`pipelines/nasa_processor.py` (UNets' text cross-attention) and the joint-attention handles (one image stream, two
text streams) of `pipelines/nasa_joint.py` (FLUX.1), `nasa_joint_sd3.py`, `nasa_joint_zimage.py`,
`nasa_joint_qwenimage.py` and `nasa_joint_flux2.py`, chosen by the denoiser's class (`JOINT_ROUTES`); the math is
`core.nasa` / `core.nag`.

`num_conditions` is 1 within a step (one batch, one denoiser pass) and 2 outside steps: diffusers' text-encoder
blocks encode the negative prompt only when they read `guider.num_conditions > 1` before the loop. It also reads 2
while the denoiser runs, so a step that raises or is interrupted leaves the guider ready for the next call.

Modular pipelines: `StableDiffusionXLAutoBlocks`, `QwenImageAutoBlocks` and the Qwen-Image-Edit blocks as they are
(their denoisers pass `encoder_hidden_states_mask`, forwarded to the Qwen-Image handle). diffusers' FLUX.1 blocks
(`FluxAutoBlocks`) run no guider and encode no negative prompt: `flux_guided_blocks()` swaps in two steps that do.
diffusers' FLUX.2 and FLUX.2-klein blocks run no guider either, and the FLUX.2-klein base blocks encode `""` as the
negative whatever the call asks: `flux2_guided_blocks()` swaps in a text-encoder step that encodes `negative_prompt`
and, where needed, a loop denoiser that runs the guider (subclasses of diffusers' steps).
"""

from __future__ import annotations

import copy
import importlib
from typing import TYPE_CHECKING

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput
from diffusers.models import UNet2DConditionModel
from diffusers.modular_pipelines.flux.denoise import FluxLoopDenoiser
from diffusers.modular_pipelines.flux.encoders import FluxTextEncoderStep
from diffusers.modular_pipelines.flux2.before_denoise import Flux2RoPEInputsStep
from diffusers.modular_pipelines.flux2.denoise import (Flux2KleinBaseLoopDenoiser, Flux2KleinLoopDenoiser,
                                                       Flux2LoopDenoiser)
from diffusers.modular_pipelines.flux2.encoders import (Flux2KleinBaseTextEncoderStep, Flux2KleinTextEncoderStep,
                                                        Flux2TextEncoderStep)
from diffusers.modular_pipelines.modular_pipeline_utils import ComponentSpec, InputParam, OutputParam

from .core import nag, nasa
from .pipelines import nasa_joint, nasa_processor
from .pipelines.negative_context import negative_rows
from .pipelines.pipeline_one_step import unet_family

if TYPE_CHECKING:
    from diffusers.modular_pipelines.modular_pipeline import BlockState

SUPPORTED = ("UNet2DConditionModel (SD1.x, SD2.x, SDXL)", "FluxTransformer2DModel (FLUX.1)",
             "SD3Transformer2DModel (SD3/SD3.5)", "ZImageTransformer2DModel (Z-Image)",
             "QwenImageTransformer2DModel (Qwen-Image, Qwen-Image-Edit)",
             "Flux2Transformer2DModel (FLUX.2, FLUX.2-klein)")
# The (conditional, unconditional) fields the modular denoise blocks pass, by what the negative side is to the handle:
# the text sequence (SDXL prompt_embeds; SD3, Qwen-Image, FLUX.2, flux_guided_blocks encoder_hidden_states; Z-Image
# cap_feats), the pooled text embedding (SDXL text_embeds; SD3, flux_guided_blocks pooled_projections), the text
# mask (Qwen-Image) and the text position ids (FLUX.2).
NEGATIVE_FIELDS = {"text": ("prompt_embeds", "encoder_hidden_states", "cap_feats"),
                   "pooled": ("text_embeds", "pooled_projections"),
                   "mask": ("encoder_hidden_states_mask",),
                   "text_ids": ("txt_ids",)}
TEXT_FIELDS, POOLED_FIELDS = NEGATIVE_FIELDS["text"], NEGATIVE_FIELDS["pooled"]
# joint-attention denoiser class → (family of its defaults, module, installer, the negative fields its handle's
# `set_negative` takes, in order; trailing ones the pipeline did not pass are left out)
JOINT_ROUTES = {
    "FluxTransformer2DModel": ("flux", "nasa_joint", "apply_joint_guidance", ("text", "pooled")),
    "SD3Transformer2DModel": ("sd3", "nasa_joint_sd3", "apply_sd3_guidance", ("text", "pooled")),
    "ZImageTransformer2DModel": ("zimage", "nasa_joint_zimage", "apply_zimage_guidance", ("text",)),
    # set_negative(prompt_embeds, prompt_embeds_mask)
    "QwenImageTransformer2DModel": ("qwenimage", "nasa_joint_qwenimage", "apply_qwenimage_guidance",
                                    ("text", "mask")),
    # set_negative(prompt_embeds, text_ids): the handle checks the negative's ids against the positive's
    "Flux2Transformer2DModel": ("flux2", "nasa_joint_flux2", "apply_flux2_guidance", ("text", "text_ids")),
}


def _unconditional(fields: dict, names: tuple[str, ...]):
    for name in names:
        value = fields.get(name)
        if isinstance(value, tuple) and len(value) == 2:
            return value[1]
    return None


def _negatives(fields: dict) -> dict:
    """The unconditional side of the (conditional, unconditional) fields, by NEGATIVE_FIELDS' kinds (None if absent)."""
    return {kind: _unconditional(fields, names) for kind, names in NEGATIVE_FIELDS.items()}


class _AttentionNegativeGuidance(BaseGuidance):
    """One model pass per step with the negative prompt inside attention; subclasses fix the mode."""

    _input_predictions = ["pred_cond"]
    _mode: str = ""

    def _setup(self, nasa_scale, nag_scale, nag_tau, nag_alpha, construction) -> None:
        placeholder = nag.DEFAULTS["sdxl"]  # stands in for a per-family default while the given values are checked
        nasa.NegativeGuidance.checked(
            self._mode, 0.0 if nasa_scale is None else nasa_scale,
            placeholder["nag_scale"] if nag_scale is None else nag_scale,
            placeholder["nag_tau"] if nag_tau is None else nag_tau,
            placeholder["nag_alpha"] if nag_alpha is None else nag_alpha)
        if construction not in nasa_joint.CONSTRUCTIONS:
            raise ValueError(f"`construction` must be one of {nasa_joint.CONSTRUCTIONS}, got {construction!r}.")
        self.nasa_scale, self.nag_scale, self.nag_tau, self.nag_alpha = nasa_scale, nag_scale, nag_tau, nag_alpha
        self.construction = construction
        self._negative = None  # the negative prompt's fields by NEGATIVE_FIELDS' kinds (text, pooled, …), this step
        self._handle = None  # the installed processors/hooks, this step
        self._in_step = False

    # ---------------------------------------------------------------- state
    def _settings_off(self) -> bool:
        """NASA α = 0 or NAG scale 1: exactly the plain model, nothing is installed."""
        if self._mode == "nasa":
            return self.nasa_scale is not None and self.nasa_scale == 0.0
        return self.nag_scale is not None and self.nag_scale == 1.0

    def _is_guidance_enabled(self) -> bool:
        if not self._enabled or self._settings_off():
            return False
        if self._num_inference_steps is None:
            return True
        return int(self._start * self._num_inference_steps) <= self._step < int(self._stop * self._num_inference_steps)

    def set_state(self, step: int, num_inference_steps: int, timestep: torch.LongTensor) -> None:
        super().set_state(step, num_inference_steps, timestep)
        self._in_step = True

    @property
    def num_conditions(self) -> int:
        # Before the loop the text-encoder blocks ask `num_conditions > 1` to decide whether to encode the negative
        # prompt; within a step the denoiser runs once.
        return 1 if self._in_step or self._settings_off() else 2

    @property
    def is_conditional(self) -> bool:
        return True

    # ---------------------------------------------------------------- inputs
    def prepare_inputs(self, data: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list["BlockState"]:
        self._negative = _negatives(data)
        return [self._prepare_batch(data, 0, "pred_cond")]

    def prepare_inputs_from_block_state(self, data: "BlockState",
                                       input_fields: dict[str, str | tuple[str, str]]) -> list["BlockState"]:
        values = {key: tuple(getattr(data, name, None) for name in names)
                  for key, names in input_fields.items() if isinstance(names, tuple)}
        self._negative = _negatives(values)
        return [self._prepare_batch_from_block_state(input_fields, data, 0, "pred_cond")]

    # ---------------------------------------------------------------- models
    def _unet_settings(self, unet) -> dict:
        try:
            family = unet_family(unet)
        except ValueError as e:
            raise ValueError(f"{type(self).__name__}: {e}") from None
        defaults = nag.DEFAULTS[family]
        return dict(mode=self._mode, alpha=nasa.DEFAULT_ALPHA[family] if self.nasa_scale is None else self.nasa_scale,
                    nag_scale=defaults["nag_scale"] if self.nag_scale is None else self.nag_scale,
                    nag_tau=defaults["nag_tau"] if self.nag_tau is None else self.nag_tau,
                    nag_alpha=defaults["nag_alpha"] if self.nag_alpha is None else self.nag_alpha)

    def _family_guidance(self, family: str) -> nasa.NegativeGuidance:
        """The family's defaults (core.nag.DEFAULTS / core.nasa.DEFAULT_ALPHA) where a setting is None."""
        return nasa.NegativeGuidance.for_family(family, self._mode, self.nasa_scale, self.nag_scale, self.nag_tau,
                                                self.nag_alpha)

    def prepare_models(self, denoiser: torch.nn.Module) -> None:
        self._count_prepared += 1
        # diffusers' loops have no `finally`: should the denoiser raise (or be interrupted), the next call's
        # text-encoder blocks must still see num_conditions 2, and the patch left behind goes at the next step.
        # The step's flag is back on in `cleanup_models` (and in `__call__`, for blocks that skip cleanup).
        self._in_step = False
        self._remove()
        if not isinstance(denoiser, UNet2DConditionModel) and type(denoiser).__name__ not in JOINT_ROUTES:
            raise ValueError(f"{type(self).__name__} supports {', '.join(SUPPORTED)}; got {type(denoiser).__name__}.")
        if not self._is_guidance_enabled():
            return
        negative = self._negative or {}
        if negative.get("text") is None:
            raise ValueError(
                f"{type(self).__name__} got no negative prompt embeddings: the pipeline passed no unconditional "
                f"{' / '.join(TEXT_FIELDS)}. Pass `negative_prompt=` (text-encoder blocks encode it when "
                f"`guider.num_conditions > 1` before the loop); for FLUX.1 build the blocks with "
                f"`flux_guided_blocks()`, for FLUX.2 with `flux2_guided_blocks()`.")
        if isinstance(denoiser, UNet2DConditionModel):
            handle = nasa_processor.apply_nasa(denoiser, **self._unet_settings(denoiser))
            arguments = [negative["text"]]
        else:
            family, module, installer, kinds = JOINT_ROUTES[type(denoiser).__name__]
            apply_guidance = getattr(importlib.import_module(f".pipelines.{module}", __package__), installer)
            guidance = self._family_guidance(family)
            handle = apply_guidance(denoiser, guidance, construction=self.construction) if family == "flux" \
                else apply_guidance(denoiser, guidance)
            arguments = [negative[kind] for kind in kinds]
            while arguments[-1] is None:  # e.g. no pooled embedding: the handle's default
                arguments.pop()
        try:
            handle.set_negative(*arguments)
        except BaseException:  # rejected embeddings: nothing stays installed
            handle.remove()
            raise
        self._handle = handle

    def _remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def cleanup_models(self, denoiser: torch.nn.Module) -> None:
        self._remove()
        self._in_step = True  # the denoiser returned: back inside the step until `forward`

    def __call__(self, data: list["BlockState"]) -> GuiderOutput:
        self._in_step = True  # BaseGuidance.__call__ checks len(data) against num_conditions: one batch
        return super().__call__(data)

    def forward(self, pred_cond: torch.Tensor) -> GuiderOutput:
        self._in_step, self._negative = False, None
        return GuiderOutput(pred=pred_cond, pred_cond=pred_cond, pred_uncond=None)


class NASAGuidance(_AttentionNegativeGuidance):
    """
    Negative-Away Steer Attention (NASA): SNOOPI, https://huggingface.co/papers/2412.02687 (§5.1, eqs. 7–9).

    A negative prompt for models that run without CFG. In every text cross-attention (UNet) or joint attention
    (FLUX.1, FLUX.2, SD3, Z-Image, Qwen-Image) the image queries attend to the positive and the negative text with
    the layer's own projections, and the output is `W_o (Z+ − α·Z−) + b_o`: one denoiser pass per step, not CFG's
    two.

    Args:
        nasa_scale (`float`, *optional*):
            α of eq. 9, the weight of the negative branch; 0 gives exactly the plain output. Default: the family's,
            from `core.nasa.DEFAULT_ALPHA` (SNOOPI v3: SD1.5 0.1, SD2.1 0.2, SDXL 0.2 until one is published);
            the joint-attention DiTs 0.2 (SNOOPI publishes none, and the NAG paper finds NASA unstable on FLUX:
            start low).
        construction (`str`, defaults to `"shared"`):
            FLUX.1 only: `"shared"` keeps one image stream in the single-stream blocks too (1.13× the plain step's
            multiply-adds at 1024² with the shared-key kernel); `"official"` runs them as the official NAG code does
            (1.76×). See `pipelines/nasa_joint.py` and docs/negative-prompts.md.
        start (`float`, defaults to `0.0`):
            Fraction of the denoising steps after which the guidance starts.
        stop (`float`, defaults to `1.0`):
            Fraction of the denoising steps after which the guidance stops. Outside [start, stop) nothing is
            installed: the step is the plain conditional pass.
        enabled (`bool`, defaults to `True`):
            Whether the guidance is enabled (diffusers' SDXL loop calls `enable()` itself unless the UNet has
            `time_cond_proj_dim`).
    """

    _mode = "nasa"

    @register_to_config
    def __init__(self, nasa_scale: float | None = None, construction: str = "shared", start: float = 0.0,
                 stop: float = 1.0, enabled: bool = True):
        super().__init__(start, stop, enabled)
        self._setup(nasa_scale, None, None, None, construction)


class NAGGuidance(_AttentionNegativeGuidance):
    """
    Normalized Attention Guidance (NAG): https://huggingface.co/papers/2505.21179 (§4.1, eqs. 7–10).

    A negative prompt for models that run without CFG, inside attention (one denoiser pass per step): from the
    positive and negative attention outputs Z±, Z̃ = Z+ + φ(Z+ − Z−) (eq. 7), its per-token norm ratio to Z+
    clipped at τ (eqs. 8–9), then blended with Z+ by α (eq. 10). The norm is L1 as in the paper on UNets and in the
    official SD3.5 code, L2 as in the official FLUX code on FLUX.1 and the DiTs that take its settings.

    Args:
        nag_scale (`float`, *optional*):
            φ + 1, the official code's convention (the paper's φ = 2 is `nag_scale=3`); 1 gives exactly the plain
            output. Default: the family's from `core.nag.DEFAULTS` (paper Table 5: 3 for SD1.5/SDXL), FLUX.1 5
            (FLUX.2, SD3, Z-Image and Qwen-Image take FLUX.1's: none published).
        nag_tau (`float`, *optional*):
            τ, the clip on the norm ratio ‖Z̃‖/‖Z+‖ (eq. 9). Default 2.5 (all families).
        nag_alpha (`float`, *optional*):
            α in [0, 1], the share of the normalized guided output (eq. 10). Default: SDXL 0.5, SD1.5/SD2.x 0.375,
            FLUX.1 0.25 (official FLUX.1-schnell example; FLUX.2, Z-Image, Qwen-Image too), SD3 0.125.
        construction (`str`, defaults to `"shared"`):
            FLUX.1 only: `"shared"` keeps one image stream in the single-stream blocks too (1.13× the plain step's
            multiply-adds at 1024² with the shared-key kernel); `"official"` runs them as the official NAG code does
            (1.76×). See `pipelines/nasa_joint.py` and docs/negative-prompts.md.
        start (`float`, defaults to `0.0`):
            Fraction of the denoising steps after which the guidance starts.
        stop (`float`, defaults to `1.0`):
            Fraction of the denoising steps after which the guidance stops. Outside [start, stop) nothing is
            installed: the step is the plain conditional pass.
        enabled (`bool`, defaults to `True`):
            Whether the guidance is enabled (diffusers' SDXL loop calls `enable()` itself unless the UNet has
            `time_cond_proj_dim`).
    """

    _mode = "nag"

    @register_to_config
    def __init__(self, nag_scale: float | None = None, nag_tau: float | None = None, nag_alpha: float | None = None,
                 construction: str = "shared", start: float = 0.0, stop: float = 1.0, enabled: bool = True):
        super().__init__(start, stop, enabled)
        self._setup(None, nag_scale, nag_tau, nag_alpha, construction)


# ---------------------------------------------------------------- modular steps with a guider: shared parts
def _negative_prompts(negative_prompt, prompt) -> tuple[list[str], int]:
    """`negative_prompt` (None = "", as diffusers' FLUX.2-klein base step) as a list of 1 or one per prompt, and the
    prompt count."""
    negative = "" if negative_prompt is None else negative_prompt
    negatives = [negative] if isinstance(negative, str) else list(negative)
    n_prompts = 1 if prompt is None or isinstance(prompt, str) else len(prompt)
    if len(negatives) not in (1, n_prompts):
        raise ValueError(f"`negative_prompt` has {len(negatives)} entries; expected 1 or one per prompt ({n_prompts}).")
    return negatives, n_prompts


def _guider_spec() -> ComponentSpec:
    return ComponentSpec("guider", NAGGuidance, default_creation_method="from_config")


# ---------------------------------------------------------------- FLUX.1 modular blocks with a guider
class FluxGuidedTextEncoderStep(FluxTextEncoderStep):
    """diffusers' FLUX.1 text-encoder step, plus `negative_prompt` → `negative_prompt_embeds` and
    `negative_pooled_prompt_embeds` (same encoders, same `max_sequence_length`: FLUX shares its text ids) when the
    guider asks for them (`guider.num_conditions > 1`, as the SDXL step reads it); `negative_prompt=None` encodes ""
    as diffusers' Flux2 step does."""

    @property
    def expected_components(self) -> list[ComponentSpec]:
        return super().expected_components + [_guider_spec()]

    @property
    def inputs(self) -> list[InputParam]:
        return super().inputs + [InputParam("negative_prompt")]

    @property
    def intermediate_outputs(self) -> list[OutputParam]:
        return super().intermediate_outputs + [
            OutputParam("negative_prompt_embeds", type_hint=torch.Tensor, kwargs_type="denoiser_input_fields",
                        description="negative text embeddings for the guider"),
            OutputParam("negative_pooled_prompt_embeds", type_hint=torch.Tensor, kwargs_type="denoiser_input_fields",
                        description="negative pooled text embeddings for the guider")]

    @torch.no_grad()
    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        self.check_inputs(block_state)
        encode = dict(prompt_2=None, device=components._execution_device,
                      max_sequence_length=block_state.max_sequence_length,
                      lora_scale=(block_state.joint_attention_kwargs or {}).get("scale"))
        block_state.prompt_embeds, block_state.pooled_prompt_embeds = self.encode_prompt(
            components, prompt=block_state.prompt, **encode)
        block_state.negative_prompt_embeds = block_state.negative_pooled_prompt_embeds = None
        guider = components.guider
        if guider is not None and guider._enabled and guider.num_conditions > 1:
            negatives, _ = _negative_prompts(block_state.negative_prompt, block_state.prompt)
            block_state.negative_prompt_embeds, block_state.negative_pooled_prompt_embeds = self.encode_prompt(
                components, prompt=negatives, **encode)
        self.set_block_state(state, block_state)
        return components, state


class FluxGuidedLoopDenoiser(FluxLoopDenoiser):
    """diffusers' FLUX.1 loop denoiser, with the guider loop of the other families' denoise blocks: the fields
    `encoder_hidden_states` and `pooled_projections` as (conditional, unconditional) pairs."""

    @property
    def expected_components(self) -> list[ComponentSpec]:
        return super().expected_components + [_guider_spec()]

    @property
    def inputs(self) -> list[InputParam]:
        return super().inputs + [InputParam("num_inference_steps", required=True, type_hint=int),
                                 InputParam("negative_prompt_embeds", type_hint=torch.Tensor),
                                 InputParam("negative_pooled_prompt_embeds", type_hint=torch.Tensor)]

    @torch.no_grad()
    def __call__(self, components, block_state, i: int, t: torch.Tensor):
        guider_inputs = {
            "encoder_hidden_states": (block_state.prompt_embeds, block_state.negative_prompt_embeds),
            "pooled_projections": (block_state.pooled_prompt_embeds, block_state.negative_pooled_prompt_embeds),
        }
        components.guider.set_state(step=i, num_inference_steps=block_state.num_inference_steps, timestep=t)
        guider_state = components.guider.prepare_inputs(guider_inputs)
        for batch in guider_state:
            components.guider.prepare_models(components.transformer)
            batch.noise_pred = components.transformer(
                hidden_states=block_state.latents, timestep=t.flatten() / 1000, guidance=block_state.guidance,
                encoder_hidden_states=batch.encoder_hidden_states, pooled_projections=batch.pooled_projections,
                joint_attention_kwargs=block_state.joint_attention_kwargs, txt_ids=block_state.txt_ids,
                img_ids=block_state.img_ids, return_dict=False)[0]
            components.guider.cleanup_models(components.transformer)
        block_state.noise_pred = components.guider(guider_state)[0]
        return components, block_state


def flux_guided_blocks(blocks=None):
    """`FluxAutoBlocks` (or the given FLUX.1 blocks) with `FluxGuidedTextEncoderStep` and `FluxGuidedLoopDenoiser`
    swapped in, so the pipeline from `init_pipeline()` has a `guider` component and takes `negative_prompt`. Returns
    a copy: diffusers' FluxAutoBlocks share their step instances, so swapping in place would change every one."""
    from diffusers.modular_pipelines import FluxAutoBlocks

    blocks = copy.deepcopy(FluxAutoBlocks() if blocks is None else blocks)
    try:
        loop = blocks.sub_blocks["denoise"].sub_blocks["denoise"]
        found = type(blocks.sub_blocks["text_encoder"]), type(loop.sub_blocks["denoiser"])
    except (KeyError, AttributeError):
        found = None
    if found is None or not (issubclass(found[0], FluxTextEncoderStep) and issubclass(found[1], FluxLoopDenoiser)):
        raise ValueError(f"`blocks` must be laid out as FluxAutoBlocks (text_encoder → FluxTextEncoderStep, "
                         f"denoise.denoise.denoiser → FluxLoopDenoiser), got {type(blocks).__name__} with {found}.")
    blocks.sub_blocks["text_encoder"] = FluxGuidedTextEncoderStep()
    loop.sub_blocks["denoiser"] = FluxGuidedLoopDenoiser()
    return blocks


# ---------------------------------------------------------------- FLUX.2 modular blocks with a guider
class _Flux2NegativePromptEncoding:
    """Over a diffusers FLUX.2 text-encoder step: also `negative_prompt` → `negative_prompt_embeds` [one row per
    prompt, T, C] (same encoder, same `max_sequence_length` and layers: FLUX.2 shares the text ids of both) when the
    guider asks for it (`guider.num_conditions > 1`, as diffusers' CFG steps read it). The prompt is encoded as the
    parent step does, by the parent's own encoder function, which subclasses call in `_encode`."""

    def _encode(self, components, block_state, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    @property
    def expected_components(self) -> list[ComponentSpec]:
        specs = super().expected_components
        return specs if any(spec.name == "guider" for spec in specs) else specs + [_guider_spec()]

    @property
    def inputs(self) -> list[InputParam]:
        return super().inputs + [InputParam("negative_prompt")]

    @property
    def intermediate_outputs(self) -> list[OutputParam]:
        outputs = super().intermediate_outputs
        if any(output.name == "negative_prompt_embeds" for output in outputs):
            return outputs
        return outputs + [OutputParam("negative_prompt_embeds", type_hint=torch.Tensor,
                                      kwargs_type="denoiser_input_fields",
                                      description="negative text embeddings for the guider")]

    @torch.no_grad()
    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        self.check_inputs(block_state)
        prompt = "" if block_state.prompt is None else block_state.prompt
        block_state.prompt_embeds = self._encode(components, block_state, [prompt] if isinstance(prompt, str)
                                                 else list(prompt))
        block_state.negative_prompt_embeds = None
        guider = getattr(components, "guider", None)
        if guider is not None and guider._enabled and guider.num_conditions > 1:
            negatives, n_prompts = _negative_prompts(block_state.negative_prompt, prompt)
            embeds = self._encode(components, block_state, negatives)
            # one row per prompt, as the prompt's: the input steps repeat both by num_images_per_prompt
            block_state.negative_prompt_embeds = embeds.repeat(n_prompts, 1, 1) if len(negatives) == 1 else embeds
        self.set_block_state(state, block_state)
        return components, state


class Flux2GuidedTextEncoderStep(_Flux2NegativePromptEncoding, Flux2TextEncoderStep):
    """diffusers' FLUX.2 (Mistral3) text-encoder step, plus `negative_prompt` → `negative_prompt_embeds`."""

    def _encode(self, components, block_state, prompts):
        return self._get_mistral_3_prompt_embeds(
            text_encoder=components.text_encoder, tokenizer=components.tokenizer, prompt=prompts,
            device=components._execution_device, max_sequence_length=block_state.max_sequence_length,
            system_message=self.DEFAULT_SYSTEM_MESSAGE, hidden_states_layers=block_state.text_encoder_out_layers)


class _Qwen3Encoding:
    def _encode(self, components, block_state, prompts):
        return self._get_qwen3_prompt_embeds(
            text_encoder=components.text_encoder, tokenizer=components.tokenizer, prompt=prompts,
            device=components._execution_device, max_sequence_length=block_state.max_sequence_length,
            hidden_states_layers=block_state.text_encoder_out_layers)


class Flux2KleinGuidedTextEncoderStep(_Qwen3Encoding, _Flux2NegativePromptEncoding, Flux2KleinTextEncoderStep):
    """diffusers' FLUX.2-klein (Qwen3) text-encoder step, plus `negative_prompt` → `negative_prompt_embeds`."""


class Flux2KleinBaseGuidedTextEncoderStep(_Qwen3Encoding, _Flux2NegativePromptEncoding,
                                          Flux2KleinBaseTextEncoderStep):
    """diffusers' FLUX.2-klein base text-encoder step, which encodes `""` as the negative whatever the call asks, with
    `negative_prompt` encoded instead (`None` still gives `""`)."""


class _Flux2GuidedDenoising:
    """Over a diffusers FLUX.2 loop denoiser that runs no guider: the guider loop of diffusers' FLUX.2-klein base
    denoiser (fields `encoder_hidden_states`, `txt_ids` as (conditional, unconditional) pairs) around diffusers' own
    step, which runs once per batch the guider prepares with that batch's text (reference images and the guidance
    embedding as diffusers handles them)."""

    @property
    def expected_components(self) -> list[ComponentSpec]:
        return super().expected_components + [_guider_spec()]

    @property
    def inputs(self) -> list[InputParam]:
        return super().inputs + [InputParam("negative_prompt_embeds", type_hint=torch.Tensor),
                                 InputParam("num_inference_steps", required=True, type_hint=int)]

    @torch.no_grad()
    def __call__(self, components, block_state, i: int, t: torch.Tensor):
        prompt_embeds, txt_ids = block_state.prompt_embeds, block_state.txt_ids
        negative, negative_ids = block_state.negative_prompt_embeds, None
        if negative is not None:
            negative = negative_rows(negative, prompt_embeds.shape[0], "prompt_embeds")
            negative_ids = Flux2RoPEInputsStep._prepare_text_ids(negative).to(txt_ids.device)
        guider = components.guider
        guider.set_state(step=i, num_inference_steps=block_state.num_inference_steps, timestep=t)
        guider_state = guider.prepare_inputs({"encoder_hidden_states": (prompt_embeds, negative),
                                              "txt_ids": (txt_ids, negative_ids)})
        try:
            for batch in guider_state:
                guider.prepare_models(components.transformer)
                block_state.prompt_embeds, block_state.txt_ids = batch.encoder_hidden_states, batch.txt_ids
                components, block_state = super().__call__(components, block_state, i, t)
                batch.noise_pred = block_state.noise_pred
                guider.cleanup_models(components.transformer)
        finally:
            block_state.prompt_embeds, block_state.txt_ids = prompt_embeds, txt_ids
        block_state.noise_pred = guider(guider_state)[0]
        return components, block_state


class Flux2GuidedLoopDenoiser(_Flux2GuidedDenoising, Flux2LoopDenoiser):
    """diffusers' FLUX.2 loop denoiser with a guider."""


class Flux2KleinGuidedLoopDenoiser(_Flux2GuidedDenoising, Flux2KleinLoopDenoiser):
    """diffusers' FLUX.2-klein (distilled) loop denoiser with a guider."""


# diffusers step → ours; FLUX.2-klein base's loop denoiser runs a guider already (Flux2KleinBaseLoopDenoiser)
_FLUX2_TEXT_ENCODERS = {Flux2TextEncoderStep: Flux2GuidedTextEncoderStep,
                        Flux2KleinTextEncoderStep: Flux2KleinGuidedTextEncoderStep,
                        Flux2KleinBaseTextEncoderStep: Flux2KleinBaseGuidedTextEncoderStep}
_FLUX2_DENOISERS = {Flux2LoopDenoiser: Flux2GuidedLoopDenoiser, Flux2KleinLoopDenoiser: Flux2KleinGuidedLoopDenoiser}
_FLUX2_LOOP_DENOISERS = (*_FLUX2_DENOISERS, Flux2KleinBaseLoopDenoiser)


def _find(block, classes: tuple) -> bool:
    """Whether a sub-block anywhere under `block` is an instance of `classes`."""
    return any(isinstance(sub, classes) or _find(sub, classes) for sub in getattr(block, "sub_blocks", {}).values())


def _swap(block, table: dict) -> None:
    """Replace, anywhere under `block`, every sub-block that is an instance of a key of `table` by a new value's."""
    for name, sub in list(getattr(block, "sub_blocks", {}).items()):
        stock = next((cls for cls in table if isinstance(sub, cls)), None)
        if stock is not None:
            block.sub_blocks[name] = table[stock]()
        else:
            _swap(sub, table)


def flux2_guided_blocks(blocks=None):
    """`Flux2KleinAutoBlocks` (or the given `Flux2AutoBlocks` / `Flux2KleinAutoBlocks` / `Flux2KleinBaseAutoBlocks`)
    with a text-encoder step that encodes `negative_prompt` for the guider and, where diffusers' loop denoiser runs no
    guider (FLUX.2, FLUX.2-klein), one that does, so the pipeline from `init_pipeline()` has a `guider` component and
    takes `negative_prompt`. Returns a copy: diffusers' FLUX.2 blocks share their step instances."""
    from diffusers.modular_pipelines import Flux2KleinAutoBlocks

    blocks = copy.deepcopy(Flux2KleinAutoBlocks() if blocks is None else blocks)
    encoder = getattr(blocks, "sub_blocks", {}).get("text_encoder")
    if not isinstance(encoder, tuple(_FLUX2_TEXT_ENCODERS)) or not _find(blocks, _FLUX2_LOOP_DENOISERS):
        raise ValueError(
            f"`blocks` must be laid out as diffusers' FLUX.2 auto blocks (text_encoder → one of "
            f"{', '.join(cls.__name__ for cls in _FLUX2_TEXT_ENCODERS)}; a loop denoiser "
            f"{', '.join(cls.__name__ for cls in _FLUX2_LOOP_DENOISERS)}), got {type(blocks).__name__} with "
            f"text_encoder {type(encoder).__name__}.")
    _swap(blocks, _FLUX2_TEXT_ENCODERS)
    _swap(blocks, _FLUX2_DENOISERS)
    return blocks
