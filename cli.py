"""`swiftstep` command line: a thin front over `swiftstep.pipelines`.

    swiftstep generate --model stabilityai/sd-turbo --prompt "a red fox" --out fox.png
    swiftstep generate --model sd_xl_base.safetensors --config ./sdxl-folder --preset dmd2-sdxl-4step ...
    swiftstep generate --model black-forest-labs/FLUX.1-schnell --prompt "a red fox" --dtype bfloat16
    swiftstep selftest            # builds a tiny random model offline and runs the whole generate path
    swiftstep upscale photo.png --base ./sd21-base --weights pisa_sr.pkl --scale 4 --out upscaled/
    swiftstep upscale-video clip.mp4 --base ./sd21-base --weights model.pkl --out clip_x4.mp4
    swiftstep mar --mar-ckpt checkpoint-last.pth --vae-ckpt kl16.ckpt --size base --class 207 --schedule disa-linear
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from . import __version__

DTYPES = ("float32", "float16", "bfloat16")


def load_pipeline(model: str, config: str | None, dtype: str, device: str, cls=None, flag: str = "--model"):
    """A folder or hub id → `from_pretrained`; a `.safetensors`/`.ckpt` file → `from_single_file`."""
    import torch

    if cls is None:
        from .pipelines import OneStepPipeline as cls
    torch_dtype = getattr(torch, dtype)
    path = Path(model)
    if path.suffix in (".safetensors", ".ckpt"):
        pipe = cls.from_single_file(model, config=config, dtype=torch_dtype)
    elif path.is_dir() or (model.count("/") == 1 and not path.exists()):
        pipe = cls.from_pretrained(model, dtype=torch_dtype)
    else:
        raise FileNotFoundError(f"{flag}: no diffusers folder, checkpoint file or hub id at {model!r}.")
    return pipe.to(device)


def read_image(path: str | Path, flag: str):
    """An image file through PIL, decoded now: an unreadable or damaged file is a ValueError naming it."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{flag}: no input image at {path.resolve()}.")
    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:  # PIL's decoders raise all four
        raise ValueError(f"{flag}: {path.name}: expected an image file PIL reads (PNG, JPEG, WebP, …); found: "
                         f"{error}.") from error
    return image


def save_png(image, path: Path, params: dict, line: str | None = None) -> Path:
    """Save with the generation parameters: a `swiftstep` JSON text chunk, plus `parameters` (the A1111-style line
    other tools read) when given."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if line is not None:
        info.add_text("parameters", line)
    info.add_text("swiftstep", json.dumps({**params, "swiftstep": __version__}))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, pnginfo=info)
    print(f"wrote {path}")
    return path


def dit_folder(model: str) -> bool:
    """Whether `--model` is a diffusers folder (or hub id) of a distilled DiT (FLUX, SD3.5, Z-Image, …)."""
    from .pipelines.load_one_step import read_config
    from .pipelines.pipeline_distilled_dit import PIPELINE_FAMILIES

    path = Path(model)
    if path.suffix in (".safetensors", ".ckpt") or not (path.is_dir() or model.count("/") == 1):
        return False
    return read_config(model).get("_class_name") in PIPELINE_FAMILIES


def generate_dit(args) -> list[Path]:
    """`generate` for a distilled DiT folder: `load_one_step` and the preset's recipe."""
    import torch

    from .pipelines import load_one_step

    for flag, value in (("--image", args.image), ("--gamma", args.gamma), ("--config", args.config)):
        if value is not None:
            raise ValueError(f"{flag} applies to SD/SDXL UNet models only; {args.model} is a DiT folder.")
    pipe = load_one_step(args.model, args.preset, dtype=getattr(torch, args.dtype)).to(args.device)
    timesteps = [float(t) for t in args.timesteps.split(",")] if args.timesteps else None
    height, width = pipe.default_size(args.height, args.width)
    schedule = pipe.resolve(None, args.steps, timesteps, None, height, width)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    images = pipe(args.prompt, num_inference_steps=args.steps, timesteps=timesteps, height=height, width=width,
                  num_images_per_prompt=args.num_images, generator=generator).images
    if "sigmas" in schedule:
        grid = {"sigmas": schedule["sigmas"]}
    else:  # SANA-Sprint: the TrigFlow angles it sampled
        grid = {"angles": schedule.get("timesteps") or pipe.preset.scm_timesteps(schedule["num_inference_steps"])}
    params = {"prompt": args.prompt, "model": args.model, "preset": pipe.preset.name if pipe.preset else None,
              "steps": schedule["num_inference_steps"], **{k: [round(float(v), 6) for v in g] for k, g in grid.items()},
              "seed": args.seed, "height": height, "width": width, "dtype": args.dtype}
    line = (f"{args.prompt}\nSteps: {params['steps']}, Sampler: swiftstep {params['preset'] or 'custom'}, "
            f"Seed: {args.seed}, Size: {width}x{height}, Model: {args.model}, Version: swiftstep {__version__}")
    return _save_all(images, Path(args.out), params, line)


