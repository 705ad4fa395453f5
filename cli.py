"""`swiftstep` command line: a thin front over `swiftstep.pipelines`.

    swiftstep generate --model stabilityai/sd-turbo --prompt "a red fox" --out fox.png
    swiftstep generate --model sd_xl_base.safetensors --config ./sdxl-folder --preset dmd2-sdxl-4step ...
    swiftstep generate --model black-forest-labs/FLUX.1-schnell --prompt "a red fox" --dtype bfloat16
    swiftstep generate --model stabilityai/sdxl-turbo --prompts prompts.txt --out-dir renders/   # a batch job
    accelerate launch --num_processes 8 -m swiftstep generate ... --prompts prompts.txt --out-dir renders/
    swiftstep selftest            # builds a tiny random model offline and runs the whole generate path
    swiftstep upscale photos/ --base ./sd21-base --weights pisa_sr.pkl --scale 4 --out upscaled/
    swiftstep upscale-video clip.mp4 --base ./sd21-base --weights model.pkl --out clip_x4.mp4
    swiftstep mar --mar-ckpt checkpoint-last.pth --vae-ckpt kl16.ckpt --size base --class 207 --schedule disa-linear

Batch jobs (resume, atomic writes, accelerate): batch_jobs.py, docs/batch-jobs.md.
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


def save_png(image, path: Path, params: dict, line: str | None = None, quiet: bool = False) -> Path:
    """Save with the generation parameters: a `swiftstep` JSON text chunk, plus `parameters` (the A1111-style line
    other tools read) when given."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if line is not None:
        info.add_text("parameters", line)
    info.add_text("swiftstep", json.dumps({**params, "swiftstep": __version__}))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", pnginfo=info)
    if not quiet:
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


def lora_arg(value: str) -> tuple[str, float]:
    """`--lora FILE[:SCALE]` → (file, scale); a suffix that is not a number stays part of the path (C:\\…)."""
    path, sep, scale = value.rpartition(":")
    if sep and path:
        try:
            return path, float(scale)
        except ValueError:
            pass
    return value, 1.0


GUIDANCE_ARGS = ("guidance", "nasa_scale", "nag_scale", "nag_tau", "nag_alpha")


