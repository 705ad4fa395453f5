"""One-step LoRA super-resolution in ComfyUI.

* Images (OSEDiff / PiSA-SR): SwiftStepUpscaleV2 on ComfyUI's own MODEL, CLIP and VAE of an SD2.1-base checkpoint
  (Load Checkpoint); the SR weights become patches on clones (`nodes/native_sr.py`), no diffusers needed.
* Video (DLoRAL): SwiftStepSRLoader → SwiftStepVideoUpscale (frames → frames). ComfyUI has no model type for DLoRAL's
  8-channel UNet and CFR module, so the loader holds a `pipelines.VideoSRPipeline`; the base model is an SD2.1-base
  diffusers folder in `models/diffusers/` (or a single-file checkpoint in `models/checkpoints/`, whose configs
  diffusers fetches once from the hub).
* SwiftStepUpscale (SR_MODEL from the loader → IMAGE) is deprecated in favour of SwiftStepUpscaleV2.

SR weights live in `models/swiftstep/`.
"""

from __future__ import annotations

import os

import torch
from comfy_api.latest import io

from .dependencies import required_by
from .managed_pipeline import ManagedPipeline

SR_MODEL = io.Custom("SWIFTSTEP_SR_MODEL")
COLOR_FIXES = ("adain", "wavelet", "none")


def _register_folder():
    import folder_paths

    if "swiftstep" not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path("swiftstep", os.path.join(folder_paths.models_dir, "swiftstep"))


def diffusers_folders() -> list[str]:
    """Names (relative to models/diffusers) of folders holding a model_index.json."""
    import folder_paths

    found = []
    for root in folder_paths.get_folder_paths("diffusers"):
        if not os.path.isdir(root):
            continue
        for path, _, files in os.walk(root, followlinks=True):
            if "model_index.json" in files:
                found.append(os.path.relpath(path, root))
    return sorted(found)


def base_choices() -> list[str]:
    import folder_paths

    ckpts = [f for f in folder_paths.get_filename_list("checkpoints") if f.endswith((".safetensors", ".ckpt"))]
    return [f"diffusers/{d}" for d in diffusers_folders()] + [f"checkpoints/{c}" for c in ckpts]


def check_images(node: str, name: str, images: torch.Tensor) -> None:
    """An IMAGE input [B, H, W, C]: at least one image, no zero-length side."""
    if images.ndim != 4 or 0 in images.shape:
        raise ValueError(f"{node}: input `{name}` must be an IMAGE batch [B, H, W, C] of at least one image with "
                         f"every side ≥ 1, found shape {tuple(images.shape)}.")


def load_sr_model(base: str, weights: str, dtype: str):
    import comfy.model_management
    import folder_paths

    with required_by("SwiftStepSRLoader"):
        from ..pipelines.pipeline_sr import OneStepSRPipeline, sr_method
        from ..pipelines.pipeline_video_sr import VideoSRPipeline

    weights_path = folder_paths.get_full_path_or_raise("swiftstep", weights)
    pipeline_class = VideoSRPipeline if sr_method(weights_path) == "dloral" else OneStepSRPipeline
    kind, _, name = base.partition("/")
    torch_dtype = None if dtype == "auto" else getattr(torch, dtype)
    if kind == "diffusers":
        path = next((os.path.join(r, name) for r in folder_paths.get_folder_paths("diffusers")
                     if os.path.isfile(os.path.join(r, name, "model_index.json"))), None)
        if path is None:
            raise FileNotFoundError(f"SwiftStepSRLoader: input `base`: no diffusers folder {name!r} under "
                                    f"models/diffusers.")
        pipe = pipeline_class.from_pretrained(path, dtype=torch_dtype)
    elif kind == "checkpoints":
        pipe = pipeline_class.from_single_file(folder_paths.get_full_path_or_raise("checkpoints", name),
                                               dtype=torch_dtype)
    else:
        raise ValueError(f"SwiftStepSRLoader: input `base` must start with diffusers/ or checkpoints/, got {base!r}.")
    pipe.load_sr_weights(weights_path)
    pipe.set_progress_bar_config(disable=True)
    if torch_dtype is None and comfy.model_management.get_torch_device().type == "cuda":
        pipe.to(torch.float16)
    return ManagedPipeline(pipe)


