"""`OneStepSRPipeline`: one-step LoRA super-resolution (OSEDiff, PiSA-SR) on an SD2.1-base pipeline.

Loads the published weight files (`osediff.pkl`, `pisa_sr.pkl`; read with `torch.load(weights_only=True)`) or
their safetensors export (`save_sr_weights`); the file layouts are `core.sr_weights`. The maths is `core.sr_step`,
`core.lora_sr`, `core.onestep` and `core.tiling`, shared with the ComfyUI node SwiftStepUpscaleV2.

LoRA strength: the official code builds `LoraConfig(r=4)` without `lora_alpha`, so peft's default alpha 8 applies
and every ΔW is 2·B·A. We set `lora_alpha=8` explicitly (a loader that assumes alpha = rank halves the effect).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.loaders import FromSingleFileMixin
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from ..core import finite, lora_sr, onestep, sr_step
from ..core.sr_weights import (  # noqa: F401  (LAYOUTS, SAFETENSORS_WHAT, PICKLE_WHAT, sr_method: public here too)
    LAYOUTS, LORA_ALPHA, PICKLE_WHAT, SAFETENSORS_WHAT, SD_PARTS, UNET_PARTS, check_keys, detect_layout,
    expected_modules, image_method, read_sr_weights, sr_method)
from . import single_file
from .pipeline_one_step import unet_family

def _copy_params(model, state: dict, wanted, what: str, source: str) -> None:
    """Copy `state` into the parameters of `model` selected by `wanted(name)`; every key must match one."""
    params = {n: p for n, p in model.named_parameters() if wanted(n)}
    missing = sorted(set(params) - set(state))
    unmatched = sorted(set(state) - set(params))
    if unmatched:
        raise ValueError(f"{source}: {len(unmatched)} of {len(state)} {what} keys match no parameter of this model, "
                         f"e.g. {unmatched[:2]}; expected names like {sorted(params)[:1]}.")
    if missing:
        raise ValueError(f"{source}: the file lacks {len(missing)} {what} parameters, e.g. {missing[:2]}.")
    with torch.no_grad():
        for name, p in params.items():
            t = state[name]
            if t.shape != p.shape:
                raise ValueError(f"{source}: {name} has shape {tuple(t.shape)}, the model {tuple(p.shape)}.")
            p.copy_(t.to(p.dtype))


def _validate(sd: dict, method: str, unet, vae, source: str) -> None:
    """Every key accounted for and every module present, before anything in the model changes."""
    check_keys(sd, method, source)
    modules = expected_modules(sd, method)
    for part, model in (("unet", unet), ("vae", vae)):
        names = {n for n, _ in model.named_modules()}
        if modules[part] - names:
            raise ValueError(f"{source}: {len(modules[part] - names)} LoRA modules match no layer of this "
                             f"{type(model).__name__}, e.g. {sorted(modules[part] - names)[:2]}; is the base model "
                             f"SD2.1?")


def _merge(model, adapters: list[str]) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            present = [a for a in adapters if a in module.lora_A]
            if present:
                module.merge(adapter_names=present)


class OneStepSRPipeline(DiffusionPipeline, FromSingleFileMixin):
    r"""×4 (any integer factor) one-step super-resolution with OSEDiff or PiSA-SR weights on SD2.1-base.

    Args: vae, text_encoder, tokenizer, unet, scheduler of an SD2.x (ε) pipeline; then `load_sr_weights(path)`.
    """

    model_cpu_offload_seq = "text_encoder->vae->unet"

    def __init__(self, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                 unet: UNet2DConditionModel, scheduler):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        family = unet_family(unet)
        if family != "sd2":
            raise ValueError(f"OneStepSRPipeline needs an SD2.x UNet (SD2.1-base, as OSEDiff/PiSA-SR); this one is "
                             f"{family.upper()}-shaped.")
        self.sr_method = None
        self._sr_state = None
        self._sem_adapters: list[str] = []
        self._prompt_cache: dict = {}

    # ------------------------------------------------------------------ weights
    @classmethod
    def from_single_file(cls, pretrained_model_link_or_path, **kwargs):
        """The SD2.1-base model from one original-layout `.safetensors`/`.ckpt` file (diffusers' converter), after
        checking that the file reads as one (diffusers' own error names neither the expected nor the found)."""
        if not str(pretrained_model_link_or_path).startswith(("http://", "https://")):
            single_file.checkpoint_family(pretrained_model_link_or_path)
        return super().from_single_file(pretrained_model_link_or_path, **kwargs)

    def load_sr_weights(self, path: str | Path) -> str:
        """Load OSEDiff or PiSA-SR weights (recognised by their keys); returns the method name."""
        from peft import LoraConfig

        if self.sr_method is not None:
            raise ValueError(f"SR weights ({self.sr_method}) are already loaded; create a fresh pipeline to switch.")
        source = Path(path).name
        sd = read_sr_weights(path)
        method = image_method(sd, source, "load it with swiftstep.pipelines.VideoSRPipeline, not OneStepSRPipeline.")
        _validate(sd, method, self.unet, self.vae, source)
        if method == "osediff":
            names = []
            for part in UNET_PARTS:
                name = f"default_{part}"
                self.unet.add_adapter(LoraConfig(r=int(sd["rank_unet"]), lora_alpha=LORA_ALPHA,
                                                 init_lora_weights="gaussian",
                                                 target_modules=list(sd[f"unet_lora_{part}_modules"])), name)
                names.append(name)
            self.vae.add_adapter(LoraConfig(r=int(sd["rank_vae"]), lora_alpha=LORA_ALPHA, init_lora_weights="gaussian",
                                            target_modules=sorted(set(sd["vae_lora_encoder_modules"]))),
                                 "default_encoder")
            # the trained conv_in is stored in full (conv_in.base_layer.*), not only as LoRA
            _copy_params(self.unet, sd["state_dict_unet"], lambda n: "lora" in n or "conv_in" in n, "UNet", source)
            _copy_params(self.vae, sd["state_dict_vae"], lambda n: "lora" in n, "VAE", source)
            _merge(self.unet, names)
            _merge(self.vae, ["default_encoder"])
        elif method == "pisa-sr":
            # pix is always on: bake ΔW_pix into the base weights. sem stays a LoRA switched between weight 1 and 0,
            # so the adjustable mode needs no second copy of the UNet (the official code swaps two full copies).
            # (peft ignores unmerged adapters on a layer once any adapter is merged, hence baking, not merging.)
            state = dict(sd["state_dict_unet"])
            scale = LORA_ALPHA / int(sd["lora_rank_unet_pix"])
            with torch.no_grad():
                for part in UNET_PARTS:
                    for module in sd[f"unet_lora_{part}_modules_pix"]:
                        key = f"{module}.lora_{{}}.default_{part}_pix.weight"
                        if key.format("A") not in state or key.format("B") not in state:
                            raise ValueError(f"{source}: the file lacks the pixel LoRA of `{module}`.")
                        try:
                            weight = self.unet.get_submodule(module).weight
                        except AttributeError:
                            raise ValueError(f"{source}: pixel LoRA module `{module}` matches no layer of this "
                                             f"UNet.") from None
                        delta = lora_sr.lora_delta(state.pop(key.format("A")), state.pop(key.format("B")), scale)
                        weight.add_(delta.to(weight.dtype).view_as(weight))
            for part in UNET_PARTS:
                self.unet.add_adapter(LoraConfig(r=int(sd["lora_rank_unet_sem"]), lora_alpha=LORA_ALPHA,
                                                 init_lora_weights="gaussian",
                                                 target_modules=list(sd[f"unet_lora_{part}_modules_sem"])),
                                      f"default_{part}_sem")
            _copy_params(self.unet, state, lambda n: "lora" in n, "UNet", source)
            self._sem_adapters = [f"default_{p}_sem" for p in UNET_PARTS]
            self._set_sem(1.0)
        self.sr_method, self._sr_state = method, sd
        return method

    def _set_sem(self, weight: float) -> None:
        self.unet.set_adapters(self._sem_adapters, weights=[weight] * len(self._sem_adapters))

    def save_sr_weights(self, path: str | Path) -> Path:
        """The loaded SR weights as one safetensors file (+ module lists, ranks and alpha in its metadata)."""
        from safetensors.torch import save_file

        if self._sr_state is None:
            raise ValueError("No SR weights loaded; call load_sr_weights first.")
        sd = self._sr_state
        meta = {k: v for k, v in sd.items() if not k.startswith("state_dict_")}
        meta.update(method=self.sr_method, lora_alpha=LORA_ALPHA, format="swiftstep-sr/1")
        tensors = {f"{part}.{k}": v.contiguous() for part in SD_PARTS
                   for k, v in sd.get(f"state_dict_{part}", {}).items()}
        path = Path(path)
        save_file(tensors, str(path), metadata={"swiftstep_sr": json.dumps(meta)})
        return path

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def to_images(image, name: str = "image", first: int = 0) -> list:
        """PIL / list of PIL / numpy [H,W,C] or [B,H,W,C] / torch [C,H,W] or [B,C,H,W] → list of RGB PIL or float
        [3, H, W] tensors in [0, 1]. Alpha is dropped and 16-bit data rescaled, with a warning. Errors name the
        argument `name` and the item (numbered from `first`)."""
        import warnings

        single = isinstance(image, Image.Image) or (isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim != 4)
        if isinstance(image, (Image.Image, np.ndarray, torch.Tensor)):
            image = [image] if single else list(image)
        image = list(image)
        if not image:
            raise ValueError(f"`{name}` is an empty batch.")
        out = []
        for i, im in enumerate(image):
            item = f"`{name}`" if single else f"`{name}[{first + i}]`"
            pil = isinstance(im, Image.Image)
            size = im.size if pil else tuple(np.shape(im))
            if 0 in size:
                found = f"a {size[0]}×{size[1]} (width×height) PIL image" if pil else f"shape {size}"
                raise ValueError(f"{item} is empty: expected an image of at least 1×1 px, found {found}.")
            if pil:
                if im.mode != "RGB":
                    if im.mode in ("RGBA", "LA", "P", "I;16", "I", "F"):
                        warnings.warn(f"converting a {im.mode} image to RGB (alpha dropped / bit depth reduced)",
                                      stacklevel=3)
                    im = im.convert("RGB")
                out.append(im)
                continue
            arr = torch.as_tensor(np.asarray(im)) if isinstance(im, np.ndarray) else im
            if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4) and arr.shape[0] not in (1, 3, 4):
                arr = arr.permute(2, 0, 1)
            if arr.dtype == torch.uint8:
                arr = arr.float() / 255.0
            elif arr.dtype in (torch.int16, torch.int32, torch.uint16) or (arr.is_floating_point() and arr.max() > 1.5):
                warnings.warn("rescaling 16-bit image data to [0, 1]", stacklevel=3)
                arr = arr.float() / 65535.0
            arr = arr.float()
            if arr.shape[0] == 4:
                warnings.warn("dropping the alpha channel", stacklevel=3)
                arr = arr[:3]
            if arr.shape[0] == 1:
                arr = arr.expand(3, -1, -1)
            if arr.ndim != 3 or arr.shape[0] != 3:
                raise ValueError(f"{item}: expected an RGB image, got a tensor of shape {tuple(arr.shape)}.")
            out.append(arr.clamp(0, 1))
        return out

    _resize = staticmethod(sr_step.resize)

    @staticmethod
    def preprocess(im, upscale: int, min_side: int) -> torch.Tensor:
        """The official pre-processing (`core.sr_step.preprocess`): [1, 3, H, W] in [-1, 1]."""
        return sr_step.preprocess(im, upscale, min_side)

    def _prompt_embeds(self, prompt: str, device) -> torch.Tensor:
        key = (prompt, device)
        if key not in self._prompt_cache:  # PiSA-SR's "" never changes: encode once
            ids = self.tokenizer([prompt], padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids.to(device)
            with torch.no_grad():
                self._prompt_cache = {key: self.text_encoder(ids)[0]}
        return self._prompt_cache[key]

    def _auto_vae_tile(self, size) -> int | None:
        return sr_step.auto_vae_tile(self._execution_device, size)

    def _vae_norms(self, part):
        return [m for m in part.modules() if isinstance(m, torch.nn.GroupNorm)]

    def _encode(self, x, vae_tile):
        """The VAE posterior of x; tiled with image-wide GroupNorm (`core.sr_step.encode_tiled`)."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        if vae_tile is None:
            return self.vae.encode(x).latent_dist
        moments = sr_step.encode_tiled(lambda t: self.vae.encode(t).latent_dist.parameters,
                                       self._vae_norms(self.vae.encoder), x, vae_tile, self.vae_scale)
        return DiagonalGaussianDistribution(moments)

    def _decode(self, z, vae_tile):
        """VAE decode; tiled with image-wide GroupNorm (`core.sr_step.decode_tiled`)."""
        if vae_tile is None:
            return self.vae.decode(z).sample
        return sr_step.decode_tiled(lambda t: self.vae.decode(t).sample, self._vae_norms(self.vae.decoder), z,
                                    vae_tile, self.vae_scale)

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def _auto_tile(self) -> int:
        """Latent tile edge from free GPU memory: the largest square whose UNet pass fits in 60 % of what is free
        (H100, fp16: ≈ 59 KB per latent pixel, from 3.6 GiB peak at 256² in shared/notes/lora_sr.md §8), never below
        the official 96. On the CPU: 96, the official default."""
        device = self._execution_device
        if device.type != "cuda":
            return 96
        free, _ = torch.cuda.mem_get_info(device)
        per_pixel = 59e3 * (2 if self.unet.dtype == torch.float32 else 1)
        return max(96, int((0.6 * free / per_pixel) ** 0.5) // 8 * 8)

    def _check_sr_args(self, upscale, color_fix, tile_size, tile_overlap) -> int:
        """The checks image and video SR share; returns the latent tile edge (default: from free memory)."""
        tile = self._auto_tile() if tile_size is None else tile_size
        sr_step.check_args(upscale, color_fix, tile, tile_overlap)
        return tile

    # ------------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(self, image, upscale: int = 4, prompt: str = "", lambda_pix: float = 1.0, lambda_sem: float = 1.0,
                 color_fix: str = "adain", tile_size: int | None = None, tile_overlap: int = 32,
                 min_side: int = 512, vae_tile: int | None = None, generator: torch.Generator | None = None,
                 output_type: str = "pil", return_dict: bool = True):
        r"""Super-resolve `image` (PIL, list of PIL, numpy or torch; see `to_images`).

        Args:
            upscale: integer factor (the official weights are trained for 4).
            prompt: text for OSEDiff (the official code prepends DAPE tags; pass them here); PiSA-SR uses "".
            lambda_pix, lambda_sem: PiSA-SR's pixel-fidelity and semantic-detail strengths (1, 1 = default pass).
            color_fix: "adain" (official default), "wavelet" or "none", against the upscaled input.
            tile_size, tile_overlap: latent tiling (official 96 / 32). Default tile: from free GPU memory (at least
                96), 96 on the CPU; untiled when the latent area fits in one tile.
            min_side: the official `process_size`: outputs are at least this large on the short side.
            vae_tile: tile the VAE (edge in latent pixels; encoder tiles are 8× in pixels) with GroupNorm
                statistics over the whole image, for images whose VAE pass does not fit in memory. Default: on
                CUDA when the output exceeds 2048² pixels (tile 128), otherwise untiled.
            generator: seeds the VAE posterior sample (the official code draws it unseeded).
        Returns: `.images` at upscale × input size (PIL list, np [B,H,W,3] or pt [B,3,H,W] in [0, 1]); images
            of different sizes come back as lists.
        """
        # 1. Check inputs
        if self.sr_method is None:
            raise ValueError("Load SR weights first: pipe.load_sr_weights('osediff.pkl' or 'pisa_sr.pkl').")
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"`output_type` must be 'pil', 'np' or 'pt', got {output_type!r}.")
        lambda_pix = finite.check_finite("lambda_pix", lambda_pix)
        lambda_sem = finite.check_finite("lambda_sem", lambda_sem)
        if self.sr_method != "pisa-sr" and (lambda_pix, lambda_sem) != (1.0, 1.0):
            raise ValueError("`lambda_pix`/`lambda_sem` need PiSA-SR weights; OSEDiff has a single LoRA.")
        tile = self._check_sr_args(upscale, color_fix, tile_size, tile_overlap)
        images = self.to_images(image)
        device, dtype = self._execution_device, self.unet.dtype
        sf = self.vae.config.scaling_factor
        osediff = self.sr_method == "osediff"
        t = lora_sr.OSEDIFF_T if osediff else lora_sr.PISA_T
        embeds = self._prompt_embeds(prompt if osediff else "", device).to(dtype)
        adjustable = lora_sr.pisa_two_pass(self.sr_method, lambda_pix, lambda_sem)
        config = self.scheduler.config
        schedule = onestep.NoiseSchedule.vp(onestep.alphas_cumprod(
            config.beta_start, config.beta_end, config.num_train_timesteps, config.beta_schedule))

        def unet_eps(z):
            e = embeds.expand(z.shape[0], -1, -1)
            if not adjustable:
                return self.unet(z, t, encoder_hidden_states=e).sample
            eps_ps = self.unet(z, t, encoder_hidden_states=e).sample
            self._set_sem(0.0)
            try:
                eps_pix = self.unet(z, t, encoder_hidden_states=e).sample
            finally:
                self._set_sem(1.0)
            return lora_sr.pisa_adjustable_eps(eps_pix, eps_ps, lambda_pix, lambda_sem)

        outputs = []
        with self.progress_bar(total=len(images)) as progress:
            for im in images:
                w0, h0 = im.size if isinstance(im, Image.Image) else (im.shape[2], im.shape[1])
                # 2. Pre-process and encode (the posterior sample is the only randomness)
                x = self.preprocess(im, upscale, min_side).to(device, self.vae.dtype)
                vt = vae_tile if vae_tile is not None else self._auto_vae_tile(x.shape[-2:])
                z = self._encode(x, vt).sample(generator) * sf
                # 3. One UNet step (tiled over the latent when it is larger than a tile)
                z = z.to(dtype)
                eps = sr_step.latent_eps(unet_eps, z, tile, tile_overlap)
                x0 = sr_step.sr_x0(self.sr_method, eps.float(), z.float(), schedule)
                # 4. Decode, colour fix against the upscaled input, back to exactly upscale × the input size
                out = self._decode((x0 / sf).to(self.vae.dtype), vt)
                outputs.append(sr_step.finish(out, x, color_fix, (h0 * upscale, w0 * upscale)))
                progress.update()

        self.maybe_free_model_hooks()
        if output_type == "pt":
            result = torch.stack(outputs) if len({o.shape for o in outputs}) == 1 else outputs
        elif output_type == "np":
            arrays = [o.permute(1, 2, 0).numpy() for o in outputs]
            result = np.stack(arrays) if len({a.shape for a in arrays}) == 1 else arrays
        else:
            result = [Image.fromarray((o.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for o in outputs]
        return ImagePipelineOutput(images=result) if return_dict else (result,)