class ImageMaker:
    """`generate`'s model, loaded on first use (a resumed job with nothing left loads nothing), and one call of it:
    `render(spec)` → (images, parameters to save, A1111 line). `spec`: prompt, negative_prompt, seed, height, width;
    the rest comes from the command's options. `settings` is what every output of the job shares."""

    def __init__(self, args, device: str, batch: bool = False):
        self.args, self.device, self.pipe, self.dit = args, device, None, dit_folder(args.model)
        self.batch = batch  # the job's progress bar replaces the pipeline's
        a = args
        if self.dit:
            for flag, value in (("--image", a.image), ("--gamma", a.gamma), ("--config", a.config),
                                ("--fast", a.fast or None)):
                if value is not None:
                    raise ValueError(f"{flag} applies to SD/SDXL UNet models only; {a.model} is a DiT folder.")
        if a.image is not None:
            read_image(a.image, "--image")  # a bad file is the job's error, not every item's
        self.timesteps = [float(t) for t in a.timesteps.split(",")] if a.timesteps else None
        self.guidance = {k: getattr(a, k) for k in GUIDANCE_ARGS if getattr(a, k) is not None}
        self.settings = {"model": a.model, "config": a.config, "preset": a.preset, "steps": a.steps,
                         "timesteps": a.timesteps, "gamma": a.gamma, "image": a.image,
                         "strength": a.strength if a.image else None,
                         "dtype": a.dtype, "lora": [list(entry) for entry in a.lora], "fast": a.fast,
                         **{k: getattr(a, k) for k in GUIDANCE_ARGS}}

    def load(self):
        import torch

        if self.pipe is not None:
            return self.pipe
        a = self.args
        if self.dit:
            from .pipelines import load_one_step

            pipe = load_one_step(a.model, a.preset, lora=a.lora or None, dtype=getattr(torch, a.dtype))
            pipe.to(self.device)
        else:
            from .pipelines.load_one_step import load_loras

            pipe = load_pipeline(a.model, a.config, a.dtype, self.device)
            load_loras(pipe, a.lora or None)
            if a.fast:
                pipe.enable_fast_path()
        if self.batch:
            pipe.set_progress_bar_config(disable=True)
        # The schedule the options ask for, checked once: a step count the preset does not support or a missing
        # LoRA is the job's error, not every item's.
        if self.dit:
            pipe.resolve(None, a.steps, self.timesteps, None, *pipe.default_size(a.height, a.width))
        else:
            pipe.make_sampler(pipe.resolve_preset(a.preset), a.steps, self.timesteps, a.gamma)
        self.pipe = pipe
        return pipe
    def render(self, spec: dict, num_images: int = 1):
        import torch

        pipe, a = self.load(), self.args
        prompt, seed = spec["prompt"], spec["seed"]
        negative = {"negative_prompt": spec["negative_prompt"], **self.guidance} if spec.get("negative_prompt") else {}
        generator = torch.Generator(device=self.device).manual_seed(seed)
        if self.dit:
            height, width = pipe.default_size(spec.get("height"), spec.get("width"))
            schedule = pipe.resolve(None, a.steps, self.timesteps, None, height, width)
            images = pipe(prompt, num_inference_steps=a.steps, timesteps=self.timesteps, height=height, width=width,
                          num_images_per_prompt=num_images, generator=generator, **negative).images
            if "sigmas" in schedule:
                grid = {"sigmas": schedule["sigmas"]}
            else:  # SANA-Sprint: the TrigFlow angles it sampled
                angles = schedule.get("timesteps") or pipe.preset.scm_timesteps(schedule["num_inference_steps"])
                grid = {"angles": angles}
            params = {"preset": pipe.preset.name if pipe.preset else None, "steps": schedule["num_inference_steps"],
                      **{k: [round(float(v), 6) for v in g] for k, g in grid.items()}}
            extra = ""
        else:
            preset = pipe.resolve_preset(a.preset)
            sampler = pipe.make_sampler(preset, a.steps, self.timesteps, a.gamma)
            image = None
            if a.image:
                image = read_image(a.image, "--image").convert("RGB")
                sampler = pipe._img2img_sampler(sampler, a.strength)
            size = pipe.unet.config.sample_size * pipe.vae_scale_factor
            default_h, default_w = (image.height, image.width) if image is not None else (size, size)
            height, width = spec.get("height") or default_h, spec.get("width") or default_w
            if image is not None:
                height, width = height - height % pipe.vae_scale_factor, width - width % pipe.vae_scale_factor
            images = pipe(prompt, height=height, width=width, preset=a.preset, num_inference_steps=a.steps,
                          timesteps=self.timesteps, gamma=a.gamma, num_images_per_prompt=num_images,
                          generator=generator, image=image, strength=a.strength, **negative).images
            params = {"preset": preset.name if preset else None, "steps": len(sampler),
                      "timesteps": [int(t) if t.is_integer() else t for t in sampler.timesteps], "gamma": a.gamma}
            if image is not None:
                params.update(image=str(a.image), strength=a.strength)
            extra = f", Timesteps: {params['timesteps']}"
        params = {"prompt": prompt, "model": a.model, **params, "seed": seed, "height": height, "width": width,
                  "dtype": a.dtype}
        if negative:
            params.update(negative)
        if a.lora:
            params["lora"] = [list(entry) for entry in a.lora]
        if a.fast:
            params["fast"] = True
        line = (f"{prompt}\n" + (f"Negative prompt: {negative['negative_prompt']}\n" if negative else "")
                + f"Steps: {params['steps']}, Sampler: swiftstep {params['preset'] or 'custom'}, Seed: {seed}, "
                f"Size: {width}x{height}, Model: {a.model}{extra}, Version: swiftstep {__version__}")
        return images, params, line

    def job(self, spec: dict) -> dict:
        """What a finished output of this job carries (PNG `swiftstep` → "job"), compared on `--resume`."""
        from .batch_jobs import job_record

        return job_record(spec, self.settings)


def _save_all(images, out: Path, params: dict, line: str) -> list[Path]:
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(len(images))]
    return [save_png(image, path, {**params, "index": i}, line) for i, (image, path) in enumerate(zip(images, paths))]


