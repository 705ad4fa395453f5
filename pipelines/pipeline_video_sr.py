"""`VideoSRPipeline`: DLoRAL one-step video super-resolution on an SD2.1-base pipeline.

Loads the official `model.pkl` (read with `torch.load(weights_only=True)`) or its safetensors export. The maths is
`core.video_sr` (flow warp, chunked cross-frame attention, x0), the CFR network `models.dloral`, the shared SR
helpers (pre-processing, colour fix, VAE tiling) `OneStepSRPipeline`'s.

Differences from the official script, on purpose:
* every input frame gets an output frame; frame 0, which has no previous frame, is paired with itself (a still
  first window: its "previous" latent is its own);
* each frame is encoded once (the official script encodes every frame twice, once per window it belongs to, with a
  fresh posterior sample each time), and the posterior samples come from `generator`, one per frame in order;
* frames stream through: memory holds `chunk_frames` windows, never the clip;
* the LoRAs are baked into the UNet weights (the official runs six unmerged peft adapters);
* the cross-frame attention runs in query chunks (exact) instead of materialising HW × HW similarities.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from ..core import lora_sr, tiling, video_sr
from ..models.dloral import CrossFrameRetrieval
from .pipeline_sr import LORA_ALPHA, UNET_PARTS, OneStepSRPipeline, detect_layout, read_sr_weights

ADAPTER_KINDS = ("quality", "consistency")
STAGES = ("full", "consistency")


def _lora_modules(sd: dict, kind: str) -> dict[str, str]:
    """module name → adapter name (`default_<part>_<kind>`) from the file's module lists."""
    out = {}
    for part in UNET_PARTS:
        for m in sd[f"unet_lora_{part}_modules_{kind}"]:
            out[m] = f"default_{part}_{kind}"
    return out


