"""VideoSRPipeline (DLoRAL) on tiny SD2.1-shaped models with weights in the official model.pkl layout.

The reference is the DLoRAL procedure written from its equations in float64 (flow warp as explicit bilinear
sampling, the whole HW × HW absolute attention, the UNet with the six LoRAs unmerged as the official script runs
them). The released code itself was run against this pipeline outside the test suite (docs/video-super-resolution.md)."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from swiftstep.models.dloral import CrossFrameRetrieval
from swiftstep.pipelines import OneStepSRPipeline, VideoSRPipeline

from ..memory import LiveBytes
from ..sr_fixtures import make_osediff_pkl
from ..video_fixtures import (make_dloral_pkl, official_unet_from_pkl, ref_cross_frame_attention, ref_flow_warp,
                              tiny_cfr, video_components)


def clip(n=3, h=128, w=136, seed=0):
    """n low-quality frames [3, h, w] in [0, 1]: one scene drifting by a pixel per frame, plus noise."""
    g = torch.Generator().manual_seed(seed)
    scene = F.interpolate(torch.rand(1, 3, h // 4, w // 4 + n, generator=g), size=(h, w + 4 * n), mode="bilinear")[0]
    return [(scene[:, :, i:i + w] + 0.03 * torch.randn(3, h, w, generator=g)).clamp(0, 1) for i in range(n)]


@pytest.fixture(scope="module")
def comps():
    return video_components()


@pytest.fixture(scope="module")
def pkl(comps, tmp_path_factory):
    path = tmp_path_factory.mktemp("dloral") / "model.pkl"
    return path, make_dloral_pkl(comps["unet"], tiny_cfr(), path, rank_q=4, rank_c=2, seed=1)


def make_pipe(comps, path):
    pipe = VideoSRPipeline(**{k: copy.deepcopy(v) if k in ("unet", "vae") else v for k, v in comps.items()})
    pipe.set_progress_bar_config(disable=True)
    pipe.load_sr_weights(path)
    return pipe


@pytest.fixture(scope="module")
def pipe(comps, pkl):
    return make_pipe(comps, pkl[0])


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def reference(comps, sd, pipe, frames, seed, stages="full", prompt=""):
    """Float64 DLoRAL per window (frame i−1, frame i); frame 0 paired with itself. Posterior noise: one draw of
    [1, 4, h, w] per frame from the seed, in frame order (the pipeline's documented order)."""
    vae = copy.deepcopy(comps["vae"]).double()
    unet = official_unet_from_pkl(comps["unet"], sd, stages).double()
    cfr = CrossFrameRetrieval.load_official(sd["state_dict_bpp"]).double()
    sf = vae.config.scaling_factor
    g = gen(seed)
    with torch.no_grad():
        embeds = pipe._prompt_embeds(prompt, "cpu").double()
        xs = [pipe.preprocess(f, 4, 512).double() for f in frames]
        lats = []
        for x in xs:
            dist = vae.encode(x).latent_dist
            noise = torch.randn(dist.mean.shape, generator=g, dtype=torch.float32).double()
            lats.append((dist.mean + dist.std * noise) * sf)
        outs = []
        for i in range(len(xs)):
            p = max(i - 1, 0)
            small = F.interpolate(torch.cat([xs[p], xs[i]]), scale_factor=0.125, mode="bicubic")
            flow = cfr.spynet(small[1:], small[:1])
            aligned = ref_flow_warp(lats[p], flow.permute(0, 2, 3, 1))
            fused = ref_cross_frame_attention(cfr.cross_attn_module, lats[i], aligned)
            eps = unet(torch.cat([aligned, fused], 1), 1, encoder_hidden_states=embeds).sample
            out = vae.decode((fused - eps) / sf).sample.clamp(-1, 1)
            outs.append(((out + 1) / 2)[0])
    return torch.stack(outs)


@pytest.mark.parametrize("stages", ["full", "consistency"])
def test_every_frame_equals_the_dloral_procedure(comps, pkl, pipe, stages):
    frames = clip(3)
    out = pipe(frames, prompt="a street", stages=stages, color_fix="none", generator=gen(4), output_type="pt").images
    ref = reference(comps, pkl[1], pipe, frames, 4, stages, prompt="a street")
    assert out.shape == (3, 3, 512, 544) and out.dtype == torch.float32
    err = (out.double() - ref).abs().max().item()
    assert err <= 1e-4, err
    assert (ref[1] - ref[0]).abs().mean() > 1e-3  # frames differ: a stale or repeated frame would fail


def test_stages_differ_and_switching_back_restores_the_weights(pipe):
    frames = clip(2)
    full = pipe(frames, color_fix="none", generator=gen(1), output_type="pt").images
    cons = pipe(frames, stages="consistency", color_fix="none", generator=gen(1), output_type="pt").images
    again = pipe(frames, stages="full", color_fix="none", generator=gen(1), output_type="pt").images
    assert (full - cons).abs().max() > 1e-3
    torch.testing.assert_close(again, full, rtol=0, atol=1e-5)


def test_seeds_chunks_and_input_forms(pipe):
    frames = clip(4, 120, 128)
    one = pipe(frames, generator=gen(2), output_type="pt").images
    assert one.shape == (4, 3, 480, 512)  # min_side raised 120 px to 128 for the model, then back to 4 × input
    torch.testing.assert_close(pipe(frames, chunk_frames=3, generator=gen(2), output_type="pt").images, one,
                               rtol=0, atol=1e-4)  # batching windows changes nothing (one posterior draw per frame)
    stacked = torch.stack(frames)
    torch.testing.assert_close(pipe(stacked, generator=gen(2), output_type="pt").images, one, rtol=0, atol=1e-6)
    torch.testing.assert_close(pipe(iter(frames), generator=gen(2), output_type="pt").images, one, rtol=0, atol=1e-6)
    pil = [Image.fromarray((f.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for f in frames]
    uint8 = np.stack([np.asarray(p) for p in pil])
    a = pipe(list(uint8), generator=gen(2), output_type="np").images
    b = pipe(uint8, generator=gen(2), output_type="np").images  # [N, H, W, C] uint8: N frames
    assert a.shape == (4, 480, 512, 3) and np.abs(a - b).max() < 1e-6
    assert pipe(pil, generator=gen(2), output_type="np").images.shape == (4, 480, 512, 3)
    assert not torch.equal(pipe(frames, generator=gen(3), output_type="pt").images, one)
    images = pipe(frames[:2], generator=gen(2)).images
    assert len(images) == 2 and images[0].size == (512, 480)


def test_progress_callback_and_interrupt(pipe):
    seen = []
    pipe(clip(3), generator=gen(0), output_type="pt", callback_on_frame=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]

    def stop(done, total):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pipe(clip(3), generator=gen(0), callback_on_frame=stop)


def test_tiles_run_the_cfr_and_unet_per_tile(pipe):
    frames = clip(2, 128, 160)  # latent 64 × 80
    untiled = pipe(frames, generator=gen(0), output_type="pt").images
    same = pipe(frames, tile_size=96, generator=gen(0), output_type="pt").images
    torch.testing.assert_close(same, untiled, rtol=0, atol=0)  # fits one tile: untiled
    tiled = pipe(frames, tile_size=64, tile_overlap=16, generator=gen(0), output_type="pt").images
    assert tiled.shape == untiled.shape and torch.isfinite(tiled).all()
    assert 0 < (tiled - untiled).abs().mean() < 0.1
    with pytest.raises(ValueError, match="`tile_size` must be at least 64 latent px"):
        pipe(frames, tile_size=48)


def test_weights_export_round_trip(comps, pkl, pipe, tmp_path):
    path = pipe.save_sr_weights(tmp_path / "dloral.safetensors")
    again = make_pipe(comps, path)
    frames = clip(2)
    torch.testing.assert_close(again(frames, generator=gen(0), output_type="pt").images,
                               pipe(frames, generator=gen(0), output_type="pt").images, rtol=0, atol=0)


def test_bad_input_is_a_clear_error(comps, pkl, pipe, tmp_path):
    with pytest.raises(ValueError, match="a video needs at least 2 frames, got 1; for a single image use "
                                         "OneStepSRPipeline"):
        pipe(clip(1))
    frames = clip(2) + [torch.rand(3, 128, 128)]
    with pytest.raises(ValueError, match=r"all frames must have one size: frame 2 is 128×128, frame 0 is 136×128"):
        pipe(frames)
    with pytest.raises(ValueError, match=r"needs \(upscaled\) frames of at least 512×512 px.*got 128×128"):
        pipe([torch.rand(3, 32, 32)] * 2, min_side=128)
    with pytest.raises(ValueError, match=r"`frames\[1\]` is empty: expected an image of at least 1×1 px, found "
                                         r"shape \(3, 0, 136\)"):
        pipe(clip(1) + [torch.rand(3, 0, 136)], chunk_frames=2)
    with pytest.raises(ValueError, match=r"`frames\[0\]` is empty: .* found a 136×0 \(width×height\) PIL image"):
        pipe([Image.new("RGB", (136, 0))] * 2)
    with pytest.raises(ValueError, match=r"`frames\[0\]` is empty: .* found shape \(0, 128, 136\)"):
        pipe(torch.rand(2, 0, 128, 136))
    with pytest.raises(ValueError, match="`frames`: a video needs at least 2 frames, got 0"):
        pipe(torch.rand(0, 3, 128, 136))
    fresh = VideoSRPipeline(**{k: copy.deepcopy(v) if k == "unet" else v for k, v in comps.items()})
    with pytest.raises(ValueError, match="Load DLoRAL weights first"):
        fresh(clip(2))
    make_osediff_pkl(video_components()["unet"], comps["vae"], tmp_path / "osediff.pkl")
    with pytest.raises(ValueError, match="osediff.pkl holds osediff image SR weights; VideoSRPipeline needs DLoRAL"):
        fresh.load_sr_weights(tmp_path / "osediff.pkl")
    image_pipe = OneStepSRPipeline(**{k: copy.deepcopy(v) if k == "unet" else v for k, v in comps.items()})
    with pytest.raises(ValueError, match="model.pkl is a DLoRAL video SR checkpoint.*VideoSRPipeline"):
        image_pipe.load_sr_weights(pkl[0])
    sd = dict(pkl[1])
    sd["state_dict_unet"] = {k: v for k, v in sd["state_dict_unet"].items() if "default_others_quality" not in k}
    torch.save(sd, tmp_path / "broken.pkl")
    with pytest.raises(ValueError, match="broken.pkl: the file lacks the quality LoRA of"):
        fresh.load_sr_weights(tmp_path / "broken.pkl")
    assert fresh.unet.conv_in.in_channels == 4  # validation happens before the model changes
    sd = dict(pkl[1], state_dict_unet={**pkl[1]["state_dict_unet"], "mid_block.extra.weight": torch.zeros(1)})
    torch.save(sd, tmp_path / "extra.pkl")
    with pytest.raises(ValueError, match=r"extra.pkl: 1 `state_dict_unet` keys match nothing.*mid_block.extra"):
        fresh.load_sr_weights(tmp_path / "extra.pkl")
    with pytest.raises(FileNotFoundError, match="No SR weights file"):
        fresh.load_sr_weights(tmp_path / "nope.pkl")
    with pytest.raises(ValueError, match="`stages` must be one of"):
        pipe(clip(2), stages="quality")


def test_memory_does_not_grow_with_the_clip(pipe):
    """Peak live tensor bytes while streaming 100 frames equal those of 5 frames; collecting every output instead
    (what streaming avoids) grows with the clip, so the measurement can see growth."""
    def frames(n):
        g = gen(0)
        for _ in range(n):
            yield torch.rand(3, 128, 128, generator=g)

    def peak(n, collect):
        kept = []
        with LiveBytes() as meter:
            for out in pipe.stream(frames(n), generator=gen(0)):
                if collect:
                    kept.append(out)
        return meter.peak

    short, long = peak(5, False), peak(100, False)
    assert long <= short * 1.02, (short, long)
    assert peak(12, True) > short + 8 * 3 * 512 * 512 * 4  # eight more kept frames of 512² float
