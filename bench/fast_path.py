"""One-step text-to-image end to end: the stock diffusers pipeline vs OneStepPipeline with the fast path, in one run.

    python bench/fast_path.py                                              # CPU: tiny models (a smoke run)
    python bench/fast_path.py --size full --device cuda --dtype float16    # SD2.1 512² and SDXL 1024², random weights

Rows per model and batch size (1 and 8): the stock pipeline (StableDiffusionPipeline / StableDiffusionXLPipeline,
Euler trailing, 1 step, no CFG — the SD-Turbo / SDXL-Turbo recipes), OneStepPipeline plain, and OneStepPipeline
with `enable_fast_path()` (CUDA graphs, channels-last, kernel attention, cached prompt) and with the TAESD-
architecture tiny decoder as well. Latency is prompt in → image tensor out (median), images/s = batch / latency,
"× stock" the speed-up; "max |Δ|" compares with the stock images (the tiny decoder is an approximation). After the
batch-1 rows, each component alone (text encoders, one UNet call, VAE decode; eager) says what dominates.
Issue targets on an H100: SD2.1 512² batch 1 ≤ 15 ms (≥ 4.5× stock), SDXL 1024² batch 1 ≤ 60 ms.
Benchmarks are not tests: nothing here asserts a timing.
"""

from __future__ import annotations

import torch
from harness import device_name, median_seconds, parser


def main():
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--families", default="sd2,sdxl", help="which of sd2, sdxl to run")
    p.add_argument("--batches", default="1,8", help="batch sizes")
    args = p.parse_args()
    from diffusers import (AutoencoderTiny, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                           StableDiffusionPipeline, StableDiffusionXLPipeline)

    from swiftstep.pipelines import OneStepPipeline
    from swiftstep.tiny_models import build_components

    dtype, device = getattr(torch, args.dtype), args.device
    full = args.size == "full"
    print(f"# one-step T2I end to end, {args.size}, {device_name(device)}, {args.dtype}, torch {torch.__version__}")
    print(f"{'model':<14}{'batch':>6}  {'path':<28}{'ms':>9}{'img/s':>9}{'× stock':>9}{'max |Δ|':>10}")
    for family, preset, side in (("sd2", "sd-turbo", 512), ("sdxl", "sdxl-turbo", 1024)):
        if family not in args.families.split(","):
            continue
        comps = build_components(family, size=args.size)
        side = side if full else comps["unet"].config.sample_size * 2
        if family == "sd2":
            sched = EulerDiscreteScheduler.from_config(comps["scheduler"].config, timestep_spacing="trailing")
            stock = StableDiffusionPipeline(vae=comps["vae"], text_encoder=comps["text_encoder"],
                                            tokenizer=comps["tokenizer"], unet=comps["unet"], scheduler=sched,
                                            safety_checker=None, feature_extractor=None,
                                            requires_safety_checker=False)
        else:
            sched = EulerAncestralDiscreteScheduler.from_config(comps["scheduler"].config, timestep_spacing="trailing")
            stock = StableDiffusionXLPipeline(**{k: comps[k] for k in ("vae", "text_encoder", "text_encoder_2",
                                                                       "tokenizer", "tokenizer_2", "unet")},
                                              scheduler=sched)
        stock = stock.to(device, dtype)
        ours = OneStepPipeline(**{k: v for k, v in comps.items() if v is not None or not k.endswith("_2")},
                               preset=preset).to(device, dtype)
        for p in (stock, ours):
            p.set_progress_bar_config(disable=True)
        torch.manual_seed(0)
        levels = len(comps["vae"].config.block_out_channels)  # the TAESD architecture (random weights) at the VAE's
        tiny = AutoencoderTiny(latent_channels=4, encoder_block_out_channels=(64,) * levels,  # factor (×8 full size)
                               decoder_block_out_channels=(64,) * levels, num_encoder_blocks=(1, 3, 3, 3)[:levels],
                               num_decoder_blocks=(3, 3, 3, 1)[-levels:])
        for batch in (int(b) for b in args.batches.split(",")):
            prompts = [f"a photo of a red fox #{i}" for i in range(batch)]

            def gens():
                return [torch.Generator().manual_seed(i) for i in range(batch)]

            def stock_call():
                return stock(prompts, num_inference_steps=1, guidance_scale=0.0, height=side, width=side,
                             generator=gens(), output_type="pt").images

            def ours_call():
                return ours(prompts, height=side, width=side, generator=gens(), output_type="pt").images

            reps = max(1, args.repeats // (4 if batch > 1 else 1))
            with torch.inference_mode():
                ref = stock_call()
                t_stock = median_seconds(stock_call, device, reps)
                rows = [("diffusers stock", t_stock, ref)]
                rows.append(("swiftstep plain", median_seconds(ours_call, device, reps), ours_call()))
                fast = ours.enable_fast_path()
                rows.append((f"fast ({'+'.join(a[:5] for a in fast.active)})", median_seconds(ours_call, device, reps),
                             ours_call()))
                ours.enable_fast_path(tiny_vae=tiny)
                rows.append(("fast + tiny decoder", median_seconds(ours_call, device, reps), ours_call()))
                ours.disable_fast_path()
            for name, t, out in rows:
                diff = (out.float().cpu() - ref.float().cpu()).abs().max().item()
                print(f"{family.upper() + f' {side}²':<14}{batch:>6}  {name:<28}{t * 1e3:>9.1f}{batch / t:>9.1f}"
                      f"{t_stock / t:>9.2f}{diff:>10.1e}")
            if batch == 1:  # what is left to speed up: each component alone, eager (the issue asks which dominates)
                with torch.inference_mode():
                    embeds, pooled = ours.encode_prompt(prompts)
                    lat = torch.randn(1, 4, side // ours.vae_scale_factor, side // ours.vae_scale_factor,
                                      device=device, dtype=dtype)
                    extra = None
                    if family == "sdxl":
                        extra = {"text_embeds": pooled, "time_ids": ours._add_time_ids((side, side), (0, 0),
                                 (side, side), 1, device, dtype)}
                    t_text = median_seconds(lambda: ours.encode_prompt(prompts), device, reps)
                    t_unet = median_seconds(lambda: ours.unet(lat, 999, encoder_hidden_states=embeds,
                                                              added_cond_kwargs=extra), device, reps)
                    t_vae = median_seconds(lambda: ours.decode_latents(lat), device, reps)
                print(f"{'':<14}{'':>6}  components (eager): text encoders {t_text * 1e3:.1f} ms, UNet "
                      f"{t_unet * 1e3:.1f} ms, VAE decode {t_vae * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