class VideoSRPipeline(OneStepSRPipeline):
    r"""×4 one-step video super-resolution with DLoRAL weights (SD2.1-base + CFR + quality/consistency LoRAs).

    `VideoSRPipeline.from_pretrained(<SD2.1-base>)`, then `load_sr_weights("model.pkl")`; call on frames.
    """

    model_cpu_offload_seq = "text_encoder->vae->cfr->unet"

    def __init__(self, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                 unet: UNet2DConditionModel, scheduler, cfr: CrossFrameRetrieval | None = None):
        super().__init__(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        self.register_modules(cfr=cfr)
        self._quality: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        self.stage = None

    # ------------------------------------------------------------------ weights
    def load_sr_weights(self, path: str | Path) -> str:
        """Load DLoRAL weights: the official model.pkl (whole UNet with the 8-channel conv_in and six LoRAs, CFR in
        `state_dict_bpp`) or `save_sr_weights`' safetensors. The consistency LoRAs are baked into the UNet; the
        quality LoRAs too, for stages="full" (the default), and are taken out again for stages="consistency"."""
        if self.sr_method is not None:
            raise ValueError(f"SR weights ({self.sr_method}) are already loaded; create a fresh pipeline to switch.")
        source = Path(path).name
        sd = read_sr_weights(path)
        method = sd.get("method") or detect_layout(sd)
        if method != "dloral":
            raise ValueError(f"{source} holds {method} image SR weights; VideoSRPipeline needs DLoRAL's model.pkl "
                             f"(use OneStepSRPipeline for {method}).")
        if "state_dict_bpp" not in sd:
            raise ValueError(f"{source}: a DLoRAL file without `state_dict_bpp` (the CFR module).")
        cfr = CrossFrameRetrieval.load_official(sd["state_dict_bpp"], source)
        unet_state = self._unet_weights(sd, source)  # validates everything before the UNet changes

        old = self.unet.conv_in
        conv_in = torch.nn.Conv2d(8, old.out_channels, old.kernel_size, old.stride, old.padding)
        self.unet.conv_in = conv_in.to(old.weight.device, old.weight.dtype)
        self.unet.register_to_config(in_channels=8)
        params = dict(self.unet.named_parameters())
        with torch.no_grad():
            for name, value in unet_state.items():
                params[name].copy_(value.to(params[name].dtype))
        self.register_modules(cfr=cfr.to(self.unet.device, self.unet.dtype).eval())
        # the UNet now holds base + consistency ΔW, i.e. the "consistency" stage; "full" adds the quality ΔW
        self.sr_method, self._sr_state, self.stage = "dloral", sd, "consistency"
        self._set_stage("full")
        return "dloral"

    def _unet_weights(self, sd: dict, source: str) -> dict[str, torch.Tensor]:
        """The UNet's plain parameters from the file: peft's `<m>.base_layer.*` for LoRA-wrapped modules, plus the
        consistency ΔW (baked); the quality LoRA factors are kept aside. Every key must be used."""
        state = dict(sd["state_dict_unet"])
        modules = {kind: _lora_modules(sd, kind) for kind in ADAPTER_KINDS}
        wrapped = set(modules["quality"]) | set(modules["consistency"])
        names = {n for n, _ in self.unet.named_modules()}
        if wrapped - names:
            raise ValueError(f"{source}: {len(wrapped - names)} LoRA modules match no layer of this UNet, e.g. "
                             f"{sorted(wrapped - names)[:2]}; is the base model SD2.1?")
        wanted = {}
        for name, p in self.unet.named_parameters():
            module, leaf = name.rsplit(".", 1)
            key = f"{module}.base_layer.{leaf}" if module in wrapped else name
            if key not in state:
                raise ValueError(f"{source}: `state_dict_unet` lacks `{key}` (DLoRAL stores the whole UNet).")
            value = state.pop(key)
            shape = (p.shape[0], 8, *p.shape[2:]) if name == "conv_in.weight" else p.shape
            if tuple(value.shape) != tuple(shape):
                raise ValueError(f"{source}: `{key}` has shape {tuple(value.shape)}, expected {tuple(shape)}"
                                 + (" (DLoRAL's conv_in takes 8 channels)" if module == "conv_in" else "") + ".")
            wanted[name] = value.float()
        self._quality = {}
        for kind in ADAPTER_KINDS:
            scale = LORA_ALPHA / int(sd[f"lora_rank_unet_{kind}"])
            for module, adapter in modules[kind].items():
                a_key, b_key = f"{module}.lora_A.{adapter}.weight", f"{module}.lora_B.{adapter}.weight"
                if a_key not in state or b_key not in state:
                    raise ValueError(f"{source}: the file lacks the {kind} LoRA of `{module}` ({a_key}).")
                a, b = state.pop(a_key).float(), state.pop(b_key).float()
                if kind == "consistency":
                    target = f"{module}.weight"
                    wanted[target] = wanted[target] + lora_sr.lora_delta(a, b, scale).view_as(wanted[target])
                else:
                    self._quality[module] = (a, b, scale)
        if state:
            extra = sorted(state)
            raise ValueError(f"{source}: {len(extra)} `state_dict_unet` keys match nothing in this UNet or the "
                             f"file's LoRA lists, e.g. {extra[:2]}.")
        return wanted

    def _set_stage(self, stage: str) -> None:
        """"full": quality + consistency LoRAs (official --stages 1); "consistency": consistency only (--stages 0).
        Switching adds or subtracts the quality ΔW in float32 (one rounding per switch in half precision)."""
        if stage not in STAGES:
            raise ValueError(f"`stages` must be one of {STAGES}, got {stage!r}.")
        if stage == self.stage:
            return
        sign = 1.0 if stage == "full" else -1.0
        with torch.no_grad():
            for module, (a, b, scale) in self._quality.items():
                weight = self.unet.get_submodule(module).weight
                delta = lora_sr.lora_delta(a.to(weight.device), b.to(weight.device), scale).view_as(weight)
                weight.copy_((weight.float() + sign * delta).to(weight.dtype))
        self.stage = stage

    # ------------------------------------------------------------------ frames
    @staticmethod
    def _frames(frames) -> tuple[Iterator, int | None]:
        """An iterator over frames (PIL, [H, W, C] arrays, [C, H, W] / [H, W, C] tensors) and the count if known.
        A [N, H, W, C] / [N, C, H, W] array or tensor is N frames."""
        if isinstance(frames, (np.ndarray, torch.Tensor)):
            if frames.ndim != 4:
                raise ValueError(f"a clip as one array/tensor must be 4-D [N, H, W, C] or [N, C, H, W], got shape "
                                 f"{tuple(frames.shape)}.")
            return iter(frames), len(frames)
        if isinstance(frames, Image.Image):
            return iter([frames]), 1
        try:
            total = len(frames)
        except TypeError:  # a generator, or a reader that does not know its length
            total = None
        return iter(frames), total

    def _encode_frames(self, x: torch.Tensor, vae_tile, generator) -> torch.Tensor:
        """Posterior samples × scaling factor, one draw per frame in order (independent of the chunking)."""
        dist = self._encode(x, vae_tile)
        noise = torch.cat([randn_tensor((1, *dist.mean.shape[1:]), generator=generator, device=x.device,
                                        dtype=dist.mean.dtype) for _ in range(x.shape[0])])
        return (dist.mean + dist.std * noise) * self.vae.config.scaling_factor

    # ------------------------------------------------------------------ call
    @torch.no_grad()
    def stream(self, frames, upscale: int = 4, prompt: str = "", stages: str = "full", color_fix: str = "adain",
               tile_size: int | None = None, tile_overlap: int = 32, chunk_frames: int | None = None,
               min_side: int = 512, vae_tile: int | None = None, generator: torch.Generator | None = None,
               callback_on_frame=None) -> Iterator[torch.Tensor]:
        r"""Super-resolve a clip frame by frame; yields each output frame ([3, H, W] float in [0, 1], on the CPU) as
        soon as it is ready, so memory holds `chunk_frames` windows whatever the clip length. Arguments as
        `__call__`."""
        if self.sr_method != "dloral":
            raise ValueError("Load DLoRAL weights first: pipe.load_sr_weights('model.pkl').")
        tile = self._check_sr_args(upscale, color_fix, tile_size, tile_overlap)
        if tile < video_sr.MIN_FLOW_SIDE:
            raise ValueError(f"`tile_size` must be at least {video_sr.MIN_FLOW_SIDE} latent px for DLoRAL (its flow "
                             f"network needs {8 * video_sr.MIN_FLOW_SIDE}-px tiles), got {tile}.")
        self._set_stage(stages)
        it, total = self._frames(frames)
        first = list(itertools.islice(it, 2))
        if len(first) < 2:
            raise ValueError(f"`frames`: a video needs at least 2 frames, got {len(first)}; for a single image use "
                             f"OneStepSRPipeline.")
        device, dtype = self._execution_device, self.unet.dtype
        embeds = self._prompt_embeds(prompt, device).to(dtype)
        t = lora_sr.PISA_T  # DLoRAL's UNet runs at t = 1

        def window_x0(latents8, images6):
            fn_prev, fn_cur = images6[:, :3], images6[:, 3:]
            aligned, fused = self.cfr(fn_prev, fn_cur, latents8[:, :4], latents8[:, 4:])
            z = torch.cat([aligned, fused], dim=1)
            eps = self.unet(z, t, encoder_hidden_states=embeds.expand(z.shape[0], -1, -1)).sample
            return video_sr.dloral_x0(eps.float(), z.float())

        size0 = prev = None
        done = 0
        chunk = chunk_frames or self._auto_chunk()
        it = itertools.chain(first, it)
        bar = self.progress_bar(total=total) if total is not None else \
            tqdm(**{"unit": "frame", **getattr(self, "_progress_bar_config", {})})  # unknown length: a count
        with bar as progress:
            while batch := list(itertools.islice(it, chunk)):
                images = self.to_images(batch, "frames", first=done)
                sizes = [im.size if isinstance(im, Image.Image) else (im.shape[2], im.shape[1]) for im in images]
                size0 = size0 or sizes[0]
                for j, s in enumerate(sizes):
                    if s != size0:
                        raise ValueError(f"all frames must have one size: frame {done + j} is {s[0]}×{s[1]}, frame 0 "
                                         f"is {size0[0]}×{size0[1]}.")
                x = torch.cat([self.preprocess(im, upscale, min_side) for im in images]).to(device, self.vae.dtype)
                video_sr.check_flow_size(*x.shape[-2:])  # before any work
                vt = vae_tile if vae_tile is not None else self._auto_vae_tile(x.shape[-2:])
                lat = self._encode_frames(x, vt, generator).to(dtype)
                if prev is None:
                    prev = (x[:1], lat[:1])  # frame 0 is its own previous frame
                prev_x = torch.cat([prev[0], x[:-1]])
                prev_lat = torch.cat([prev[1], lat[:-1]])
                prev = (x[-1:], lat[-1:])
                latents8 = torch.cat([prev_lat, lat], dim=1)
                images6 = torch.cat([prev_x, x], dim=1).to(dtype)
                h, w = lat.shape[-2:]
                if h * w <= tile * tile:
                    x0 = window_x0(latents8, images6)
                else:
                    x0 = tiling.tiled_apply(window_x0, latents8, tile, tile_overlap, aligned=((images6, 8),))
                out = self._decode((x0 / self.vae.config.scaling_factor).to(self.vae.dtype), vt).clamp(-1, 1)
                out = lora_sr.color_fix((out.float() + 1) / 2, (x.float() + 1) / 2, color_fix).clamp(0, 1).cpu()
                w0, h0 = size0
                for frame in out:
                    done += 1
                    progress.update()
                    if callback_on_frame is not None:
                        callback_on_frame(done, total)
                    yield self._resize(frame, (h0 * upscale, w0 * upscale), Image.BICUBIC).clamp(0, 1)
        self.maybe_free_model_hooks()

    def _auto_chunk(self) -> int:
        """Windows per batch: 1 on the CPU (no gain from batching), 4 on CUDA (fills the GPU at 512² frames)."""
        return 4 if self._execution_device.type == "cuda" else 1

    def __call__(self, frames, upscale: int = 4, prompt: str = "", stages: str = "full", color_fix: str = "adain",
                 tile_size: int | None = None, tile_overlap: int = 32, chunk_frames: int | None = None,
                 min_side: int = 512, vae_tile: int | None = None, generator: torch.Generator | None = None,
                 output_type: str = "pil", return_dict: bool = True, callback_on_frame=None):
        r"""Super-resolve every frame of a clip with DLoRAL.

        Args:
            frames: a list/iterable of frames (PIL, numpy [H, W, C], torch [C, H, W]) or one [N, H, W, C] /
                [N, C, H, W] array or tensor; at least 2 frames, all of one size. Upscaled frames must be at least
                512 px on each side (the flow network sees them at 1/8); `min_side` raises small inputs.
            upscale: integer factor (the official weights are trained for 4).
            prompt: the text condition (the official script prepends DAPE tags of frame 0; pass them here).
            stages: "full" (quality + consistency LoRAs, official `--stages 1`) or "consistency" (`--stages 0`).
            color_fix: "adain" (official default), "wavelet" or "none", against the upscaled input frame.
            tile_size, tile_overlap: latent tiling (official 96 / 32; at least 64), CFR and UNet per tile.
            chunk_frames: windows per batch (default 1 on the CPU, 4 on CUDA); memory grows with it, not with the
                clip length.
            generator: seeds the VAE posterior samples, one per frame in order.
            callback_on_frame: `fn(done, total)` after each frame (total None for an unsized iterable; raise to
                stop).
        Returns: `.images`: one frame per input frame, at upscale × the input size (PIL list, np [N, H, W, 3] or
            pt [N, 3, H, W] in [0, 1]). Frame 0 is conditioned on itself as its previous frame; frame i > 0 on
            frame i − 1, as the official windows. For long clips prefer `stream` (frames as they are ready).
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"`output_type` must be 'pil', 'np' or 'pt', got {output_type!r}.")
        out = []
        for frame in self.stream(frames, upscale=upscale, prompt=prompt, stages=stages, color_fix=color_fix,
                                 tile_size=tile_size, tile_overlap=tile_overlap, chunk_frames=chunk_frames,
                                 min_side=min_side, vae_tile=vae_tile, generator=generator,
                                 callback_on_frame=callback_on_frame):
            out.append(frame if output_type == "pt" else
                       frame.permute(1, 2, 0).numpy() if output_type == "np" else
                       Image.fromarray((frame.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)))
        result = torch.stack(out) if output_type == "pt" else np.stack(out) if output_type == "np" else out
        return ImagePipelineOutput(images=result) if return_dict else (result,)
