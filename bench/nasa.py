"""NASA / NAG overhead: one UNet step with a negative prompt vs the plain step, and vs CFG (the batch-2 step); and
for joint-attention DiTs, multiply-adds per step of a FLUX.1-architecture stack.

    python bench/nasa.py                                   # CPU, tiny SD2 UNet + the FLUX.1 count
    python bench/nasa.py --size full --device cuda --dtype float16   # full-size random-weight SD2.1 UNet, 512²
    python bench/nasa.py --what dit                        # the FLUX.1 count only (seconds, any machine)

UNet table: median ms per UNet call and the ratio to the plain call. Target (SNOOPI): NASA ≤ 1.05× the plain step,
against ≈ 2× for CFG.

DiT table: multiply-adds per denoising step of the real diffusers FluxTransformer2DModel in its FLUX.1 configuration
(19 double + 38 single blocks, width 3072 = 24 heads × 128, 512 text tokens, 4096 image tokens = 1024² px), built on
the `meta` device and counted exactly by `torch.utils.flop_counter.FlopCounterMode` (matmuls and attention: every
Linear and both attention products; element-wise work — norms, RoPE, softmax, the NAG mix — is not counted). Rows:
the plain step; CFG / a second batch (ComfyUI core's NAGuidance route); the official NAG route (nasa_joint's
"official" construction with two full attentions per block — the official code's multiply-adds); ours ("shared"
construction) with the exact SDPA path (image keys scored twice) and with the shared-key kernel
(`attention_kernels.prefix_dual_attention`: image keys scored once, counted through its torch twin
`attention_ref.prefix_dual_attention_merged`, which performs the kernel's products). Issue 17's target: ours ≤ 1.15×.
Benchmarks are not tests: nothing here asserts a timing or a count.
"""

from __future__ import annotations

import contextlib

import torch
from harness import device_name, median_seconds, parser

FLUX1 = dict(image_tokens=4096, text_tokens=512)  # 1024² px: 128² latents, 2×2 patches; T5 at 512 tokens


def main():
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--what", choices=("unet", "dit", "all"), default="all")
    args = p.parse_args()
    if args.what in ("unet", "all"):
        unet_rows(args)
    if args.what in ("dit", "all"):
        dit_rows()


def unet_rows(args):
    from swiftstep.pipelines.nasa_processor import nasa_attention
    from swiftstep.tiny_models import build_components

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


@contextlib.contextmanager
def shared_key_kernel_products():
    """`attention_kernels.prefix_dual_attention` replaced by its torch twin that performs the kernel's products
    (Q·K_imgᵀ and P·V_img once, each text prefix once); outside it, on the meta device, dispatch runs the exact SDPA
    path (two attention calls over the concatenated keys)."""
    from swiftstep import attention_kernels
    from swiftstep.attention_kernels import attention_ref

    original = attention_kernels.prefix_dual_attention
    attention_kernels.prefix_dual_attention = attention_ref.prefix_dual_attention_merged
    try:
        yield
    finally:
        attention_kernels.prefix_dual_attention = original


def dit_rows():
    from diffusers import FluxTransformer2DModel
    from torch.utils.flop_counter import FlopCounterMode

    from swiftstep.core.nasa import NegativeGuidance
    from swiftstep.pipelines.nasa_joint import apply_joint_guidance

    n, t = FLUX1["image_tokens"], FLUX1["text_tokens"]
    with torch.device("meta"):
        model = FluxTransformer2DModel().eval()  # the FLUX.1 defaults: 19 + 38 blocks, 24 × 128, context 4096
    c = model.config

    def empty(*shape):
        return torch.empty(*shape, device="meta")

    def batch(b):
        return dict(hidden_states=empty(b, n, c.in_channels), pooled_projections=empty(b, c.pooled_projection_dim),
                    encoder_hidden_states=empty(b, t, c.joint_attention_dim), timestep=torch.ones(b, device="meta"),
                    img_ids=torch.zeros(n, 3, device="meta"), txt_ids=torch.zeros(t, 3, device="meta"))

    neg = (empty(1, t, c.joint_attention_dim), empty(1, c.pooled_projection_dim))
    nag = NegativeGuidance.checked("nag", nag_scale=5.0, nag_tau=2.5, nag_alpha=0.25, nag_norm=2)

    def count(x, construction=None):
        """(total, attention) multiply-adds of one transformer call; attention = all but the Linear layers."""
        handle = apply_joint_guidance(model, nag, construction).set_negative(*neg) if construction else None
        try:
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                model(**x)
        finally:
            if handle is not None:
                handle.remove()
        ops = {str(op): f for op, f in counter.get_flop_counts()["Global"].items()}
        linear = sum(f for op, f in ops.items() if op.split(".")[-1] in ("addmm", "mm", "linear"))
        total = counter.get_total_flops()
        return total / 2, (total - linear) / 2  # FLOPs count a multiply-add as 2

    rows = [("plain step", *count(batch(1))),
            ("CFG / second batch (B = 2)", *count(batch(2))),
            ("official NAG route", *count(batch(1), "official")),
            ("ours, shared, exact SDPA path", *count(batch(1), "shared"))]
    with shared_key_kernel_products():
        rows.append(("ours, shared, shared-key kernel", *count(batch(1), "shared")))
        rows.append(("(official + shared-key kernel)", *count(batch(1), "official")))
    print(f"# multiply-adds per step, FLUX.1 architecture ({c.num_layers} double + {c.num_single_layers} single "
          f"blocks, {c.num_attention_heads}×{c.attention_head_dim}), {n} image + {t} text tokens (1024²), batch 1, "
          f"counted on meta by torch {torch.__version__} FlopCounterMode")
    print(f"{'path':<34}{'TMAC':>9}{'attn TMAC':>11}{'× plain':>9}")
    for name, total, attention in rows:
        print(f"{name:<34}{total / 1e12:>9.3f}{attention / 1e12:>11.3f}{total / rows[0][1]:>9.3f}")


if __name__ == "__main__":
    main()