_register_folder()  # models/swiftstep, as soon as ComfyUI imports the pack


class SwiftStepSRLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        import folder_paths

        bases = base_choices() or ["diffusers/stable-diffusion-2-1-base"]
        weights = folder_paths.get_filename_list("swiftstep") or ["pisa_sr.pkl", "osediff.pkl", "model.pkl"]
        return io.Schema(
            node_id="SwiftStepSRLoader",
            display_name="SwiftStep SR Loader (OSEDiff / PiSA-SR / DLoRAL)",
            category="swiftstep/upscale",
            description="Loads an SD2.1-base model with one-step super-resolution weights: OSEDiff or PiSA-SR for "
                        "images (SwiftStep Upscale), DLoRAL for video (SwiftStep Video Upscale). One UNet pass of "
                        "SD2.1 (0.87 B parameters) + small LoRAs per tile; core's SeedVR2 is a 3 B / 7 B DiT. Held "
                        "under ComfyUI's model management (offloaded and freed like its own models).",
            inputs=[
                io.Combo.Input("base", options=bases, default=bases[0],
                               tooltip="SD2.1-base: a diffusers folder in models/diffusers (offline), or a single "
                                       "checkpoint in models/checkpoints (configs fetched from the hub once)."),
                io.Combo.Input("weights", options=weights, default=weights[0],
                               tooltip="osediff.pkl, pisa_sr.pkl, DLoRAL's model.pkl (the official files) or a "
                                       "swiftstep .safetensors export, in models/swiftstep."),
                io.Combo.Input("dtype", options=["auto", "float32", "float16", "bfloat16"], default="auto",
                               tooltip="auto: float16 on CUDA, float32 on the CPU."),
            ],
            outputs=[SR_MODEL.Output(display_name="SR_MODEL",
                                     tooltip="For SwiftStep Upscale (images) or SwiftStep Video Upscale (DLoRAL).")],
        )

    @classmethod
    def execute(cls, base, weights, dtype) -> io.NodeOutput:
        return io.NodeOutput(load_sr_model(base, weights, dtype))


