"""`OneStepSRPipeline`: one-step LoRA super-resolution (OSEDiff, PiSA-SR) on an SD2.1-base pipeline.

Loads the published weight files (`osediff.pkl`, `pisa_sr.pkl`; read with `torch.load(weights_only=True)`) or
their safetensors export (`save_sr_weights`). The maths is `core.lora_sr`, `core.onestep` and `core.tiling`.

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

from ..core import finite, lora_sr, onestep, tiling
from . import checkpoint_io, single_file
from .pipeline_one_step import unet_family

LORA_ALPHA = 8  # peft's default, which the official LoraConfig(r=4, …) inherits: scale 8/4 = 2
UNET_PARTS = ("encoder", "decoder", "others")
SD_PARTS = ("unet", "vae", "bpp")  # state_dict_<part> entries of the official files
LAYOUTS = {
    "osediff": "OSEDiff .pkl: vae_lora_encoder_modules, unet_lora_{encoder,decoder,others}_modules, rank_unet, "
               "rank_vae, state_dict_unet (LoRA + full conv_in), state_dict_vae",
    "pisa-sr": "PiSA-SR .pkl: unet_lora_{encoder,decoder,others}_modules_{pix,sem}, lora_rank_unet_{pix,sem}, "
               "state_dict_unet",
    "dloral": "DLoRAL model.pkl: unet_lora_{encoder,decoder,others}_modules_{quality,consistency}, "
              "lora_rank_unet_{quality,consistency}, state_dict_unet (the whole UNet, 8-channel conv_in), "
              "state_dict_bpp (the CFR module)",
    "swiftstep-sr": "swiftstep safetensors export (save_sr_weights): metadata `swiftstep_sr` + unet./vae./bpp. "
                    "tensors",
}
SAFETENSORS_WHAT = "SR weights exported by save_sr_weights (metadata `swiftstep_sr` + unet./vae./bpp. tensors)"
PICKLE_WHAT = "SR weights (the official osediff.pkl, pisa_sr.pkl or DLoRAL model.pkl: a dict of module lists and " \
              "state dicts)"


def detect_layout(sd: dict) -> str:
    if "vae_lora_encoder_modules" in sd and "state_dict_unet" in sd:
        return "osediff"
    if "unet_lora_encoder_modules_pix" in sd and "state_dict_unet" in sd:
        return "pisa-sr"
    if "unet_lora_encoder_modules_quality" in sd and "state_dict_unet" in sd:
        return "dloral"
    known = "\n  ".join(f"{k}: {v}" for k, v in LAYOUTS.items())
    raise ValueError(f"Unknown SR weights layout (top-level keys {sorted(sd)[:8]}); known layouts:\n  {known}")


def read_sr_weights(path: str | Path) -> dict:
    """The official .pkl (torch.load, weights_only) or our safetensors export, as the official dict layout."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No SR weights file at {path.resolve()}.")
    if path.suffix == ".safetensors":
        with checkpoint_io.open_safetensors(path, SAFETENSORS_WHAT) as f:
            meta = (f.metadata() or {}).get("swiftstep_sr")
            if meta is None:
                raise ValueError(f"{path.name}: a safetensors file without `swiftstep_sr` metadata; expected one "
                                 f"written by save_sr_weights, or an official osediff.pkl / pisa_sr.pkl.")
            sd = json.loads(meta)
            for part in SD_PARTS:
                keys = [k for k in f.keys() if k.startswith(part + ".")]
                if keys:
                    sd[f"state_dict_{part}"] = {k[len(part) + 1:]: f.get_tensor(k) for k in keys}
        return sd
    # memory-mapped: a DLoRAL model.pkl holds a whole UNet; tensors are read when copied into the model
    sd = checkpoint_io.read_torch_file(path, PICKLE_WHAT, mmap=True)
    if not isinstance(sd, dict):
        raise ValueError(f"{path.name}: expected a dict of SR weights, found {type(sd).__name__}.")
    return sd