def generate(args):
    if (args.prompt is None) == (args.prompts is None):
        raise ValueError("generate: give one of --prompt (a prompt) and --prompts FILE (a prompt file).")
    if args.prompts is None and args.out_dir is None:  # one prompt, --num-images of it in one call, to --out
        device = args.device or ("cuda" if _cuda() else "cpu")
        if args.negative_prompt is None and any(getattr(args, k) is not None for k in GUIDANCE_ARGS):
            raise ValueError("--guidance, --nasa-scale and --nag-* need --negative-prompt.")
        maker = ImageMaker(args, device)
        spec = {"prompt": args.prompt, "negative_prompt": args.negative_prompt, "seed": args.seed,
                "height": args.height, "width": args.width}
        images, params, line = maker.render(spec, args.num_images)
        return _save_all(images, Path(args.out), {**params, "job": maker.job(spec)}, line)
    from .batch_jobs import Item, prompt_items, run_job

    if args.out_dir is None:
        raise ValueError("--prompts needs --out-dir (the folder the job writes its images to).")
    if args.prompts is not None:
        items = prompt_items(args.prompts, args.seed, args.num_images)
    else:  # --prompt with --out-dir: a job of --num-images seeds of one prompt, 00000.png …
        if not args.prompt.strip():
            raise ValueError("--prompt is empty.")
        items = [Item(k, f"{k:05d}.png", f"--prompt (image {k})", {"prompt": args.prompt, "seed": args.seed + k})
                 for k in range(args.num_images)]
    for item in items:  # the command's defaults where a line sets none
        for key, default in (("negative_prompt", args.negative_prompt), ("height", args.height),
                             ("width", args.width)):
            if item.spec.get(key) is None and not item.error:
                item.spec[key] = default
    if any(getattr(args, k) is not None for k in GUIDANCE_ARGS) and not any(i.spec.get("negative_prompt")
                                                                             for i in items):
        raise ValueError("--guidance, --nasa-scale and --nag-* need a negative prompt (--negative-prompt, or "
                         "\"negative_prompt\" in the prompt file's lines).")
    device = job_device(args.device)
    maker = ImageMaker(args, device, batch=True)

    def produce(item, path):
        images, params, line = maker.render(item.spec)
        save_png(images[0], path, {**params, "index": item.index, "job": maker.job(item.spec)}, line, quiet=True)

    summary = run_job(items, args.out_dir, produce, lambda item: maker.job(item.spec), resume=args.resume,
                      cpu=device == "cpu", what="images", prepare=maker.load)
    return 1 if summary.failed else 0


def job_device(requested: str | None) -> str:
    """This process's device for a batch job (accelerate's state set up): under `accelerate launch` each process gets
    its own GPU; `--device cpu` (or a machine without CUDA) runs every process on the CPU (gloo)."""
    from .batch_jobs import job_state

    cpu = requested == "cpu" or (requested is None and not _cuda())
    state = job_state(cpu)
    if not state.is_main_process:  # one set of bars: the main process's loading bars and the job's
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
    return str(state.device) if requested in (None, "cuda") else requested


def upscale(args):
    """Image SR as a batch job: every input file (folders: their images) → `--out`/<name>_x<scale>.png, seeded by
    `--seed` (every input), resumable, split across processes under `accelerate launch`."""
    import torch

    from .batch_jobs import IMAGE_SUFFIXES, file_items, job_record, run_job

    from .core import finite

    for flag, value in (("lambda_pix", args.lambda_pix), ("lambda_sem", args.lambda_sem)):
        finite.check_finite(flag, value)
    items = file_items(args.inputs, IMAGE_SUFFIXES, lambda p: f"{p.stem}_x{args.scale}.png", args.seed, args.out)
    device = job_device(args.device)
    settings = {"base": args.base, "config": args.config, "weights": str(args.weights), "scale": args.scale,
                "prompt": args.prompt,
                "lambda_pix": args.lambda_pix, "lambda_sem": args.lambda_sem, "color_fix": args.color_fix,
                "tile": args.tile, "min_side": args.min_side, "dtype": args.dtype}
    loaded = {}

    def pipeline():
        if not loaded:
            from .pipelines import OneStepSRPipeline

            pipe = load_pipeline(args.base, args.config, args.dtype, device, OneStepSRPipeline, "--base")
            loaded.update(pipe=pipe, method=pipe.load_sr_weights(args.weights))
        return loaded["pipe"], loaded["method"]

    def produce(item, path):
        image = read_image(item.source, "input")  # before the model: a bad file fails fast
        pipe, method = pipeline()
        generator = torch.Generator(device=device).manual_seed(item.spec["seed"])
        result = pipe(image, upscale=args.scale, prompt=args.prompt, lambda_pix=args.lambda_pix,
                      lambda_sem=args.lambda_sem, color_fix=args.color_fix, tile_size=args.tile,
                      min_side=args.min_side, generator=generator).images[0]
        params = {"input": item.source, "method": method, **settings, "seed": item.spec["seed"],
                  "job": job(item)}
        save_png(result, path, params, quiet=True)

    def job(item):
        return job_record(item.spec, settings)

    summary = run_job(items, args.out, produce, job, resume=args.resume, cpu=device == "cpu", what="upscale",
                      prepare=pipeline)
    return 1 if summary.failed else 0


