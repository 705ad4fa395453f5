"""Video SR ×4 (DLoRAL): swiftstep `VideoSRPipeline` vs a straightforward port of the official procedure, same
weights, same clip, in one run.

    python bench/video_sr.py                                              # CPU: tiny models, 128² → 512², 6 frames
    python bench/video_sr.py --size full --device cuda --dtype float16    # random SD2.1 + CFR, 25 × 512² → 2048²

The port does what `src/test_DLoRAL.py` does per window (frame i−1, frame i): encode both frames, CFR with the
whole HW × HW attention per latent tile (96 / 32), the UNet with its six LoRAs unmerged (peft), x0 = f − ε, decode;
it outputs N − 1 frames (the official script never outputs frame 0). Ours encodes each frame once, bakes the LoRAs,
chunks the attention and outputs all N frames. Prints seconds per output frame and peak GPU memory for both, the
ratio, and our peak for 5 frames vs the whole clip (flat when memory does not grow with the clip).
Benchmarks are not tests: nothing here asserts a timing.
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
from pathlib import Path

import torch
from harness import device_name, parser

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's tests/ hold the fixtures


def main():
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=None, help="clip length (default 25 full, 6 tiny)")
    p.add_argument("--side", type=int, default=None, help="input frame side (default 512 full, 128 tiny; ≥ 128)")
    args = p.parse_args()
    from swiftstep.core import tiling
    from swiftstep.models.dloral import CrossFrameRetrieval
    from swiftstep.pipelines import VideoSRPipeline
    from swiftstep.tiny_models import build_components

    from tests.video_fixtures import make_dloral_pkl, official_unet_from_pkl, tiny_cfr, video_components

    full = args.size == "full"
    n = args.frames or (25 if full else 6)
    side = args.side or (512 if full else 128)
    dtype, device = getattr(torch, args.dtype), args.device
    if full:
        comps = {k: v for k, v in build_components("sd2", size="full").items() if not k.endswith("_2")}
        torch.manual_seed(0)
        cfr = CrossFrameRetrieval()  # the official 64 × 9 heads
    else:
        comps, cfr = video_components(), tiny_cfr()
    weights = Path(tempfile.mkdtemp()) / "model.pkl"
    sd = make_dloral_pkl(comps["unet"], cfr, weights)
    pipe = VideoSRPipeline(**{k: copy.deepcopy(v) if k == "unet" else v for k, v in comps.items()})
    pipe.load_sr_weights(weights)
    pipe = pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    clip = [torch.rand(3, side, side, generator=g) for _ in range(n)]

    # the straightforward port (modules of its own: unmerged UNet, CFR with unchunked attention)
    unet = official_unet_from_pkl(comps["unet"], sd, "full").to(device, dtype)
    ref_cfr = CrossFrameRetrieval.load_official(sd["state_dict_bpp"]).to(device, dtype)
    ref_cfr.attention_chunk = None
    vae, sf = pipe.vae, pipe.vae.config.scaling_factor

    def port():
        embeds = pipe._prompt_embeds("", device).to(dtype)
        outs = []
        for i in range(1, n):
            x = torch.cat([pipe.preprocess(clip[j], 4, 512) for j in (i - 1, i)]).to(device, dtype)
            lat = vae.encode(x).latent_dist.sample(g) * sf  # both frames, every window

            def window(lat8, img6):
                aligned, fused = ref_cfr(img6[:, :3], img6[:, 3:], lat8[:, :4], lat8[:, 4:])
                z = torch.cat([aligned, fused], 1)
                eps = unet(z, 1, encoder_hidden_states=embeds.expand(z.shape[0], -1, -1)).sample
                return fused - eps

            lat8 = lat.reshape(1, 8, *lat.shape[-2:])
            img6 = x.reshape(1, 6, *x.shape[-2:])
            x0 = tiling.tiled_apply(window, lat8, 96, 32, tiles_per_call=1, aligned=((img6, 8),))
            out = vae.decode(x0 / sf).sample.clamp(-1, 1)
            outs.append(((out.float() + 1) / 2).cpu())
        return outs

    def ours(frames):
        return list(pipe.stream(frames, generator=torch.Generator().manual_seed(0)))

    def measure(fn, *a):
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = fn(*a)
        if device == "cuda":
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
        return len(out), time.perf_counter() - t0, peak

    with torch.inference_mode():
        ours(clip[:2])  # warm-up
        port_n, port_s, port_mem = measure(port)
        ours_n, ours_s, ours_mem = measure(ours, clip)
        _, _, five_mem = measure(ours, clip[:5])
    print(f"# DLoRAL video SR ×4 ({args.size}, {n} × {side}² → {4 * side}²), {device_name(device)}, {args.dtype}, "
          f"torch {torch.__version__}")
    print(f"{'path':<40}{'frames out':>11}{'s/frame':>10}{'peak GiB':>10}")
    print(f"{'official procedure, straightforward port':<40}{port_n:>11}{port_s / port_n:>10.3f}{port_mem:>10.2f}")
    print(f"{'swiftstep VideoSRPipeline':<40}{ours_n:>11}{ours_s / ours_n:>10.3f}{ours_mem:>10.2f}")
    print(f"speed-up per frame {port_s / port_n / (ours_s / ours_n):.2f}×; our peak for 5 frames {five_mem:.2f} GiB "
          f"vs {n} frames {ours_mem:.2f} GiB")


if __name__ == "__main__":
    main()