def sr_method(path: str | Path) -> str:
    """Which SR method a weights file holds ("osediff", "pisa-sr", "dloral"), without reading its tensors."""
    path = Path(path)
    if path.suffix == ".safetensors" and path.is_file():
        with checkpoint_io.open_safetensors(path, SAFETENSORS_WHAT) as f:
            meta = (f.metadata() or {}).get("swiftstep_sr")
        if meta is not None:
            return json.loads(meta).get("method") or detect_layout(json.loads(meta))
    sd = read_sr_weights(path)
    return sd.get("method") or detect_layout(sd)


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


def _expected(sd: dict, method: str) -> dict[str, set[str]]:
    """Parameter names the file must hold, per model, from its own module lists (peft's naming)."""
    unet, vae = set(), set()
    kinds = [""] if method == "osediff" else ["_pix", "_sem"]
    for kind in kinds:
        for part in UNET_PARTS:
            for m in sd[f"unet_lora_{part}_modules{kind}"]:
                unet |= {f"{m}.lora_A.default_{part}{kind}.weight", f"{m}.lora_B.default_{part}{kind}.weight"}
    if method == "osediff":
        unet |= {"conv_in.base_layer.weight", "conv_in.base_layer.bias"}
        for m in set(sd["vae_lora_encoder_modules"]):
            vae |= {f"{m}.lora_A.default_encoder.weight", f"{m}.lora_B.default_encoder.weight"}
    return {"unet": unet, "vae": vae}