def _save_all(images, out: Path, params: dict, line: str) -> list[Path]:
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(len(images))]
    return [save_png(image, path, {**params, "index": i}, line) for i, (image, path) in enumerate(zip(images, paths))]


def generate(args) -> list[Path]:
    import torch

    if dit_folder(args.model):
        return generate_dit(args)
    pipe = load_pipeline(args.model, args.config, args.dtype, args.device)
    preset = pipe.resolve_preset(args.preset)
    timesteps = [float(t) for t in args.timesteps.split(",")] if args.timesteps else None
    sampler = pipe.make_sampler(preset, args.steps, timesteps, args.gamma)
    image = None
    if args.image:
        image = read_image(args.image, "--image").convert("RGB")
        sampler = pipe._img2img_sampler(sampler, args.strength)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    default_h, default_w = (image.height, image.width) if image is not None else (size, size)
    height, width = args.height or default_h, args.width or default_w
    if image is not None:
        height, width = height - height % pipe.vae_scale_factor, width - width % pipe.vae_scale_factor
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    images = pipe(args.prompt, height=height, width=width, preset=args.preset, num_inference_steps=args.steps,
                  timesteps=timesteps, gamma=args.gamma, num_images_per_prompt=args.num_images,
                  generator=generator, image=image, strength=args.strength).images
    params = {"prompt": args.prompt, "model": args.model, "preset": preset.name if preset else None,
              "steps": len(sampler), "timesteps": [int(t) if t.is_integer() else t for t in sampler.timesteps],
              "gamma": args.gamma, "seed": args.seed, "height": height, "width": width, "dtype": args.dtype}
    if image is not None:
        params.update(image=str(args.image), strength=args.strength)
    line = (f"{args.prompt}\nSteps: {params['steps']}, Sampler: swiftstep {params['preset'] or 'custom'}, "
            f"Seed: {args.seed}, Size: {width}x{height}, Model: {args.model}, Timesteps: {params['timesteps']}, "
            f"Version: swiftstep {__version__}")
    return _save_all(images, Path(args.out), params, line)


def upscale(args) -> list[Path]:
    import torch

    from .pipelines import OneStepSRPipeline

    pipe = load_pipeline(args.base, args.config, args.dtype, args.device, OneStepSRPipeline, "--base")
    method = pipe.load_sr_weights(args.weights)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for src in args.inputs:
        src = Path(src)
        image = read_image(src, "input")
        generator = torch.Generator(device=args.device).manual_seed(args.seed)
        result = pipe(image, upscale=args.scale, prompt=args.prompt, lambda_pix=args.lambda_pix,
                      lambda_sem=args.lambda_sem, color_fix=args.color_fix, tile_size=args.tile,
                      min_side=args.min_side, generator=generator).images[0]
        params = {"input": str(src), "method": method, "weights": str(args.weights), "base": args.base,
                  "scale": args.scale, "lambda_pix": args.lambda_pix, "lambda_sem": args.lambda_sem,
                  "color_fix": args.color_fix, "seed": args.seed}
        paths.append(save_png(result, out_dir / f"{src.stem}_x{args.scale}.png", params))
    return paths


def upscale_video(args) -> list[Path]:
    import torch

    from .pipelines import VideoSRPipeline
    from .video_io import VideoReader, VideoWriter

    reader = VideoReader(args.input)  # before loading models: a bad input fails fast
    pipe = load_pipeline(args.base, args.config, args.dtype, args.device, VideoSRPipeline, "--base")
    pipe.load_sr_weights(args.weights)
    out = Path(args.out)
    if out.suffix.lower() != ".mp4":
        raise ValueError(f"--out must be an .mp4 file, got {out}.")
    params = {"input": str(args.input), "method": "dloral", "weights": str(args.weights), "base": args.base,
              "scale": args.scale, "stages": args.stages, "prompt": args.prompt, "color_fix": args.color_fix,
              "seed": args.seed, "fps": str(reader.fps), "swiftstep": __version__}
    generator = torch.Generator().manual_seed(args.seed)
    with VideoWriter(out, reader.fps, crf=args.crf, audio_from=args.input if reader.has_audio else None,
                     metadata=params) as writer:
        for frame in pipe.stream(reader, upscale=args.scale, prompt=args.prompt, stages=args.stages,
                                 color_fix=args.color_fix, tile_size=args.tile, chunk_frames=args.chunk_frames,
                                 min_side=args.min_side, generator=generator):
            writer.write(frame)
    print(f"wrote {writer.frames} frames at {float(reader.fps):g} fps to {out}")
    return [out]


