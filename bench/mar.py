"""MAR sampling time: DiSA step annealing vs MAR's constant head steps, same model, same seed.

    python bench/mar.py                                   # CPU: a narrow random MAR (256 tokens)
    python bench/mar.py --size full --device cuda         # MAR-B architecture (random weights), 256 tokens

Rows: MAR's 256×100 and 64×100 baselines (256×100 on --size full only), DiSA linear / cosine / two-stage 50→5 at
64 iterations, and on CUDA DiSA linear with the head replayed from CUDA graphs (`core.head_graph.GraphedHead`,
graphs captured in an untimed first run, as a pipeline does once); seconds per batch, head steps and the speed-up
over 64×100 (issue target: ≥ 10× with DiSA + graphs). Benchmarks are not tests.
"""

from __future__ import annotations

import torch
from harness import device_name, median_seconds, parser


def main():
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=4)
    args = p.parse_args()
    from swiftstep.core import disa
    from swiftstep.core.head_graph import GraphedHead
    from swiftstep.models.mar import MAR

    if args.size == "full":
        model = MAR.from_size("base")
    else:
        model = MAR(img_size=256, vae_stride=16, encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=4,
                    decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4, buffer_size=4, diffloss_d=3,
                    diffloss_w=128)
    model = model.to(args.device, getattr(torch, args.dtype)).eval()
    labels = torch.arange(args.batch, device=args.device) % 1000
    graphed = GraphedHead()

    def run(num_iter, steps, clip, graphs=False):
        g = torch.Generator().manual_seed(0)
        orders = torch.stack([torch.randperm(model.seq_len, generator=g) for _ in range(args.batch)]).to(args.device)

        def go():
            with torch.inference_mode():
                disa.sample_tokens(model, args.batch, labels, num_iter, 3.0, "linear", 1.0, steps, clip,
                                   lambda shape: torch.randn(shape, generator=g), orders,
                                   head=graphed if graphs else None)
        return go

    configs = [("MAR 64×100", 64, disa.step_schedule("constant", 64, 100, 100), None, False)]
    if args.size == "full":
        configs.insert(0, ("MAR 256×100", 256, disa.step_schedule("constant", 256, 100, 100), None, False))
    configs += [(f"DiSA {kind} 50→5 (64)", 64, disa.step_schedule(f"disa-{kind}", 64, 50, 5), disa.OFFICIAL_CLIP,
                 False) for kind in ("linear", "cosine", "two-stage")]
    if args.device.startswith("cuda"):
        configs += [("MAR 64×100 + graphs", 64, disa.step_schedule("constant", 64, 100, 100), None, True),
                    ("DiSA linear + graphs", 64, disa.step_schedule("disa-linear", 64, 50, 5), disa.OFFICIAL_CLIP,
                     True)]
    print(f"# MAR sampling, {args.size} model, batch {args.batch}, cfg 3.0, {device_name(args.device)}, {args.dtype}, "
          f"torch {torch.__version__}")
    print(f"{'sampler':<26}{'s':>9}{'head steps':>12}{'× 64×100':>10}")
    base = None
    for name, num_iter, steps, clip, graphs in configs:
        run(num_iter, steps, clip, graphs)()  # warm-up (and graph capture)
        n = sum(len(disa.HeadDiffusion(s, clip)) for s in steps)
        t = median_seconds(run(num_iter, steps, clip, graphs), args.device, max(1, args.repeats // 5))
        if num_iter == 64 and base is None:
            base = t
        print(f"{name:<26}{t:>9.2f}{n:>12}{(base / t if base else float('nan')):>10.2f}")


if __name__ == "__main__":
    main()