def _validate(sd: dict, method: str, unet, vae, source: str) -> None:
    """Every key accounted for and every module present, before anything in the model changes."""
    for part, model in (("unet", unet), ("vae", vae)):
        have = set(sd.get(f"state_dict_{part}", {}))
        want = _expected(sd, method)[part]
        if have - want:
            extra = sorted(have - want)
            raise ValueError(f"{source}: {len(extra)} of {len(have)} {part.upper()} keys match no LoRA module "
                             f"listed in the file, e.g. {extra[:2]}.")
        if want - have:
            raise ValueError(f"{source}: the file lacks {len(want - have)} {part.upper()} parameters, e.g. "
                             f"{sorted(want - have)[:2]}.")
        names = {n for n, _ in model.named_modules()}
        modules = {k.split(".lora_")[0].removesuffix(".base_layer.weight").removesuffix(".base_layer.bias")
                   for k in want}
        if modules - names:
            raise ValueError(f"{source}: {len(modules - names)} LoRA modules match no layer of this "
                             f"{type(model).__name__}, e.g. {sorted(modules - names)[:2]}; is the base model SD2.1?")


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
        method = sd.get("method") or detect_layout(sd)
        if method == "dloral":
            raise ValueError(f"{source} is a DLoRAL video SR checkpoint (quality/consistency adapters, CFR module): "
                             f"load it with swiftstep.pipelines.VideoSRPipeline, not OneStepSRPipeline.")
        if method not in ("osediff", "pisa-sr"):
            detect_layout({})
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

    @staticmethod
    def _resize(im, size: tuple[int, int], resample) -> torch.Tensor | Image.Image:
        """PIL resize of a PIL image, or of a float tensor channel by channel in PIL's float mode (no 8-bit loss)."""
        h, w = size
        if isinstance(im, Image.Image):
            return im.resize((w, h), resample) if im.size != (w, h) else im
        if tuple(im.shape[1:]) == (h, w):
            return im
        chans = [np.asarray(Image.fromarray(c.numpy(), mode="F").resize((w, h), resample)) for c in im.cpu()]
        return torch.from_numpy(np.stack(chans))

    def preprocess(self, im, upscale: int, min_side: int) -> torch.Tensor:
        """The official pre-processing: short LQ side raised to min_side/upscale (bicubic), ×upscale (bicubic),
        each side floored to a multiple of 8 (LANCZOS). Returns [1, 3, H, W] in [-1, 1]."""
        w, h = im.size if isinstance(im, Image.Image) else (im.shape[2], im.shape[1])
        floor = min_side // upscale
        if min(w, h) < floor:
            scale = floor / min(w, h)
            im = self._resize(im, (int(scale * h), int(scale * w)), Image.BICUBIC)
            w, h = im.size if isinstance(im, Image.Image) else (im.shape[2], im.shape[1])
        im = self._resize(im, (h * upscale, w * upscale), Image.BICUBIC)
        im = self._resize(im, (h * upscale - h * upscale % 8, w * upscale - w * upscale % 8), Image.LANCZOS)
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1) \
            if isinstance(im, Image.Image) else im.float()
        return (x * 2 - 1)[None]

    def _prompt_embeds(self, prompt: str, device) -> torch.Tensor:
        key = (prompt, device)
        if key not in self._prompt_cache:  # PiSA-SR's "" never changes: encode once
            ids = self.tokenizer([prompt], padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids.to(device)
            with torch.no_grad():
                self._prompt_cache = {key: self.text_encoder(ids)[0]}
        return self._prompt_cache[key]

    def _auto_vae_tile(self, size) -> int | None:
        if self._execution_device.type == "cuda" and size[0] * size[1] > 2048 * 2048:
            return 128
        return None

    def _vae_norms(self, part):
        return [m for m in part.modules() if isinstance(m, torch.nn.GroupNorm)]

    def _encode(self, x, vae_tile):
        """The VAE posterior of x; tiled (pixel tiles f × vae_tile, halo 8f px: 64 for SD) with image-wide GroupNorm.
        The halo trades exactness at tile borders for compute: the SD encoder's full reach is ≈ 100 px."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        if vae_tile is None:
            return self.vae.encode(x).latent_dist
        f = self.vae_scale
        moments = tiling.tiled_norm_synced(lambda t: self.vae.encode(t).latent_dist.parameters,
                                           self._vae_norms(self.vae.encoder), x, tile=f * vae_tile, halo=8 * f,
                                           scale=1 / f, align=f)
        return DiagonalGaussianDistribution(moments)

    def _decode(self, z, vae_tile):
        """VAE decode; tiled (latent tiles vae_tile, halo 16 ≈ the SD decoder's reach) with image-wide GroupNorm."""
        if vae_tile is None:
            return self.vae.decode(z).sample
        return tiling.tiled_norm_synced(lambda t: self.vae.decode(t).sample, self._vae_norms(self.vae.decoder), z,
                                        tile=vae_tile, halo=16, scale=self.vae_scale)

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
        if not isinstance(upscale, int) or upscale < 1:
            raise ValueError(f"`upscale` must be a positive integer, got {upscale!r}.")
        if color_fix not in lora_sr.COLOR_FIXES:
            raise ValueError(f"`color_fix` must be one of {tuple(lora_sr.COLOR_FIXES)}, got {color_fix!r}.")
        tile = self._auto_tile() if tile_size is None else tile_size
        if tile_overlap >= tile:
            raise ValueError(f"`tile_overlap` ({tile_overlap}) must be smaller than `tile_size` ({tile}).")
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
        adjustable = not osediff and (lambda_pix, lambda_sem) != (1.0, 1.0)

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
                h, w = z.shape[-2:]
                eps = unet_eps(z) if h * w <= tile * tile else tiling.tiled_apply(unet_eps, z, tile, tile_overlap)
                if osediff:
                    a, b = onestep.NoiseSchedule.vp(onestep.alphas_cumprod(
                        self.scheduler.config.beta_start, self.scheduler.config.beta_end,
                        self.scheduler.config.num_train_timesteps,
                        self.scheduler.config.beta_schedule)).scales(t)
                    x0, _ = onestep.x0_and_eps(eps.float(), z.float(), a, b, "epsilon")
                else:
                    x0 = lora_sr.pisa_x0(eps.float(), z.float())
                # 4. Decode, colour fix against the upscaled input, back to exactly upscale × the input size
                out = self._decode((x0 / sf).to(self.vae.dtype), vt).clamp(-1, 1).float()
                out = lora_sr.color_fix((out + 1) / 2, (x.float() + 1) / 2, color_fix).clamp(0, 1)[0].cpu()
                outputs.append(self._resize(out, (h0 * upscale, w0 * upscale), Image.BICUBIC).clamp(0, 1))
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