def mar(args) -> list[Path]:
    import torch

    from .core import imagenet
    from .pipelines import MARPipeline

    if args.model:
        pipe = MARPipeline.from_pretrained(args.model)
    elif args.mar_ckpt and args.vae_ckpt:
        pipe = MARPipeline.from_official(args.mar_ckpt, args.vae_ckpt, size=args.size)
    else:
        raise ValueError("pass --model (a folder written by MARPipeline.save_pretrained) or --mar-ckpt and --vae-ckpt "
                         "(the official checkpoint-last.pth and kl16.ckpt).")
    pipe = pipe.to(args.device)
    labels = [imagenet.class_id(c) for c in args.class_ids]
    generator = torch.Generator().manual_seed(args.seed)
    images = pipe(labels, num_iter=args.num_iter, step_schedule=args.schedule, steps_start=args.steps_start,
                  steps_end=args.steps_end, cfg=args.cfg, temperature=args.temperature, generator=generator,
                  official_compat=args.official_compat).images
    params = {"num_iter": args.num_iter, "schedule": args.schedule, "steps": [args.steps_start, args.steps_end],
              "cfg": args.cfg, "temperature": args.temperature, "seed": args.seed,
              "official_compat": args.official_compat}
    return [save_png(image, Path(args.out) / f"mar_class{label}_seed{args.seed}.png",
                     {**params, "class": label, "class_name": imagenet.IMAGENET_CLASSES[label]})
            for label, image in zip(labels, images)]