class SwiftStepUpscale(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SwiftStepUpscale",
            display_name="SwiftStep Upscale (one-step SR, deprecated)",
            category="swiftstep/upscale",
            description="One-step diffusion super-resolution; PiSA-SR weights expose pixel vs semantic strength. "
                        "Deprecated: SwiftStep Upscale V2 runs the same step on the MODEL/CLIP/VAE of Load "
                        "Checkpoint, without diffusers.",
            is_deprecated=True,
            inputs=[
                SR_MODEL.Input("sr_model", tooltip="From SwiftStep SR Loader."),
                io.Image.Input("image", tooltip="The low-resolution image(s)."),
                io.Int.Input("upscale", default=4, min=1, max=8, tooltip="Scale factor (the weights are trained ×4)."),
                io.Float.Input("lambda_pix", default=1.0, min=0.0, max=3.0, step=0.05,
                               tooltip="PiSA-SR pixel fidelity: higher denoises more but smooths."),
                io.Float.Input("lambda_sem", default=1.0, min=0.0, max=3.0, step=0.05,
                               tooltip="PiSA-SR semantic detail: higher adds detail but may hallucinate. "
                                       "OSEDiff weights need both at 1."),
                io.Combo.Input("color_fix", options=list(COLOR_FIXES), default="adain",
                               tooltip="Match colours to the input: adain (official default), wavelet, or none."),
                io.Int.Input("tile_size", default=96, min=16, max=512, step=8,
                             tooltip="Latent tile size (×8 px); tiles are used only when the image needs them."),
                io.Int.Input("tile_overlap", default=32, min=0, max=256, step=8,
                             tooltip="Latent overlap between tiles, blended with Gaussian weights."),
                io.Int.Input("min_side", default=512, min=64, max=4096, step=8,
                             tooltip="Smaller inputs are enlarged first so the output's short side reaches this "
                                     "(official: 512)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seeds the VAE posterior sample, the only randomness."),
            ],
            outputs=[io.Image.Output(tooltip="The upscaled image(s).")],
        )

    @classmethod
    def execute(cls, sr_model, image, upscale, lambda_pix, lambda_sem, color_fix, tile_size, tile_overlap,
                min_side, seed) -> io.NodeOutput:
        import comfy.model_management
        import comfy.utils

        if sr_model.pipe.sr_method == "dloral":
            raise ValueError("SwiftStepUpscale: input `sr_model` holds DLoRAL video weights; connect it to SwiftStep "
                             "Video Upscale (frames in, frames out).")
        if tile_overlap >= tile_size:
            raise ValueError(f"SwiftStepUpscale: input `tile_overlap` ({tile_overlap}) must be smaller than "
                             f"`tile_size` ({tile_size}).")
        check_images("SwiftStepUpscale", "image", image)
        frames = image.permute(0, 3, 1, 2).float().cpu()  # IMAGE [B, H, W, C] → [B, C, H, W]
        pipe = sr_model.loaded()
        progress = comfy.utils.ProgressBar(frames.shape[0])
        generator = torch.Generator("cpu").manual_seed(seed)
        outs = []
        for i, frame in enumerate(frames):
            comfy.model_management.throw_exception_if_processing_interrupted()
            out = pipe(frame, upscale=upscale, lambda_pix=lambda_pix, lambda_sem=lambda_sem, color_fix=color_fix,
                           tile_size=tile_size, tile_overlap=tile_overlap, min_side=min_side, generator=generator,
                           output_type="pt").images
            outs.append(out.permute(0, 2, 3, 1))
            progress.update_absolute(i + 1)
        return io.NodeOutput(torch.cat(outs).to(comfy.model_management.intermediate_device()))


class SwiftStepVideoUpscale(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SwiftStepVideoUpscale",
            display_name="SwiftStep Video Upscale (DLoRAL)",
            category="swiftstep/upscale",
            description="One-step video super-resolution with temporal consistency (DLoRAL): each frame is aligned "
                        "to the previous one by optical flow and cross-frame attention. Every frame is output.",
            inputs=[
                SR_MODEL.Input("sr_model", tooltip="From SwiftStep SR Loader with DLoRAL's model.pkl."),
                io.Image.Input("frames", tooltip="The clip as an image batch, in order (e.g. from a video loader); "
                                                 "at least 2 frames of one size."),
                io.Int.Input("upscale", default=4, min=1, max=8, tooltip="Scale factor (the weights are trained ×4)."),
                io.Combo.Input("stages", options=["full", "consistency"], default="full",
                               tooltip="full: detail + consistency LoRAs (official --stages 1); consistency: the "
                                       "temporal-consistency LoRA only (--stages 0, smoother, less detail)."),
                io.String.Input("prompt", default="", multiline=True,
                                tooltip="Text condition (the official script uses tags of the first frame)."),
                io.Combo.Input("color_fix", options=list(COLOR_FIXES), default="adain",
                               tooltip="Match colours to each input frame: adain (official default), wavelet, none."),
                io.Int.Input("tile_size", default=96, min=64, max=512, step=8,
                             tooltip="Latent tile size (×8 px, at least 64 for the flow network); tiles are used "
                                     "only when the frames need them."),
                io.Int.Input("tile_overlap", default=32, min=0, max=256, step=8,
                             tooltip="Latent overlap between tiles, blended with Gaussian weights."),
                io.Int.Input("min_side", default=512, min=512, max=4096, step=8,
                             tooltip="Smaller frames are enlarged first so the output's short side reaches this "
                                     "(at least 512: the flow network sees frames at 1/8)."),
                io.Int.Input("chunk_frames", default=1, min=1, max=16,
                             tooltip="Frames per batch on the GPU: faster with more, memory grows with it (not "
                                     "with the clip length)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seeds the VAE posterior samples, one per frame in order."),
            ],
            outputs=[io.Image.Output(tooltip="The upscaled frames, one per input frame.")],
        )

    @classmethod
    def execute(cls, sr_model, frames, upscale, stages, prompt, color_fix, tile_size, tile_overlap, min_side,
                chunk_frames, seed) -> io.NodeOutput:
        import comfy.model_management
        import comfy.utils

        if sr_model.pipe.sr_method != "dloral":
            raise ValueError(f"SwiftStepVideoUpscale: input `sr_model` holds {sr_model.pipe.sr_method} "
                             f"image weights; load DLoRAL's model.pkl in SwiftStep SR Loader (or use SwiftStep "
                             f"Upscale for images).")
        if tile_overlap >= tile_size:
            raise ValueError(f"SwiftStepVideoUpscale: input `tile_overlap` ({tile_overlap}) must be smaller than "
                             f"`tile_size` ({tile_size}).")
        if frames.shape[0] < 2:
            raise ValueError(f"SwiftStepVideoUpscale: input `frames` has {frames.shape[0]} frame"
                             f"{'s' * (frames.shape[0] == 0)}; a video needs at least 2 (use SwiftStep Upscale for a "
                             f"single image).")
        check_images("SwiftStepVideoUpscale", "frames", frames)
        clip = frames.permute(0, 3, 1, 2).float().cpu()  # IMAGE [N, H, W, C] → [N, C, H, W]
        progress = comfy.utils.ProgressBar(clip.shape[0])

        def on_frame(done, total):
            comfy.model_management.throw_exception_if_processing_interrupted()
            progress.update_absolute(done, total)

        device = comfy.model_management.intermediate_device()
        outs = [frame.permute(1, 2, 0).to(device) for frame in sr_model.loaded().stream(
            clip, upscale=upscale, prompt=prompt, stages=stages, color_fix=color_fix, tile_size=tile_size,
            tile_overlap=tile_overlap, chunk_frames=chunk_frames, min_side=min_side,
            generator=torch.Generator("cpu").manual_seed(seed), callback_on_frame=on_frame)]
        return io.NodeOutput(torch.stack(outs))


