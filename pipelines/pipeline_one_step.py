"""`OneStepPipeline`: one- and few-step text-to-image for distilled SD1.x / SD2.x / SDXL UNets.

One class for the three families (detected from the components); the sampling maths is `core.onestep`, the
per-model numbers are `core.presets`. The scheduler component is kept for its configuration (ᾱ table, prediction
type) and so that `save_pretrained` folders load in stock diffusers pipelines; its `step` is never called.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import FromSingleFileMixin, StableDiffusionXLLoraLoaderMixin
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..core import nag, nasa, onestep
from ..core.finite import check_finite_tensor
from ..core.presets import DIT_FAMILY_NAMES, FAMILY_NAMES, UNET_PRESETS, Preset, get_preset
from . import lora_check, nasa_processor, single_file

logger = logging.getLogger("swiftstep")


def unet_family(unet: UNet2DConditionModel) -> str:
    """'sd1' | 'sd2' | 'sdxl' from the UNet config (SDXL: text_time embedding; SD2: linear transformer projections)."""
    cfg = unet.config
    if cfg.addition_embed_type == "text_time":
        return "sdxl"
    if cfg.addition_embed_type is not None or cfg.in_channels != 4:
        raise ValueError(
            f"This UNet is not an SD1.x/SD2.x/SDXL text-to-image UNet (addition_embed_type="
            f"{cfg.addition_embed_type!r}, in_channels={cfg.in_channels}); OneStepPipeline expects one of those."
        )
    return "sd2" if cfg.use_linear_projection else "sd1"


def _infer_preset(family: str, unet, scheduler) -> str | None:
    """The preset a stock folder implies, when exactly one fits its scheduler/UNet config; else None."""
    cfg = scheduler.config
    kind = type(scheduler).__name__
    if getattr(unet.config, "time_cond_proj_dim", None) is not None:
        return "lcm"  # only full LCM UNets carry a guidance embedding
    if kind == "TCDScheduler":
        return "tcd"
    trailing = cfg.get("timestep_spacing") == "trailing"
    pred = cfg.get("prediction_type", "epsilon")
    if family == "sdxl" and pred == "sample" and trailing:
        return "sdxl-lightning-1step"
    if family == "sdxl" and kind == "EulerAncestralDiscreteScheduler" and trailing and pred == "epsilon":
        return "sdxl-turbo"
    if family == "sd2" and kind == "EulerDiscreteScheduler" and trailing and pred == "epsilon":
        return "sd-turbo"  # SwiftBrush v2 ships sd-turbo's scheduler; both sample one step at t=999 identically
    return None


class OneStepPipeline(DiffusionPipeline, StableDiffusionXLLoraLoaderMixin, FromSingleFileMixin):
    r"""Text-to-image for one-/few-step distilled SD1.x, SD2.x and SDXL models.

    Args:
        vae, text_encoder, tokenizer, unet, scheduler: as in `StableDiffusionPipeline`.
        text_encoder_2, tokenizer_2: the second (OpenCLIP bigG) encoder, for SDXL only.
        preset: a name from `swiftstep.core.presets.PRESETS`, stored in the folder's `model_index.json`.
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->unet->vae"
    _optional_components = ["text_encoder_2", "tokenizer_2"]
    _callback_tensor_inputs = ["latents", "x0", "prompt_embeds"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler,
        text_encoder_2: CLIPTextModelWithProjection | None = None,
        tokenizer_2: CLIPTokenizer | None = None,
        preset: str | None = None,
    ):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                              text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
        self.family = unet_family(unet)
        if (self.family == "sdxl") != (text_encoder_2 is not None):
            raise ValueError(
                f"An SDXL UNet needs `text_encoder_2` and `tokenizer_2` and an SD1.x/SD2.x UNet takes none; got a "
                f"{FAMILY_NAMES[self.family]} UNet with text_encoder_2={type(text_encoder_2).__name__}."
            )
        if preset is not None:
            self._check_preset(get_preset(preset))
        self.register_to_config(preset=preset)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self._interrupt = False

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_single_file(cls, pretrained_model_link_or_path, **kwargs) -> "OneStepPipeline":
        """Load an original Stability-layout checkpoint (`.safetensors`/`.ckpt`) of SD1.x, SD2.x or SDXL.

        Uses diffusers' single-file converters. Configs come from `config=` (a local diffusers folder of the same
        family, e.g. the model's own repo snapshot) or, with internet access, from the family's reference repo.
        """
        path = Path(pretrained_model_link_or_path)
        if not str(pretrained_model_link_or_path).startswith(("http://", "https://")):
            family = single_file.checkpoint_family(path)
            logger.info("%s: recognised an original %s checkpoint", path.name, FAMILY_NAMES[family])
            if kwargs.get("config") is None and kwargs.get("local_files_only"):
                raise ValueError(
                    f"{path.name}: loading offline needs `config=` pointing at a local diffusers folder of an "
                    f"{FAMILY_NAMES[family]} model (e.g. {single_file.REFERENCE_REPOS[family]})."
                )
        return super().from_single_file(pretrained_model_link_or_path, **kwargs)

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name: str | None = None, **kwargs):
        """Load a diffusers/peft or kohya LoRA file (alphas honoured) into the UNet and text encoder(s).

        Raises `ValueError` when the file's keys match no module of this pipeline, instead of silently doing nothing.
        """
        source = pretrained_model_name_or_path_or_dict
        source = "state dict" if isinstance(source, dict) else Path(str(source)).name
        lora_check.check_file(pretrained_model_name_or_path_or_dict)
        try:
            state_dict, _ = self.lora_state_dict(pretrained_model_name_or_path_or_dict, unet_config=self.unet.config,
                                                 **kwargs)
        except (ValueError, KeyError) as e:
            raise ValueError(f"{source}: not a LoRA layout diffusers can read (diffusers/peft or kohya): {e}") from e
        lora_check.check_targets(state_dict, self, source)
        if getattr(self, "fast_path", None) is not None:
            self.fast_path.clear_prompts()  # text-encoder LoRAs change the embeddings
            if self.fast_path.graphs is not None:
                self.fast_path.graphs.clear()
        before = {a for v in self.get_list_adapters().values() for a in v}
        # The file is read a second time here on purpose: diffusers takes the alphas from the file's metadata
        # (peft `lora_alpha`) only when it reads the file itself; a converted dict would lose them.
        try:
            super().load_lora_weights(pretrained_model_name_or_path_or_dict, adapter_name=adapter_name, **kwargs)
        except ValueError as e:
            if "not found in the base model" not in str(e):
                raise
            unet_keys = sorted(lora_check.expected_modules(state_dict)["unet"])
            raise ValueError(
                f"{source}: 0 of {len(unet_keys)} LoRA layers match this {FAMILY_NAMES[self.family]} UNet; expected "
                f"module paths like `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`, found e.g. "
                f"{unet_keys[:2]}. Is the LoRA for another base model?"
            ) from e
        after = {a for v in self.get_list_adapters().values() for a in v}
        new = sorted(after - before) or ([adapter_name] if adapter_name else [])
        if not new:
            raise ValueError(f"{source}: no LoRA layer was created; 0 of {len(state_dict)} keys match this pipeline.")
        lora_check.check_loaded(state_dict, self, new[0], source)

    # ------------------------------------------------------------------ fast path
    def enable_fast_path(self, cuda_graph: bool = True, compile: bool = False, channels_last: bool = True,
                         fused_attention: bool = True, cache_prompts: bool = True, tiny_vae=None):
        """Turn on the fast path (see `pipelines.fast_path`): CUDA-graph replay of sampling + decode per shape,
        optional `torch.compile`, channels-last weights, the attention kernels, prompt-embedding caching and an
        optional TAESD tiny decoder (`tiny_vae=` a taesd_decoder file, an AutoencoderTiny folder or instance).
        Parts that cannot run here are skipped with one log line. Returns the `FastPath` (`.active` lists what is
        on); `disable_fast_path()` undoes everything. Move the pipeline to its device first."""
        from .fast_path import FastPath

        self.disable_fast_path()
        self.fast_path = FastPath(self, cuda_graph=cuda_graph, compile=compile, channels_last=channels_last,
                                  fused_attention=fused_attention, cache_prompts=cache_prompts, tiny_vae=tiny_vae)
        return self.fast_path

    def generate_stream(self, prompts, batch_size: int = 8, seed: int = 0, output_type: str = "pil", images=None,
                        **kwargs):
        """Throughput mode: prompts (any iterable, e.g. a queue reader) in, one image per prompt out, in order.
        With `images` (an iterable beside the prompts: one picture per prompt) each runs image-to-image
        (`strength=` in kwargs).

        Prompts are batched `batch_size` at a time; image k uses `torch.Generator().manual_seed(seed + k)`, so the
        images do not depend on the batching. On CUDA each batch's images are copied to pinned host memory
        asynchronously and converted while the next batch runs. `kwargs` go to `__call__` (preset, steps, size…).
        With the fast path on, each batch size is captured once and replayed."""
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"`output_type` must be 'pil', 'np' or 'pt' for streaming, got {output_type!r}.")
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be ≥ 1, got {batch_size}.")
        it = iter(prompts) if images is None else zip(prompts, images)
        index, pending = seed, None
        while True:
            batch = list(itertools.islice(it, batch_size))
            current = None
            if batch:
                generators = [torch.Generator().manual_seed(index + j) for j in range(len(batch))]
                index += len(batch)
                if images is not None:
                    batch, pictures = [p for p, _ in batch], [im for _, im in batch]
                    kwargs["image"] = pictures
                out = self(batch, generator=generators, output_type="pt", **kwargs).images
                if out.is_cuda:
                    host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
                    host.copy_(out, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record()
                    current = (host, event)
                else:
                    current = (out, None)
            if pending is not None:  # the previous batch, converted while this one ran
                host, event = pending
                if event is not None:
                    event.synchronize()
                if output_type == "pt":
                    yield from host.clone()
                else:
                    arrays = host.float().permute(0, 2, 3, 1).numpy()
                    yield from (arrays if output_type == "np" else self.image_processor.numpy_to_pil(arrays))
            if not batch:
                return
            pending = current

    def disable_fast_path(self) -> None:
        fast = getattr(self, "fast_path", None)
        if fast is not None:
            fast.disable()
        self.fast_path = None

    # ------------------------------------------------------------------ helpers
    def _check_preset(self, preset: Preset) -> None:
        if self.family not in preset.families:
            dit = set(preset.families) <= set(DIT_FAMILY_NAMES)
            wanted = " or ".join({**FAMILY_NAMES, **DIT_FAMILY_NAMES}[f] for f in preset.families)
            kind = " models (`swiftstep.pipelines.load_one_step` loads them)" if dit else " UNets"
            raise ValueError(f"Preset {preset.name!r} is for {wanted}{kind}, but this pipeline's UNet is "
                             f"{FAMILY_NAMES[self.family]}-shaped.")

    def resolve_preset(self, preset: str | None) -> Preset | None:
        """The preset to use: the argument, else the one stored in the folder, else one implied by the scheduler."""
        name = preset or self.config.get("preset") or _infer_preset(self.family, self.unet, self.scheduler)
        if name is None:
            return None
        p = get_preset(name)
        self._check_preset(p)
        return p

    def noise_schedule(self, preset: Preset | None) -> onestep.NoiseSchedule:
        cfg = self.scheduler.config
        if preset is not None and preset.schedule == "flow":
            return onestep.NoiseSchedule.flow(cfg.get("num_train_timesteps", 1000))
        return onestep.NoiseSchedule.vp(onestep.alphas_cumprod(
            cfg.get("beta_start", 0.00085), cfg.get("beta_end", 0.012), cfg.get("num_train_timesteps", 1000),
            cfg.get("beta_schedule", "scaled_linear")))

    @staticmethod
    def _tokenize(tokenizer, prompt: list[str], device) -> torch.Tensor:
        ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        return ids.to(device)

    @torch.no_grad()
    def encode_prompt(self, prompt: list[str], num_images_per_prompt: int = 1, device=None):
        """(prompt_embeds, pooled_prompt_embeds or None), repeated `num_images_per_prompt` times per prompt.

        SD1/SD2: the encoder's last hidden state. SDXL: penultimate hidden states of both encoders concatenated, and
        the projected pooled output of the second (as `StableDiffusionXLPipeline` with clip_skip=None).
        """
        # `_execution_device` and `.dtype` walk every module: look them up once per call, not per use.
        device = device or self._execution_device
        dtype = self.unet.dtype
        fast = getattr(self, "fast_path", None)
        if fast is not None:
            key = (tuple(prompt), num_images_per_prompt, str(device), dtype)
            return fast.cached_prompt(key, lambda: self._encode_prompt(prompt, num_images_per_prompt, device, dtype))
        return self._encode_prompt(prompt, num_images_per_prompt, device, dtype)

    def _encode_prompt(self, prompt, num_images_per_prompt, device, dtype):
        if self.family != "sdxl":
            embeds = self.text_encoder(self._tokenize(self.tokenizer, prompt, device))[0]
            pooled = None
        else:
            hidden = []
            for tok, enc in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
                out = enc(self._tokenize(tok, prompt, device), output_hidden_states=True)
                hidden.append(out.hidden_states[-2])
            pooled = out[0]  # text_embeds of CLIPTextModelWithProjection, [B, proj]
            embeds = torch.cat(hidden, dim=-1)
        embeds = embeds.to(dtype).repeat_interleave(num_images_per_prompt, dim=0)
        if pooled is not None:
            pooled = pooled.to(dtype).repeat_interleave(num_images_per_prompt, dim=0)
        return embeds, pooled

    def _add_time_ids(self, original_size, crops_coords_top_left, target_size, batch: int, device, dtype):
        ids = list(original_size) + list(crops_coords_top_left) + list(target_size)
        expected = self.unet.config.addition_time_embed_dim * len(ids) + self.text_encoder_2.config.projection_dim
        actual = self.unet.add_embedding.linear_1.in_features
        if expected != actual:
            raise ValueError(
                f"SDXL micro-conditioning expects {actual} features but got {expected}; is `text_encoder_2` the "
                f"encoder this UNet was trained with?"
            )
        return torch.tensor([ids], dtype=dtype, device=device).repeat(batch, 1)

    def check_inputs(self, prompt, prompt_embeds, height, width, num_images_per_prompt, output_type,
                     callback_on_step_end_tensor_inputs):
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("Pass exactly one of `prompt` or `prompt_embeds`.")
        if prompt is not None and not isinstance(prompt, (str, list)):
            raise TypeError(f"`prompt` must be a str or a list of str, got {type(prompt).__name__}.")
        if prompt_embeds is not None and self.family == "sdxl":
            raise ValueError("SDXL needs pooled embeddings too; pass `prompt` instead of `prompt_embeds`.")
        for name, value in (("height", height), ("width", width)):
            if value <= 0 or value % self.vae_scale_factor:
                raise ValueError(
                    f"`{name}` must be a positive multiple of {self.vae_scale_factor} (the VAE factor), got {value}."
                )
        if num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be ≥ 1, got {num_images_per_prompt}.")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"`output_type` must be one of 'pil', 'np', 'pt', 'latent', got {output_type!r}.")
        bad = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(f"`callback_on_step_end_tensor_inputs` must be in {self._callback_tensor_inputs}, got {bad}.")

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    def make_sampler(self, preset: Preset | None, num_inference_steps: int | None, timesteps, gamma: float | None):
        """The `FewStepSampler` for a call: preset timesteps/rule, overridden by `timesteps` and `gamma`."""
        if preset is None and timesteps is None:
            raise ValueError(
                f"No preset given and none can be inferred from this folder's scheduler "
                f"({type(self.scheduler).__name__}, prediction_type={self.scheduler.config.get('prediction_type')!r}); "
                f"pass `preset=` (one of: {', '.join(UNET_PRESETS)}) or explicit `timesteps=[...]`."
            )
        if timesteps is not None:
            timesteps = [float(t) for t in timesteps]
            if num_inference_steps is not None and num_inference_steps != len(timesteps):
                raise ValueError(f"`num_inference_steps`={num_inference_steps} disagrees with {len(timesteps)} `timesteps`.")
        else:
            timesteps = preset.timesteps_for(num_inference_steps)
        if preset is not None:
            prediction_type, rule, shift = preset.prediction_type, preset.rule, preset.timestep_shift
            init_noise = preset.init_noise
            folder_pred = self.scheduler.config.get("prediction_type", "epsilon")
            if prediction_type != "flow" and folder_pred != prediction_type:
                logger.warning("Preset %r uses prediction_type=%r; the folder's scheduler says %r. Using the preset's.",
                               preset.name, prediction_type, folder_pred)
        else:
            prediction_type = self.scheduler.config.get("prediction_type", "epsilon")
            rule, shift, init_noise = onestep.StepRule("consistency"), 1.0, "unit"
        if gamma is not None:  # CTM/TCD gamma sampling instead of the preset's rule
            rule = rule.with_gamma(gamma)
        return onestep.FewStepSampler(self.noise_schedule(preset), timesteps, prediction_type, rule, shift, init_noise)

    def _negative_embeds(self, negative_prompt, negative_prompt_embeds, num_images_per_prompt, batch, device):
        """[B, L, C] negative text context for NASA/NAG (SDXL: both encoders' hidden states), or None."""
        if negative_prompt is None and negative_prompt_embeds is None:
            return None
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Pass at most one of `negative_prompt` or `negative_prompt_embeds`.")
        if negative_prompt_embeds is not None:
            return negative_prompt_embeds.to(device, self.unet.dtype)
        negatives = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
        n_prompts = batch // num_images_per_prompt
        if len(negatives) not in (1, n_prompts):
            raise ValueError(f"`negative_prompt` has {len(negatives)} entries; expected 1 or one per prompt "
                             f"({n_prompts}).")
        embeds, _ = self.encode_prompt(negatives, num_images_per_prompt if len(negatives) > 1 else 1, device)
        return embeds

    def _guidance_settings(self, guidance, preset, nasa_scale, nag_scale, nag_tau, nag_alpha) -> dict:
        alpha = nasa_scale
        if alpha is None:
            alpha = preset.nasa_alpha if preset is not None and preset.nasa_alpha is not None \
                else nasa.DEFAULT_ALPHA[self.family]
        defaults = nag.DEFAULTS[self.family]
        return dict(mode=guidance, alpha=alpha,
                    nag_scale=defaults["nag_scale"] if nag_scale is None else nag_scale,
                    nag_tau=defaults["nag_tau"] if nag_tau is None else nag_tau,
                    nag_alpha=defaults["nag_alpha"] if nag_alpha is None else nag_alpha)

    # ------------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        timesteps: list[float] | None = None,
        preset: str | None = None,
        gamma: float | None = None,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        negative_prompt: str | list[str] | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        guidance: str = "nasa",
        nasa_scale: float | None = None,
        nag_scale: float | None = None,
        nag_tau: float | None = None,
        nag_alpha: float | None = None,
        image=None,
        strength: float = 0.5,
    ):
        r"""Generate images (text-to-image, or image-to-image with `image`).

        Args:
            prompt: text prompt(s).
            height, width: output size in pixels; multiples of the VAE factor. Default: the UNet's native size.
            num_inference_steps: a step count the preset supports (default: the preset's).
            timesteps: explicit timesteps in training units, strictly decreasing (overrides the preset's).
            preset: a name from `PRESETS`; default: the folder's stored preset, else one its scheduler implies.
            gamma: use TCD/CTM gamma sampling with this γ in [0, 1] (0 deterministic, 1 full re-noise).
            guidance_scale: guidance *embedding* w for LCM UNets with `time_cond_proj_dim`; these models run
                without CFG, so other UNets ignore it.
            generator: seeds the initial latents, then one noise draw per re-noising step, in step order.
            latents: unit Gaussian noise of shape [B·n, 4, H/f, W/f] instead of the generator's first draw,
                scaled by the schedule's initial noise level as diffusers scales it by `init_noise_sigma`: the
                same `latents` give the stock pipeline's image.
            output_type: "pil", "np", "pt" or "latent".
            callback_on_step_end: `fn(pipe, step, timestep, callback_kwargs) -> dict`, may replace "latents".
            negative_prompt: what to steer away from, without CFG: NASA (SNOOPI) or NAG in every text
                cross-attention. One string for all prompts, or one per prompt.
            guidance: "nasa" (Z+ − α·Z−) or "nag" (normalized attention guidance).
            nasa_scale: NASA α; default: the preset's, else the family's (SD1.5 0.1, SD2.1 0.2, SDXL 0.2).
            nag_scale, nag_tau, nag_alpha: NAG's φ + 1, τ and α; defaults per family from the NAG paper.
            image: start from this image (PIL, numpy or torch in [0, 1], one or one per prompt) instead of pure
                noise: its VAE posterior sample is noised to the first kept timestep (diffusers' img2img recipe).
            strength: the share of the schedule that runs on `image`: the last ⌊steps·strength⌋ timesteps (as
                diffusers' img2img pipelines; SD-Turbo's card: 2 steps at strength 0.5). Needs steps·strength ≥ 1.

        Returns:
            `ImagePipelineOutput` with `.images`, or a tuple `(images,)`.
        """
        # 1. Check inputs
        if image is not None:
            image = self.image_processor.preprocess(image, height=height, width=width)
            height, width = image.shape[-2:]
        default_size = self.unet.config.sample_size * self.vae_scale_factor
        height = default_size if height is None else height
        width = default_size if width is None else width
        self.check_inputs(prompt, prompt_embeds, height, width, num_images_per_prompt, output_type,
                          callback_on_step_end_tensor_inputs)
        preset_obj = self.resolve_preset(preset)
        sampler = self.make_sampler(preset_obj, num_inference_steps, timesteps, gamma)
        if image is not None:
            sampler = self._img2img_sampler(sampler, strength)
        self._interrupt = False
        device, dtype = self._execution_device, self.unet.dtype

        # 2. Encode the prompt
        if prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            prompt_embeds, pooled = self.encode_prompt(prompts, num_images_per_prompt, device)
        else:
            prompt_embeds = prompt_embeds.to(device, dtype).repeat_interleave(num_images_per_prompt, dim=0)
            pooled = None
        batch = prompt_embeds.shape[0]

        # 3. Conditioning extras: SDXL micro-conditioning, LCM guidance embedding
        added_cond_kwargs = None
        if self.family == "sdxl":
            add_time_ids = self._add_time_ids(original_size or (height, width), crops_coords_top_left,
                                              target_size or (height, width), batch, device, dtype)
            added_cond_kwargs = {"text_embeds": pooled, "time_ids": add_time_ids}
        timestep_cond = None
        if self.unet.config.time_cond_proj_dim is not None:
            w = guidance_scale if guidance_scale is not None else (preset_obj and preset_obj.guidance_scale) or 8.5
            w_tensor = torch.full((batch,), w - 1.0)  # LCM embeds w − 1 (no CFG batch)
            timestep_cond = onestep.guidance_scale_embedding(w_tensor, self.unet.config.time_cond_proj_dim)
            timestep_cond = timestep_cond.to(device=device, dtype=dtype)

        # 3b. Negative prompt → NASA/NAG on the text cross-attentions (no CFG pass)
        negative = self._negative_embeds(negative_prompt, negative_prompt_embeds, num_images_per_prompt, batch, device)
        settings = None
        if negative is not None:
            settings = self._guidance_settings(guidance, preset_obj, nasa_scale, nag_scale, nag_tau, nag_alpha)
            nasa_processor.make_context(**settings)  # validate before anything is installed

        # 4. Initial noise (first generator draw; image-to-image: the posterior sample first, as diffusers)
        shape = (batch, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if image is not None:
            if latents is not None:
                raise ValueError("Pass either `image` or `latents`, not both.")
            latents = self._noised_image_latents(image, batch, shape, sampler, generator, device, dtype)
        else:  # unit noise, scaled here as diffusers scales it by `scheduler.init_noise_sigma`
            if latents is None:
                latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
            else:
                self._check_latents(latents, shape)
            latents = latents.to(device, dtype) * sampler.initial_scale()

        def noise() -> torch.Tensor:
            return randn_tensor(shape, generator=generator, device=device, dtype=latents.dtype)

        # 5a. Fast path: the whole loop and the decode replayed from a CUDA graph for this signature
        fast = getattr(self, "fast_path", None)
        if fast is not None and fast.graphs is not None and callback_on_step_end is None and settings is None \
                and self._graphable(fast):
            with self.progress_bar(total=len(sampler)) as progress:
                latents, image = self._graphed_call(fast, sampler, latents, noise, prompt_embeds, added_cond_kwargs,
                                                    timestep_cond, cross_attention_kwargs, output_type != "latent")
                progress.update(len(sampler))
            if output_type == "latent":
                images = latents
            else:
                images = self.image_processor.postprocess(image, output_type=output_type)
            self.maybe_free_model_hooks()
            return ImagePipelineOutput(images=images) if return_dict else (images,)

        # 5. Sampling loop
        x0, finite = latents, []
        with self.progress_bar(total=len(sampler)) as progress, contextlib.ExitStack() as cleanup:
            if settings is not None:  # installed for this call only; removed however the loop ends
                cleanup.callback(nasa_processor.apply_nasa(self.unet, **settings).set_negative(negative).remove)
            for i in range(len(sampler)):
                if self.interrupt:
                    break
                t = sampler.model_timestep(i)
                t_in = torch.tensor(t, device=device, dtype=torch.float32 if sampler.schedule.kind == "flow" else torch.long)
                out = self.unet(latents, t_in, encoder_hidden_states=prompt_embeds, timestep_cond=timestep_cond,
                                added_cond_kwargs=added_cond_kwargs, cross_attention_kwargs=cross_attention_kwargs,
                                return_dict=False)[0]
                latents, x0 = sampler.step(out, i, latents, noise)
                finite.append(torch.isfinite(latents).all())  # checked after the loop: no host sync per step
                if callback_on_step_end is not None:
                    local = {"latents": latents, "x0": x0, "prompt_embeds": prompt_embeds}
                    out_kwargs = callback_on_step_end(self, i, t, {k: local[k] for k in callback_on_step_end_tensor_inputs})
                    latents = out_kwargs.pop("latents", latents)
                progress.update()

        bad = (~torch.stack(finite)).nonzero() if finite else []
        if len(bad):
            i = int(bad[0])
            raise FloatingPointError(
                f"NaN/inf in latents after step {i + 1} (t={sampler.model_timestep(i)}) in {latents.dtype}; run the "
                f"UNet in bfloat16 or float32 (`dtype=torch.bfloat16`)."
            )

        # 6. Decode
        if output_type == "latent":
            images = latents
        else:
            images = self.decode_latents(latents)
            images = self.image_processor.postprocess(images, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    @staticmethod
    def _img2img_sampler(sampler, strength: float):
        """diffusers' img2img rule (`get_timesteps`): run the last ⌊N·strength⌋ of the N timesteps."""
        n = len(sampler)
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"`strength` must be in (0, 1], got {strength}.")
        keep = min(int(n * strength), n)
        if keep < 1:
            raise ValueError(f"{n} step(s) × strength {strength} leaves no step to run; use more steps "
                             f"(`num_inference_steps`) or a higher strength (SD-Turbo's card: 2 steps, 0.5).")
        return onestep.FewStepSampler(sampler.schedule, sampler.timesteps[n - keep:], sampler.prediction_type,
                                      sampler.rule, sampler.timestep_shift, sampler.init_noise)

    @staticmethod
    def _check_latents(latents, shape):
        if tuple(latents.shape) != shape:
            raise ValueError(f"`latents` must have shape {shape}, got {tuple(latents.shape)}.")
        check_finite_tensor("latents", latents, "finite unit Gaussian noise")

    def _noised_image_latents(self, image, batch, shape, sampler, generator, device, dtype):
        """x = a(t₀)·z + b(t₀)·ε for the image's VAE posterior sample z (× scaling factor): the VP form of
        diffusers' `scheduler.add_noise` at the first kept timestep. Draws: the posterior sample, then ε."""
        if batch % image.shape[0]:
            raise ValueError(f"{image.shape[0]} images for {batch} images to make: pass one, or one per prompt.")
        image = image.to(device=device, dtype=self.vae.dtype)
        z = self.vae.encode(image).latent_dist.sample(generator) * self.vae.config.scaling_factor
        if self.vae.config.get("shift_factor") is not None:
            z = z - self.vae.config.shift_factor * self.vae.config.scaling_factor
        z = z.to(dtype).repeat_interleave(batch // z.shape[0], dim=0)  # one per prompt → its num_images_per_prompt
        noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        a, b = sampler.schedule.scales(sampler.timesteps[0])
        return (a * z + b * noise).to(dtype)

    def _graphable(self, fast) -> bool:
        """Unmerged LoRA adapters bake their scales into a graph (and `set_adapters` would not reach it): those calls
        run eagerly, said once. Otherwise the graphs are checked against where the weights live now."""
        from .fast_path import _say_once, weights_signature

        if getattr(self.unet, "peft_config", None):
            from peft.tuners.tuners_utils import BaseTunerLayer

            if any(isinstance(m, BaseTunerLayer) and not m.merged for m in self.unet.modules()):
                _say_once("unmerged LoRA adapters: sampling runs eagerly (fuse_lora() them to use CUDA graphs)")
                return False
        fast.graphs.validate(weights_signature(self.unet, self.vae, fast.tiny_decoder))
        return True

    def _graphed_call(self, fast, sampler, latents, noise, prompt_embeds, added_cond_kwargs, timestep_cond,
                      cross_attention_kwargs, decode: bool):
        """Sampling (and decode) as a pure function of static buffers, run by `fast.graphs`: every re-noising draw
        is taken from the generator up front in the eager order, the timesteps are device tensors, and finiteness is
        checked once after the replay. A VAE that must decode in float32 (fp16 with `force_upcast`) decodes after
        the graph; an fp16 overflow falls back to `decode_latents`."""
        draws = [0]
        for i in range(len(sampler)):  # which steps re-noise depends on the step index only
            sampler.step(torch.zeros(1), i, torch.zeros(1), lambda: draws.__setitem__(0, draws[0] + 1) or torch.zeros(1))
        noises = [noise() for _ in range(draws[0])]
        flow = sampler.schedule.kind == "flow"
        steps = torch.tensor([sampler.model_timestep(i) for i in range(len(sampler))], device=latents.device,
                             dtype=torch.float32 if flow else torch.long)
        tiny = fast.tiny_decoder
        in_graph_decode = decode and (tiny is not None or not (self.vae.dtype == torch.float16 and
                                                                self.vae.config.get("force_upcast", False)))
        added = added_cond_kwargs or {}
        inputs = {"latents": latents, "embeds": prompt_embeds, "steps": steps, "text_embeds": added.get("text_embeds"),
                  "time_ids": added.get("time_ids"), "timestep_cond": timestep_cond}

        def run(buf, noise_bufs):
            it = iter(noise_bufs)
            x = buf["latents"]
            extra = None if buf["text_embeds"] is None else {"text_embeds": buf["text_embeds"],
                                                            "time_ids": buf["time_ids"]}
            for i in range(len(sampler)):
                out = self.unet(x, buf["steps"][i], encoder_hidden_states=buf["embeds"],
                                timestep_cond=buf["timestep_cond"], added_cond_kwargs=extra,
                                cross_attention_kwargs=cross_attention_kwargs, return_dict=False)[0]
                x, _ = sampler.step(out, i, x, lambda: next(it))
            finite = torch.isfinite(x).all()
            if not in_graph_decode:
                return x, None, finite
            if tiny is not None:
                return x, tiny.decode(x.to(tiny.dtype), return_dict=False)[0], finite
            z = x.to(self.vae.dtype) / self.vae.config.scaling_factor
            if self.vae.config.get("shift_factor") is not None:
                z = z + self.vae.config.shift_factor
            return x, self.vae.decode(z, return_dict=False)[0], finite

        # the step constants (a, b from the noise schedule, γ, shift) are frozen into the graph: all are in the key
        schedule = sampler.schedule
        table = None if schedule.alphas_cumprod is None else hash(schedule.alphas_cumprod.cpu().numpy().tobytes())
        key = (tuple(latents.shape), latents.dtype, tuple(sampler.timesteps), sampler.rule, sampler.prediction_type,
               sampler.timestep_shift, schedule.kind, schedule.num_train_timesteps, table, repr(cross_attention_kwargs),
               timestep_cond is not None, in_graph_decode)
        latents, image, finite = fast.graphs(key, run, inputs, noises)
        if not bool(finite):
            raise FloatingPointError(f"NaN/inf in latents after sampling in {latents.dtype}; run the UNet in "
                                     f"bfloat16 or float32 (`dtype=torch.bfloat16`).")
        if decode and (image is None or (tiny is None and not torch.isfinite(image).all())):
            image = self.decode_latents(latents)  # float32 decode (force_upcast, or an fp16 overflow), eagerly
        return latents, image

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE decode to [-1, 1]. An fp16 VAE decodes in float32 where its config asks (`force_upcast`, SDXL) or
        when the fp16 decode overflows (NaN/inf), which is logged once; NaN after that is an error."""
        fast = getattr(self, "fast_path", None)
        if fast is not None and fast.tiny_decoder is not None:  # TAESD: the latents as the UNet makes them
            tiny = fast.tiny_decoder
            return tiny.decode(latents.to(tiny.dtype), return_dict=False)[0]
        vae = self.vae
        dtype = vae.dtype

        def decode(in_dtype):
            upcast = in_dtype != dtype
            if upcast:
                vae.to(in_dtype)
            try:
                z = latents.to(in_dtype) / vae.config.scaling_factor
                if vae.config.get("shift_factor") is not None:
                    z = z + vae.config.shift_factor
                return vae.decode(z, return_dict=False)[0]
            finally:
                if upcast:
                    vae.to(dtype)

        fp16 = dtype == torch.float16
        image = decode(torch.float32 if fp16 and vae.config.get("force_upcast", False) else dtype)
        if not torch.isfinite(image).all() and fp16 and image.dtype == torch.float16:
            if not getattr(self, "_warned_vae_overflow", False):
                logger.warning("The fp16 VAE overflowed (NaN/inf); decoding in float32 instead. An fp16-fixed VAE "
                               "(e.g. madebyollin/sdxl-vae-fp16-fix) avoids the extra cost.")
                self._warned_vae_overflow = True
            image = decode(torch.float32)
        if not torch.isfinite(image).all():
            raise FloatingPointError(
                f"NaN/inf in the decoded image ({image.dtype} VAE) from finite latents; check the VAE weights, or "
                f"decode in float32 (`pipe.vae.to(torch.float32)`)."
            )
        return image