def selftest(args) -> list[Path]:
    from .tiny_models import save_folder

    with tempfile.TemporaryDirectory() as tmp:
        folder = save_folder("sd2", Path(tmp) / "tiny-sd2")
        ns = argparse.Namespace(model=str(folder), config=None, prompt="a tiny random test image", preset="sd-turbo",
                                steps=None, timesteps=None, gamma=None, seed=0, height=None, width=None,
                                num_images=1, dtype="float32", device="cpu", out=args.out, image=None,
                                strength=0.5)
        paths = generate(ns)
    from PIL import Image

    meta = json.loads(Image.open(paths[0]).text["swiftstep"])
    print(f"selftest OK: swiftstep {__version__}, tiny SD2 model, preset {meta['preset']}, t={meta['timesteps']} "
          f"(random weights: the image is noise). Real use: swiftstep generate --model stabilityai/sd-turbo ...")
    return paths


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swiftstep", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"swiftstep {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="text-to-image (or image-to-image) with a one-/few-step model")
    g.add_argument("--model", required=True, help="diffusers folder or hub id (SD/SDXL UNets and the distilled DiTs: "
                   "FLUX.1-schnell, FLUX.2-klein, Z-Image-Turbo, Qwen-Image, SD3.5-Turbo, SANA-Sprint), or an "
                   "original SD/SDXL .safetensors/.ckpt file")
    g.add_argument("--config", help="for a single file: a local diffusers folder of the same family (offline)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--preset", help="one of swiftstep.core.presets.PRESETS (default: inferred from the folder)")
    g.add_argument("--steps", type=int, help="number of steps (a count the preset supports)")
    g.add_argument("--timesteps", help="explicit comma-separated timesteps, e.g. 999,749,499,249 (flow DiTs: "
                   "1000·σ; SANA-Sprint: steps + 1 TrigFlow angles ending in 0)")
    g.add_argument("--gamma", type=float, help="TCD/CTM gamma sampling, 0 (deterministic) … 1 (full re-noise)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--height", type=int)
    g.add_argument("--width", type=int)
    g.add_argument("--num-images", type=int, default=1)
    g.add_argument("--image", help="image-to-image: start from this picture (SD-Turbo's card: --steps 2, strength 0.5)")
    g.add_argument("--strength", type=float, default=0.5,
                   help="with --image: the last ⌊steps·strength⌋ timesteps run on the picture")
    g.add_argument("--dtype", choices=DTYPES, default="float32")
    g.add_argument("--device", default="cuda" if _cuda() else "cpu")
    g.add_argument("--out", default="swiftstep.png")
    g.set_defaults(func=generate)

    u = sub.add_parser("upscale", help="one-step ×4 super-resolution (OSEDiff / PiSA-SR weights)")
    u.add_argument("inputs", nargs="+", help="image files")
    u.add_argument("--base", required=True, help="SD2.1-base: diffusers folder, hub id, or single .safetensors")
    u.add_argument("--config", help="for a single-file base: a local diffusers folder of SD2.1-base (offline)")
    u.add_argument("--weights", required=True, help="osediff.pkl, pisa_sr.pkl or a swiftstep .safetensors export")
    u.add_argument("--scale", type=int, default=4)
    u.add_argument("--prompt", default="", help="OSEDiff text prompt (e.g. DAPE tags); PiSA-SR ignores it")
    u.add_argument("--lambda-pix", type=float, default=1.0, help="PiSA-SR pixel-fidelity strength")
    u.add_argument("--lambda-sem", type=float, default=1.0, help="PiSA-SR semantic-detail strength")
    u.add_argument("--color-fix", choices=("adain", "wavelet", "none"), default="adain")
    u.add_argument("--tile", type=int, help="latent tile size (default 96; tiles only when needed)")
    u.add_argument("--seed", type=int, default=0, help="seeds the VAE posterior sample")
    u.add_argument("--min-side", type=int, default=512,
                   help="smaller inputs are first enlarged so the output's short side reaches this (official: 512)")
    u.add_argument("--dtype", choices=DTYPES, default="float32")
    u.add_argument("--device", default="cuda" if _cuda() else "cpu")
    u.add_argument("--out", default="upscaled", help="output folder")
    u.set_defaults(func=upscale)

    v = sub.add_parser("upscale-video", help="one-step ×4 video super-resolution (DLoRAL weights)")
    v.add_argument("input", help="a video file (anything FFmpeg reads)")
    v.add_argument("--out", required=True, help="the output .mp4 (H.264; frame rate and audio of the input kept)")
    v.add_argument("--base", required=True, help="SD2.1-base: diffusers folder, hub id, or single .safetensors")
    v.add_argument("--config", help="for a single-file base: a local diffusers folder of SD2.1-base (offline)")
    v.add_argument("--weights", required=True, help="DLoRAL's model.pkl or a swiftstep .safetensors export")
    v.add_argument("--scale", type=int, default=4)
    v.add_argument("--stages", choices=("full", "consistency"), default="full",
                   help="full: detail + consistency LoRAs (official --stages 1); consistency: --stages 0")
    v.add_argument("--prompt", default="", help="text condition (the official script uses DAPE tags of frame 0)")
    v.add_argument("--color-fix", choices=("adain", "wavelet", "none"), default="adain")
    v.add_argument("--tile", type=int, help="latent tile size (default 96; at least 64; tiles only when needed)")
    v.add_argument("--chunk-frames", type=int, help="frames per batch (default 1 on the CPU, 4 on CUDA)")
    v.add_argument("--min-side", type=int, default=512,
                   help="smaller frames are first enlarged so the output's short side reaches this (≥ 512)")
    v.add_argument("--seed", type=int, default=0, help="seeds the VAE posterior samples")
    v.add_argument("--crf", type=int, default=18, help="H.264 quality (lower is better; 18 ≈ visually lossless)")
    v.add_argument("--dtype", choices=DTYPES, default="float32")
    v.add_argument("--device", default="cuda" if _cuda() else "cpu")
    v.set_defaults(func=upscale_video)

    m = sub.add_parser("mar", help="class-conditional ImageNet images with MAR + DiSA step annealing")
    m.add_argument("--model", help="a folder written by MARPipeline.save_pretrained")
    m.add_argument("--mar-ckpt", help="the official checkpoint-last.pth (its model_ema weights are used)")
    m.add_argument("--vae-ckpt", help="the official kl16.ckpt")
    m.add_argument("--size", choices=("base", "large", "huge"), default="base")
    m.add_argument("--class", dest="class_ids", nargs="+", required=True,
                   help="ImageNet class ids or names, e.g. 207 or 'golden retriever'")
    m.add_argument("--num-iter", type=int, default=64)
    m.add_argument("--schedule", choices=("disa-linear", "disa-cosine", "disa-two-stage", "constant"),
                   default="disa-linear")
    m.add_argument("--steps-start", type=int, default=50)
    m.add_argument("--steps-end", type=int, default=5)
    m.add_argument("--cfg", type=float, help="default per size: 2.9 / 3.0 / 3.3")
    m.add_argument("--temperature", type=float, default=1.0)
    m.add_argument("--official-compat", action="store_true", help="DiSA's released behaviour (950 clip)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--device", default="cuda" if _cuda() else "cpu")
    m.add_argument("--out", default="mar")
    m.set_defaults(func=mar)

    s = sub.add_parser("selftest", help="offline check: tiny random model through the whole generate path")
    s.add_argument("--out", default="swiftstep-selftest.png")
    s.set_defaults(func=selftest)
    return parser


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        print(f"swiftstep: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