class SwiftStepUpscaleV2(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        import folder_paths

        weights = folder_paths.get_filename_list("swiftstep") or ["pisa_sr.pkl", "osediff.pkl"]
        return io.Schema(
            node_id="SwiftStepUpscaleV2",
            display_name="SwiftStep Upscale V2 (OSEDiff / PiSA-SR)",
            category="swiftstep/upscale",
            description="One-step diffusion super-resolution on the MODEL, CLIP and VAE of an SD2.1-base checkpoint "
                        "(Load Checkpoint): OSEDiff or PiSA-SR weights are applied as LoRA patches on clones, so "
                        "ComfyUI loads, offloads and frees the models as its own. PiSA-SR exposes pixel vs semantic "
                        "strength. One UNet pass of SD2.1 per tile; core's SeedVR2 is a 3 B / 7 B DiT.",
            inputs=[
                io.Model.Input("model", tooltip="SD2.1-base (512 px, ε-prediction) from Load Checkpoint, e.g. "
                                                "v2-1_512-ema-pruned.safetensors."),
                io.Clip.Input("clip", tooltip="The CLIP of the same SD2.1-base checkpoint (encodes the prompt; "
                                              "PiSA-SR encodes the empty prompt)."),
                io.Vae.Input("vae", tooltip="The VAE of the same SD2.1-base checkpoint."),
                io.Combo.Input("weights", options=weights, default=weights[0],
                               tooltip="osediff.pkl or pisa_sr.pkl (the official files) or a swiftstep "
                                       ".safetensors export, in models/swiftstep. DLoRAL's model.pkl is video: SR "
                                       "Loader → Video Upscale."),
                io.Image.Input("image", tooltip="The low-resolution image(s)."),
                io.String.Input("prompt", default="", multiline=True,
                                tooltip="OSEDiff only: text condition (the official script uses DAPE tags of the "
                                        "input); PiSA-SR always uses the empty prompt."),
                io.Int.Input("upscale", default=4, min=1, max=8, tooltip="Scale factor (the weights are trained ×4)."),
                io.Float.Input("lambda_pix", default=1.0, min=0.0, max=3.0, step=0.05,
                               tooltip="PiSA-SR pixel fidelity: higher denoises more but smooths. Away from 1 "
                                       "(either strength) the UNet runs twice."),
                io.Float.Input("lambda_sem", default=1.0, min=0.0, max=3.0, step=0.05,
                               tooltip="PiSA-SR semantic detail: higher adds detail but may hallucinate. "
                                       "OSEDiff weights need both at 1."),
                io.Combo.Input("color_fix", options=list(COLOR_FIXES), default="adain",
                               tooltip="Match colours to the input: adain (official default), wavelet, or none."),
                io.Int.Input("tile_size", default=96, min=16, max=512, step=8,
                             tooltip="Latent tile size (×8 px); tiles are used only when the latent's area exceeds "
                                     "one tile."),
                io.Int.Input("tile_overlap", default=32, min=0, max=256, step=8,
                             tooltip="Latent overlap between tiles, blended with Gaussian weights."),
                io.Int.Input("min_side", default=512, min=64, max=4096, step=8,
                             tooltip="Smaller inputs are enlarged first so the output's short side reaches this "
                                     "(official: 512)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seeds the VAE posterior samples (one per image, in order), the only "
                                     "randomness."),
            ],
            outputs=[io.Image.Output(tooltip="The upscaled image(s), upscale × the input size.")],
        )

    @classmethod
    def execute(cls, model, clip, vae, weights, image, prompt, upscale, lambda_pix, lambda_sem, color_fix, tile_size,
                tile_overlap, min_side, seed) -> io.NodeOutput:
        import comfy.model_management
        import folder_paths

        from ..core import finite, sr_step, sr_weights
        from . import native_sr

        node = "SwiftStepUpscaleV2"
        # 1. Check inputs
        check_images(node, "image", image)
        if image.shape[-1] not in (1, 3, 4):
            raise ValueError(f"{node}: input `image` must have 1, 3 or 4 channels, found {image.shape[-1]}.")
        try:  # the pipeline's own checks; the messages name the input
            finite.check_finite("lambda_pix", lambda_pix)
            finite.check_finite("lambda_sem", lambda_sem)
            sr_step.check_args(upscale, color_fix, tile_size, tile_overlap)
        except ValueError as error:
            raise ValueError(f"{node}: input {error}") from None
        native_sr.check_base(node, model, clip, vae)
        source = f"{node}: input `weights`: {weights}"
        sd = sr_weights.read_sr_weights(folder_paths.get_full_path_or_raise("swiftstep", weights))
        method = sr_weights.image_method(sd, source, "load it in SwiftStep SR Loader and upscale with SwiftStep "
                                                    "Video Upscale (frames in, frames out).")
        if method == "osediff" and (lambda_pix, lambda_sem) != (1.0, 1.0):
            raise ValueError(f"{node}: inputs `lambda_pix`/`lambda_sem` need PiSA-SR weights; {weights} holds "
                             f"OSEDiff (a single LoRA): set both to 1.")
        sr_weights.check_keys(sd, method, source)

        frames = image.permute(0, 3, 1, 2).float().cpu()  # IMAGE [B, H, W, C] → [B, C, H, W]
        frames = (frames[:, :3] if frames.shape[1] == 4 else frames.expand(-1, 3, -1, -1)).clamp(0, 1)
        # 2.–5. patches on clones, then per image: encode, UNet step (tiled), decode, colour fix
        out = native_sr.super_resolve(node, model, clip, vae, sd, method, source, frames, prompt, upscale,
                                      lambda_pix, lambda_sem, color_fix, tile_size, tile_overlap, min_side,
                                      torch.Generator("cpu").manual_seed(seed))
        return io.NodeOutput(out.permute(0, 2, 3, 1).to(comfy.model_management.intermediate_device()))


NODES = [SwiftStepSRLoader, SwiftStepUpscale, SwiftStepUpscaleV2, SwiftStepVideoUpscale]
