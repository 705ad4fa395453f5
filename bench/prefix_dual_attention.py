"""Shared-key dual attention (joint-attention DiT, negative prompt) vs two SDPA calls: time on a GPU, work everywhere.

    python bench/prefix_dual_attention.py                      # GPU: bf16 timings at FLUX shapes; CPU: counts only
    python bench/prefix_dual_attention.py --dtype float16

The image queries of a joint-attention block attend to [text±; image] keys; with a negative prompt the two attentions
share every image key. Two SDPA calls score q·K_imgᵀ and multiply P·V_img twice; the kernel
(`flash_attn_triton.prefix_dual_flash_attention`) keeps one softmax state over the image keys and merges it with each
prompt's text state, so each image-key product runs once.

On CUDA: one table of µs per call for two SDPA calls on keys already concatenated (the baseline, "× 2sdpa" = its time
over the row's), the exact fallback (concatenation + two SDPA calls), and the kernel returning (Z+, Z−) and
Z+ − α·Z−, with the max error relative to max |Z| against SDPA. Each call replays a CUDA graph (bench/attention.py's
`graphed`); one input set is > 50 MB, beyond H100's L2. Everywhere: the multiply-adds of both, counted by
construction and checked at a small size against torch.utils.flop_counter.FlopCounterMode on the reference (two
SDPA calls on the MATH backend, which the counter sees as bmm) and on the kernel's algorithm written in torch
(`attention_ref.prefix_dual_attention_merged`). Benchmarks are not tests: nothing here asserts a timing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from harness import device_name, median_seconds, parser

# (name, B, H, Lq = Limg, Lt+, Lt−, D): FLUX.1 at 1024² (64² latent patches, 24 heads of 128), T5 prompts of 512
# tokens, the negative one 512 (padded) or 77 tokens
SHAPES = [("FLUX 1024² 512/512", 1, 24, 4096, 512, 512, 128), ("FLUX 1024² 512/77", 1, 24, 4096, 512, 77, 128)]
CHECK = (1, 2, 24, 11, 6, 16)  # B, H, Lq = Limg, Lt+, Lt−, D for the FlopCounterMode check


def multiply_adds(b, h, lq, limg, lt_pos, lt_neg, d) -> dict:
    """Multiply-adds of the matrix products (each score q·k and each p·v term is D of them), and exponentials."""
    rows = b * h * lq
    return {
        # per prompt: q·[K_txt; K_img]ᵀ and P·[V_txt; V_img], over Lt± + Limg keys
        "two SDPA calls": rows * d * 2 * ((lt_pos + limg) + (lt_neg + limg)),
        # one q·K_imgᵀ, but P·V_img per prompt (two online-softmax states fed by one score tile)
        "shared scores only": rows * d * (limg + 2 * limg + 2 * (lt_pos + lt_neg)),
        # one q·K_imgᵀ and one P·V_img, merged with each prompt's text state (the kernel)
        "shared scores and P·V": rows * d * 2 * (limg + lt_pos + lt_neg),
    }, {"two SDPA calls": rows * (lt_pos + lt_neg + 2 * limg), "shared scores only": rows * (lt_pos + lt_neg + limg),
        "shared scores and P·V": rows * (lt_pos + lt_neg + limg)}


def counted_flops(fn) -> int:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def print_counts():
    from swiftstep.attention_kernels.attention_ref import prefix_dual_attention_merged, prefix_dual_attention_ref

    print(f"{'shape':<22}{'algorithm':<24}{'G multiply-adds':>16}{'× two SDPA':>12}{'M exp':>9}")
    for name, B, H, L, LP, LN, D in SHAPES:
        macs, exps = multiply_adds(B, H, L, L, LP, LN, D)
        for algo, n in macs.items():
            print(f"{name:<22}{algo:<24}{n / 1e9:>16.3f}{n / macs['two SDPA calls']:>12.4f}{exps[algo] / 1e6:>9.1f}")

    B, H, L, LP, LN, D = CHECK
    g = torch.Generator().manual_seed(0)
    q, ki, vi, kp, vp, kn, vn = (torch.randn(B, H, n, D, generator=g, dtype=torch.float64)
                                 for n in (L, L, L, LP, LP, LN, LN))
    mask = torch.rand(B, LP, generator=g) > 0.3
    macs, _ = multiply_adds(B, H, L, L, LP, LN, D)
    ref = counted_flops(lambda: prefix_dual_attention_ref(q, ki, vi, kp, vp, kn, vn, mask))
    ours = counted_flops(lambda: prefix_dual_attention_merged(q, ki, vi, kp, vp, kn, vn, mask))
    err = max((a - b).abs().max().item() for a, b in zip(prefix_dual_attention_merged(q, ki, vi, kp, vp, kn, vn, mask),
                                                          prefix_dual_attention_ref(q, ki, vi, kp, vp, kn, vn, mask)))
    print(f"\n# FlopCounterMode at B{B} H{H} Lq=Limg={L} Lt {LP}/{LN} D{D} (FLOPs = 2 × multiply-adds)")
    for algo, flops, key in (("two SDPA calls (reference)", ref, "two SDPA calls"),
                             ("merged states (kernel's algorithm)", ours, "shared scores and P·V")):
        print(f"{algo:<36} counted {flops:>8}  by construction {2 * macs[key]:>8}  "
              f"{'equal' if flops == 2 * macs[key] else 'DIFFERENT'}")
    print(f"merged states vs reference, float64: max |Δ| = {err:.1e}")

def print_timings(device: str, dtype: torch.dtype, repeats: int, shapes):
    """The timing table (CUDA; on the CPU interpreter only a dry run of this code at tiny shapes)."""
    from attention import graphed  # bench/attention.py

    from swiftstep.attention_kernels import flash_attn_triton as fk
    from swiftstep.attention_kernels.attention_ref import prefix_dual_attention_ref

    print(f"\n{'shape':<22}{'provider':<26}{'µs':>10}{'× 2sdpa':>9}{'rel err':>10}")
    for name, B, H, L, LP, LN, D in shapes:
        g = torch.Generator().manual_seed(0)
        q, ki, vi, kp, vp, kn, vn = (torch.randn(B, H, n, D, generator=g).to(device, dtype)
                                     for n in (L, L, L, LP, LP, LN, LN))
        kcp, vcp = torch.cat([kp, ki], 2), torch.cat([vp, vi], 2)  # [B, H, Lt+ + Limg, D]
        kcn, vcn = torch.cat([kn, ki], 2), torch.cat([vn, vi], 2)
        alpha = 0.5

        def two_sdpa(_):
            return F.scaled_dot_product_attention(q, kcp, vcp), F.scaled_dot_product_attention(q, kcn, vcn)

        ref = two_sdpa(0)
        ref_nasa = torch.sub(*ref, alpha=alpha)
        scale = max(r.float().abs().max().item() for r in ref)

        def row(provider, fn, out, want):
            t = median_seconds(graphed(fn, device, 1), device, repeats)
            outs, wants = (out, want) if isinstance(out, tuple) else ((out,), (want,))
            err = max((o.float() - w.float()).abs().max().item() for o, w in zip(outs, wants)) / scale
            print(f"{name:<22}{provider:<26}{t * 1e6:>10.1f}{base[0] / t if base else 1.0:>9.2f}{err:>10.1e}")
            return t

        base = []
        base.append(row("2×sdpa (keys concat.)", two_sdpa, ref, ref))
        row("fallback: cat + 2×sdpa", lambda _: prefix_dual_attention_ref(q, ki, vi, kp, vp, kn, vn), ref, ref)
        row("triton (Z+, Z−)", lambda _: fk.prefix_dual_flash_attention(q, ki, vi, kp, vp, kn, vn),
            fk.prefix_dual_flash_attention(q, ki, vi, kp, vp, kn, vn), ref)
        row("triton Z+ − αZ−", lambda _: fk.prefix_dual_flash_attention(q, ki, vi, kp, vp, kn, vn, alpha=alpha),
            fk.prefix_dual_flash_attention(q, ki, vi, kp, vp, kn, vn, alpha=alpha), ref_nasa)


def main():
    p = parser(__doc__.split("\n")[0])
    if torch.cuda.is_available():
        p.set_defaults(dtype="bfloat16")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"# shared-key dual attention, {device_name(args.device)}, {args.dtype}, torch {torch.__version__}")
    print_counts()
    if args.device != "cuda":
        print("\n(no timings: the kernel is timed on CUDA only; the interpreter's CPU speed means nothing)")
        return
    print_timings(args.device, dtype, args.repeats, SHAPES)


if __name__ == "__main__":
    main()
