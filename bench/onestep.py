"""One-step latency: swiftstep `OneStepPipeline` vs the stock diffusers pipeline, same weights, same seed, same image.

    python bench/onestep.py                      # CPU: tiny SD2 / SDXL models
    python bench/onestep.py --size full --device cuda --dtype float16   # full-size random-weight SD2.1 / SDXL

Prints one table (median wall time per image, end to end incl. text encoding and VAE decode) with ours/stock as a
ratio, and the max pixel difference between the two images. Benchmarks are not tests: nothing here asserts a timing.
"""

from __future__ import annotations

import torch
from harness import device_name, median_seconds, parser


def run(family: str, preset: str, size: str, device: str, dtype: torch.dtype, repeats: int, resolution: int | None):
    from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, StableDiffusionPipeline
    from diffusers import StableDiffusionXLPipeline

    from swiftstep.pipelines import OneStepPipeline
    from swiftstep.tiny_models import build_components

    c = build_components(family, size=size)
    ours = OneStepPipeline(**c).to(device, dtype)
    ours.set_progress_bar_config(disable=True)
    cfg = c["scheduler"].config
    if family == "sdxl":
        sched = EulerAncestralDiscreteScheduler.from_config(cfg, timestep_spacing="trailing")
        stock = StableDiffusionXLPipeline(vae=ours.vae, text_encoder=ours.text_encoder,
                                          text_encoder_2=ours.text_encoder_2, tokenizer=ours.tokenizer,
                                          tokenizer_2=ours.tokenizer_2, unet=ours.unet, scheduler=sched)
    else:
        sched = EulerDiscreteScheduler.from_config(cfg, timestep_spacing="trailing")
        stock = StableDiffusionPipeline(vae=ours.vae, text_encoder=ours.text_encoder, tokenizer=ours.tokenizer,
                                        unet=ours.unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                                        requires_safety_checker=False)
    stock.set_progress_bar_config(disable=True)
    px = resolution or c["unet"].config.sample_size * ours.vae_scale_factor
    prompt = "a photo of a red fox in the snow"

    def g():
        return torch.Generator(device=device).manual_seed(0)

    def run_ours():
        return ours(prompt, preset=preset, height=px, width=px, generator=g(), output_type="pt").images

    def run_stock():
        return stock(prompt, num_inference_steps=1, guidance_scale=0.0, height=px, width=px, generator=g(),
                     output_type="pt").images

    with torch.inference_mode():
        diff = (run_ours().float() - run_stock().float()).abs().max().item()
        t_ours, t_stock = median_seconds(run_ours, device, repeats), median_seconds(run_stock, device, repeats)
    return px, t_ours, t_stock, diff


def main():
    args = parser(__doc__.split("\n")[0]).parse_args()
    dtype = getattr(torch, args.dtype)
    dev = device_name(args.device)
    print(f"# one-step latency, {args.size} random-weight models, {dev}, {args.dtype}, torch {torch.__version__}")
    print(f"{'model':<22}{'res':>6}{'ours ms':>10}{'stock ms':>10}{'ours/stock':>12}{'max |Δpx|':>12}")
    for family, preset, label in (("sd2", "sd-turbo", "SD2.1-arch sd-turbo"), ("sdxl", "sdxl-turbo", "SDXL-arch sdxl-turbo")):
        px, t_o, t_s, diff = run(family, preset, args.size, args.device, dtype, args.repeats,
                                 1024 if family == "sdxl" and args.size == "full" else None)
        print(f"{label:<22}{px:>6}{t_o * 1e3:>10.2f}{t_s * 1e3:>10.2f}{t_o / t_s:>12.3f}{diff:>12.2e}")


if __name__ == "__main__":
    main()
