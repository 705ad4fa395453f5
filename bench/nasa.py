"""NASA / NAG overhead: one UNet step with a negative prompt vs the plain step, and vs CFG (the batch-2 step).

    python bench/nasa.py                                   # CPU, tiny SD2 UNet
    python bench/nasa.py --size full --device cuda --dtype float16   # full-size random-weight SD2.1 UNet, 512²

Prints one table: median ms per UNet call and the ratio to the plain call. Target (SNOOPI): NASA ≤ 1.05× the plain
step, against ≈ 2× for CFG. Benchmarks are not tests: nothing here asserts a timing.
"""

from __future__ import annotations

import torch
from harness import device_name, median_seconds, parser


def main():
    from swiftstep.pipelines.nasa_processor import nasa_attention
    from swiftstep.tiny_models import build_components

    args = parser(__doc__.split("\n")[0]).parse_args()
    dtype = getattr(torch, args.dtype)

    unet = build_components("sd2", size=args.size)["unet"].to(args.device, dtype)
    g = torch.Generator().manual_seed(0)
    side = unet.config.sample_size
    ctx_dim = unet.config.cross_attention_dim
    x = torch.randn(1, 4, side, side, generator=g).to(args.device, dtype)
    pos = torch.randn(1, 77, ctx_dim, generator=g).to(args.device, dtype)
    neg = torch.randn(1, 77, ctx_dim, generator=g).to(args.device, dtype)
    t = torch.tensor([999], device=args.device)

    @torch.inference_mode()
    def plain():
        return unet(x, t, encoder_hidden_states=pos).sample

    @torch.inference_mode()
    def cfg():
        return unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([neg, pos])).sample

    rows = [("plain step", median_seconds(plain, args.device, args.repeats)),
            ("CFG (batch 2)", median_seconds(cfg, args.device, args.repeats))]
    for mode in ("nasa", "nag"):
        with nasa_attention(unet, neg, mode=mode, alpha=0.2):
            rows.append((f"{mode.upper()} (one pass)", median_seconds(plain, args.device, args.repeats)))

    dev = device_name(args.device)
    print(f"# negative-prompt overhead, SD2.1-arch UNet ({args.size}, {side * 8}² px), {dev}, {args.dtype}, "
          f"torch {torch.__version__}")
    print(f"{'path':<18}{'ms':>10}{'× plain':>10}")
    for name, seconds in rows:
        print(f"{name:<18}{seconds * 1e3:>10.2f}{seconds / rows[0][1]:>10.3f}")


if __name__ == "__main__":
    main()
