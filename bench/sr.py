"""One-step SR ×4: swiftstep `OneStepSRPipeline` vs the straightforward diffusers + peft rendering of the official
PiSA-SR procedure (adapters unmerged, ε_pix+sem and ε_pix as two adapter settings), same weights, same seed.

    python bench/sr.py                                              # CPU: tiny SD2.1-shaped model, 64² → 256²
    python bench/sr.py --size full --device cuda --dtype float16    # full-size random SD2.1, 512² → 2048²

Prints seconds and peak memory per path and the ratio, and the max difference between the two outputs.
Benchmarks are not tests: nothing here asserts a timing.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch
from harness import device_name, parser

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's tests/ hold the official procedure


def main():
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--lambda-sem", type=float, default=0.8, help="≠ 1 exercises the adjustable (two-pass) mode")
    args = p.parse_args()
    from swiftstep.pipelines.pipeline_sr import OneStepSRPipeline
    from swiftstep.tiny_models import build_components

    from tests.sr_fixtures import make_pisa_pkl, official_sr

    dtype = getattr(torch, args.dtype)
    components = build_components("sd2", size=args.size)
    lq_side = 512 if args.size == "full" else 64
    weights = Path(tempfile.mkdtemp()) / "pisa_sr.pkl"
    sd = make_pisa_pkl(components["unet"], weights)
    sd2 = {k: v for k, v in build_components("sd2", size=args.size).items() if not k.endswith("_2")}
    pipe = OneStepSRPipeline(**sd2).to(args.device, dtype)
    pipe.load_sr_weights(weights)
    pipe.set_progress_bar_config(disable=True)
    for name in ("vae", "unet", "text_encoder"):
        components[name].to(args.device, dtype)
    lq = torch.rand(3, lq_side, lq_side, generator=torch.Generator().manual_seed(0))

    def measure(fn):
        if args.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = fn()
        if args.device == "cuda":
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else float("nan")
        return out, time.perf_counter() - t0, peak

    def ours():
        # untiled like the reference (tile ≥ latent), so both compute the same image
        return pipe(lq, lambda_sem=args.lambda_sem, min_side=4 * lq_side, tile_size=4 * lq_side,
                    generator=torch.Generator().manual_seed(1), output_type="pt").images

    def reference():
        x = pipe.preprocess(lq, 4, 4 * lq_side).to(args.device, dtype)
        embeds = pipe._prompt_embeds("", args.device).to(dtype)
        return official_sr(components, sd, "pisa-sr", x, torch.Generator().manual_seed(1), (1.0, args.lambda_sem),
                           embeds)

    with torch.inference_mode():
        ours()  # warm-up
        (a, t_ours, m_ours), (b, t_ref, m_ref) = measure(ours), measure(reference)
    print(f"# one-step SR ×4 ({args.size}, {lq_side}² → {4 * lq_side}²), {device_name(args.device)}, {args.dtype}, "
          f"torch {torch.__version__}")
    print(f"{'path':<34}{'s':>9}{'peak GiB':>10}")
    print(f"{'swiftstep OneStepSRPipeline':<34}{t_ours:>9.3f}{m_ours:>10.2f}")
    print(f"{'diffusers+peft official procedure':<34}{t_ref:>9.3f}{m_ref:>10.2f}")
    print(f"speed-up {t_ref / t_ours:.2f}×, max |Δ| {(a.float().cpu() - b.float().cpu()).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