def upscale_video(args):
    """Video SR: one input and an `--out` ending in .mp4 → that file; otherwise a batch job over the inputs (folders:
    their videos) → `--out`/<name>_x<scale>.mp4, resumable, split across processes under `accelerate launch`."""
    from .batch_jobs import VIDEO_SUFFIXES, file_items, job_record, run_job, video_job

    settings = {"method": "dloral", "weights": str(args.weights), "base": args.base, "config": args.config,
                "scale": args.scale,
                "stages": args.stages, "prompt": args.prompt, "color_fix": args.color_fix, "tile": args.tile,
                "min_side": args.min_side, "crf": args.crf, "dtype": args.dtype}
    single = len(args.inputs) == 1 and Path(args.out).suffix.lower() == ".mp4"
    if single and Path(args.inputs[0]).is_dir():
        raise ValueError(f"--out {args.out} is one .mp4 file, but the input {args.inputs[0]} is a folder; give an "
                         f"output folder.")
    if not single and Path(args.out).suffix.lower() in VIDEO_SUFFIXES:
        raise ValueError(f"--out must be an output folder for several inputs or a folder (got {args.out}); one input "
                         f"and an .mp4 name writes one file.")
    device = job_device(args.device)
    loaded = {}

    def pipeline():
        if not loaded:
            from .pipelines import VideoSRPipeline

            pipe = load_pipeline(args.base, args.config, args.dtype, device, VideoSRPipeline, "--base")
            pipe.load_sr_weights(args.weights)
            loaded["pipe"] = pipe
        return loaded["pipe"]

    def job(item):
        return job_record(item.spec, settings)

    def produce(item, path, quiet=True):
        import torch

        from .video_io import VideoReader, VideoWriter

        reader = VideoReader(item.source)  # before loading models: a bad input fails fast
        pipe = pipeline()
        params = {"input": item.source, **settings, "seed": item.spec["seed"], "fps": str(reader.fps),
                  "swiftstep": __version__, "job": job(item)}
        generator = torch.Generator().manual_seed(item.spec["seed"])
        with VideoWriter(path, reader.fps, crf=args.crf, audio_from=item.source if reader.has_audio else None,
                         metadata=params) as writer:
            for frame in pipe.stream(reader, upscale=args.scale, prompt=args.prompt, stages=args.stages,
                                     color_fix=args.color_fix, tile_size=args.tile, chunk_frames=args.chunk_frames,
                                     min_side=args.min_side, generator=generator):
                writer.write(frame)
        if not quiet:
            print(f"wrote {writer.frames} frames at {float(reader.fps):g} fps to {args.out}")

    if single:
        from .batch_jobs import Item, write_atomically

        item = Item(0, Path(args.out).name, str(args.inputs[0]), {"input": str(Path(args.inputs[0]).resolve()),
                                                                   "seed": args.seed})
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(out, lambda path: produce(item, path, quiet=False))
        return [out]
    items = file_items(args.inputs, VIDEO_SUFFIXES, lambda p: f"{p.stem}_x{args.scale}.mp4", args.seed, args.out)
    summary = run_job(items, args.out, produce, job, read_job=video_job, resume=args.resume, cpu=device == "cpu",
                      what="upscale-video", prepare=pipeline)
    return 1 if summary.failed else 0


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
        ns = build_parser().parse_args(["generate", "--model", str(folder), "--prompt", "a tiny random test image",
                                        "--preset", "sd-turbo", "--device", "cpu", "--out", args.out])
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
    g.add_argument("--prompt", help="the prompt (one image, or --num-images of it)")
    g.add_argument("--prompts", metavar="FILE", help="a batch job: one prompt a line, or JSON Lines (.jsonl: "
                   "prompt, negative_prompt, seed, height, width per line); writes --out-dir/00000.png, … with seed "
                   "--seed + index; under `accelerate launch` the lines are split across processes")
    g.add_argument("--out-dir", help="the output folder of a batch job: --prompts FILE, or --prompt with "
                   "--num-images N (files 00000.png …, seeds --seed + k)")
    g.add_argument("--negative-prompt", help="a negative prompt without CFG, inside the attention (--guidance)")
    g.add_argument("--guidance", choices=("nasa", "nag"), help="how the negative prompt acts (default: nasa on "
                   "SD/SDXL, nag on the DiTs)")
    g.add_argument("--nasa-scale", type=float, help="NASA α (default per model family)")
    g.add_argument("--nag-scale", type=float, help="NAG scale φ + 1 (default per model family)")
    g.add_argument("--nag-tau", type=float, help="NAG τ (default 2.5)")
    g.add_argument("--nag-alpha", type=float, help="NAG α (default per model family)")
    g.add_argument("--lora", action="append", type=lora_arg, default=[], metavar="FILE[:SCALE]",
                   help="a LoRA file and its strength (default 1); repeat for several")
    g.add_argument("--fast", action="store_true", help="SD/SDXL: the fast path (CUDA graphs, channels-last, "
                   "fused attention; parts that cannot run here are skipped with a log line)")
    g.add_argument("--preset", help="one of swiftstep.core.presets.PRESETS (default: inferred from the folder)")
    g.add_argument("--steps", type=int, help="number of steps (a count the preset supports)")
    g.add_argument("--timesteps", help="explicit comma-separated timesteps, e.g. 999,749,499,249 (flow DiTs: "
                   "1000·σ; SANA-Sprint: steps + 1 TrigFlow angles ending in 0)")
    g.add_argument("--gamma", type=float, help="TCD/CTM gamma sampling, 0 (deterministic) … 1 (full re-noise)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--height", type=int)
    g.add_argument("--width", type=int)
    g.add_argument("--num-images", type=int, default=1, help="images per prompt (batch job: per line, files "
                   "<line>_<k>.png)")
    g.add_argument("--image", help="image-to-image: start from this picture (SD-Turbo's card: --steps 2, strength 0.5)")
    g.add_argument("--strength", type=float, default=0.5,
                   help="with --image: the last ⌊steps·strength⌋ timesteps run on the picture")
    g.add_argument("--dtype", choices=DTYPES, default="float32")
    g.add_argument("--device", help="default: CUDA if present (under `accelerate launch`: this process's GPU), "
                   "else cpu")
    g.add_argument("--out", default="swiftstep.png", help="with --prompt: the output PNG")
    _job_options(g)
    g.set_defaults(func=generate)

    u = sub.add_parser("upscale", help="one-step ×4 super-resolution (OSEDiff / PiSA-SR weights)")
    u.add_argument("inputs", nargs="+", help="image files and folders of images (a batch job: resumable, split "
                   "across processes under `accelerate launch`)")
    u.add_argument("--base", required=True, help="SD2.1-base: diffusers folder, hub id, or single .safetensors")
    u.add_argument("--config", help="for a single-file base: a local diffusers folder of SD2.1-base (offline)")
    u.add_argument("--weights", required=True, help="osediff.pkl, pisa_sr.pkl or a swiftstep .safetensors export")
    u.add_argument("--scale", type=int, default=4)
    u.add_argument("--prompt", default="", help="OSEDiff text prompt (e.g. DAPE tags); PiSA-SR ignores it")
    u.add_argument("--lambda-pix", type=float, default=1.0, help="PiSA-SR pixel-fidelity strength")
    u.add_argument("--lambda-sem", type=float, default=1.0, help="PiSA-SR semantic-detail strength")
    u.add_argument("--color-fix", choices=("adain", "wavelet", "none"), default="adain")
    u.add_argument("--tile", type=int, help="latent tile size (default 96; tiles only when needed)")
    u.add_argument("--seed", type=int, default=0, help="seeds the VAE posterior sample (the same for every input)")
    u.add_argument("--min-side", type=int, default=512,
                   help="smaller inputs are first enlarged so the output's short side reaches this (official: 512)")
    u.add_argument("--dtype", choices=DTYPES, default="float32")
    u.add_argument("--device", help="default: CUDA if present (under `accelerate launch`: this process's GPU), "
                   "else cpu")
    _job_options(u)
    u.add_argument("--out", default="upscaled", help="output folder")
    u.set_defaults(func=upscale)

    v = sub.add_parser("upscale-video", help="one-step ×4 video super-resolution (DLoRAL weights)")
    v.add_argument("inputs", nargs="+", help="video files (anything FFmpeg reads) and folders of videos")
    v.add_argument("--out", required=True, help="one input: the output .mp4 (H.264; frame rate and audio of the input "
                   "kept); several inputs or a folder: the output folder (a batch job)")
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
    v.add_argument("--seed", type=int, default=0, help="seeds the VAE posterior samples (the same for every input)")
    v.add_argument("--crf", type=int, default=18, help="H.264 quality (lower is better; 18 ≈ visually lossless)")
    v.add_argument("--dtype", choices=DTYPES, default="float32")
    v.add_argument("--device", help="default: CUDA if present (under `accelerate launch`: this process's GPU), "
                   "else cpu")
    _job_options(v)
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


def _job_options(p) -> None:
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="batch jobs: skip outputs that exist, read back and carry this job's parameters (default on)")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        print(f"swiftstep: error: {e}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0  # a batch job with failed items: 1


if __name__ == "__main__":
    sys.exit(main())
