"""NASA and NAG as diffusers guiders: a negative prompt without CFG in diffusers' modular pipelines.

```python
pipe.update_components(guider=NAGGuidance())          # or NASAGuidance(); then call with negative_prompt=...
```

Each denoising step runs the denoiser once, on the conditional batch; the negative prompt acts inside attention.
`prepare_models` installs the attention processors (and, for FLUX.1, hooks) for the step with the negative text
embeddings that `prepare_inputs` kept from the unconditional side of the pipeline's (conditional, unconditional)
fields; `cleanup_models` restores the original processor objects and removes every hook. The attention routes are
`pipelines/nasa_processor.py` (UNets' text cross-attention) and `pipelines/nasa_joint.py` (FLUX.1's joint attention,
one image stream and two text streams); the math is `core.nasa` / `core.nag`.

`num_conditions` is 1 within a step (one batch, one denoiser pass) and 2 outside steps: diffusers' text-encoder
blocks encode the negative prompt only when they read `guider.num_conditions > 1` before the loop. It also reads 2
while the denoiser runs, so a step that raises or is interrupted leaves the guider ready for the next call.

Modular pipelines: `StableDiffusionXLAutoBlocks` as they are. diffusers' FLUX.1 blocks (`FluxAutoBlocks`) run no
guider and encode no negative prompt: `flux_guided_blocks()` swaps in the two steps below that do.
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
from diffusers.modular_pipelines.modular_pipeline_utils import ComponentSpec, InputParam, OutputParam

from .core import nag, nasa
from .pipelines import nasa_joint, nasa_processor
from .pipelines.pipeline_one_step import unet_family

if TYPE_CHECKING:
    from diffusers.modular_pipelines.modular_pipeline import BlockState

SUPPORTED = ("UNet2DConditionModel (SD1.x, SD2.x, SDXL)", "FluxTransformer2DModel (FLUX.1)",
             "SD3Transformer2DModel (SD3/SD3.5)", "ZImageTransformer2DModel (Z-Image)")
# joint-attention denoiser class → (family of its defaults, module, installer)
JOINT_ROUTES = {"FluxTransformer2DModel": ("flux", "nasa_joint", "apply_joint_guidance"),
                "SD3Transformer2DModel": ("sd3", "nasa_joint_sd3", "apply_sd3_guidance"),
                "ZImageTransformer2DModel": ("zimage", "nasa_joint_zimage", "apply_zimage_guidance")}
# The (conditional, unconditional) fields the modular denoise blocks pass: the text sequence and the pooled text
# embedding. SDXL: prompt_embeds, text_embeds; SD3: encoder_hidden_states, text_embeds; flux_guided_blocks:
# encoder_hidden_states, pooled_projections.
TEXT_FIELDS = ("prompt_embeds", "encoder_hidden_states", "cap_feats")  # Z-Image: cap_feats
POOLED_FIELDS = ("text_embeds", "pooled_projections")


def _unconditional(fields: dict, names: tuple[str, ...]):
    for name in names:
        value = fields.get(name)
        if isinstance(value, tuple) and len(value) == 2:
            return value[1]
    return None


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
        self._negative = None  # (text embeddings, pooled embeddings) of the negative prompt, this step
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
        self._negative = (_unconditional(data, TEXT_FIELDS), _unconditional(data, POOLED_FIELDS))
        return [self._prepare_batch(data, 0, "pred_cond")]

    def prepare_inputs_from_block_state(self, data: "BlockState",
                                       input_fields: dict[str, str | tuple[str, str]]) -> list["BlockState"]:
        values = {key: tuple(getattr(data, name, None) for name in names)
                  for key, names in input_fields.items() if isinstance(names, tuple)}
        self._negative = (_unconditional(values, TEXT_FIELDS), _unconditional(values, POOLED_FIELDS))
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
        embeds, pooled = self._negative or (None, None)
        if embeds is None:
            raise ValueError(
                f"{type(self).__name__} got no negative prompt embeddings: the pipeline passed no unconditional "
                f"{' / '.join(TEXT_FIELDS)}. Pass `negative_prompt=` (text-encoder blocks encode it when "
                f"`guider.num_conditions > 1` before the loop); for FLUX.1 build the blocks with "
                f"`flux_guided_blocks()`.")
        if isinstance(denoiser, UNet2DConditionModel):
            handle = nasa_processor.apply_nasa(denoiser, **self._unet_settings(denoiser))
            negative = (embeds,)
        else:
            family, module, installer = JOINT_ROUTES[type(denoiser).__name__]
            apply_guidance = getattr(importlib.import_module(f".pipelines.{module}", __package__), installer)
            guidance = self._family_guidance(family)
            handle = apply_guidance(denoiser, guidance, construction=self.construction) if family == "flux" \
                else apply_guidance(denoiser, guidance)
            negative = (embeds,) if pooled is None else (embeds, pooled)
        try:
            handle.set_negative(*negative)
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
    (FLUX.1) the image queries attend to the positive and the negative text with the layer's own projections, and
    the output is `W_o (Z+ − α·Z−) + b_o`: one denoiser pass per step, not CFG's two.

    Args:
        nasa_scale (`float`, *optional*):
            α of eq. 9, the weight of the negative branch; 0 gives exactly the plain output. Default: the family's,
            from `core.nasa.DEFAULT_ALPHA` (SNOOPI v3: SD1.5 0.1, SD2.1 0.2, SDXL 0.2 until one is published);
            FLUX.1 0.2 (SNOOPI publishes none, and the NAG paper finds NASA unstable on FLUX: start low).
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
    clipped at τ (eqs. 8–9), then blended with Z+ by α (eq. 10). The norm is L1 as in the paper on UNets, L2 as in
    the official FLUX code on FLUX.1.

    Args:
        nag_scale (`float`, *optional*):
            φ + 1, the official code's convention (the paper's φ = 2 is `nag_scale=3`); 1 gives exactly the plain
            output. Default: the family's from `core.nag.DEFAULTS` (paper Table 5: 3 for SD1.5/SDXL), FLUX.1 5.
        nag_tau (`float`, *optional*):
            τ, the clip on the norm ratio ‖Z̃‖/‖Z+‖ (eq. 9). Default 2.5 (all families).
        nag_alpha (`float`, *optional*):
            α in [0, 1], the share of the normalized guided output (eq. 10). Default: SDXL 0.5, SD1.5/SD2.x 0.375,
            FLUX.1 0.25 (official FLUX.1-schnell example).
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


# ---------------------------------------------------------------- FLUX.1 modular blocks with a guider
def _guider_spec() -> ComponentSpec:
    return ComponentSpec("guider", NAGGuidance, default_creation_method="from_config")


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
            negative = block_state.negative_prompt or ""
            negatives = [negative] if isinstance(negative, str) else list(negative)
            n_prompts = 1 if isinstance(block_state.prompt, str) else len(block_state.prompt)
            if len(negatives) not in (1, n_prompts):
                raise ValueError(f"`negative_prompt` has {len(negatives)} entries; expected 1 or one per prompt "
                                 f"({n_prompts}).")
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
