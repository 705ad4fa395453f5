"""core.sr_step (the SR step around the networks) and core.sr_weights (LoRA layers of the official files), against
independent references: diffusers' posterior, the DDPM formula in float64, the σ-space definition x = x0 + σ·ε."""

import math

import pytest
import torch

from swiftstep.core import onestep, sr_step, sr_weights


def test_posterior_sample_is_diffusers_for_the_same_generator():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    moments = torch.randn(1, 8, 5, 7, generator=torch.Generator().manual_seed(0))
    moments[:, 4:, 0, 0] = -40.0  # clamped log-variance
    ref = DiagonalGaussianDistribution(moments).sample(torch.Generator().manual_seed(3))
    assert torch.equal(sr_step.posterior_sample(moments, torch.Generator().manual_seed(3)), ref)


@pytest.mark.parametrize("t", [1, 999])
def test_eps_from_sigma_space_recovers_eps_at_small_sigma(t):
    """A k-diffusion denoiser (x = x0 + σ·ε → x0) in float32, as ComfyUI's apply_model returns it; at PiSA-SR's
    t = 1 (σ ≈ 0.04) the float64 round trip keeps ε to float32 rounding."""
    ab = onestep.alphas_cumprod().double()[t]
    sigma = math.sqrt((1 - ab) / ab)
    g = torch.Generator().manual_seed(1)
    z, eps = torch.randn(2, 4, 6, 6, generator=g) * 3, torch.randn(2, 4, 6, 6, generator=g)

    def denoise(x):  # the network sees z back and predicts eps; output as apply_model: x − σ·ε (x float64 here)
        assert x.dtype == torch.float64
        return x - torch.tensor(sigma, dtype=torch.float32) * eps

    got = sr_step.eps_from_sigma_space(denoise, z, sigma)
    assert got.dtype == torch.float32 and (got - eps).abs().max() <= 1e-6


def test_sr_x0_osediff_is_the_ddpm_step_and_pisa_the_residual():
    ab = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0)[999]
    g = torch.Generator().manual_seed(2)
    z, eps = torch.randn(1, 4, 4, 4, generator=g), torch.randn(1, 4, 4, 4, generator=g)
    schedule = onestep.NoiseSchedule.vp(onestep.alphas_cumprod())
    ref = (z.double() - (1 - ab).sqrt() * eps.double()) / ab.sqrt()
    assert (sr_step.sr_x0("osediff", eps, z, schedule).double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert torch.equal(sr_step.sr_x0("pisa-sr", eps, z, schedule), z - eps)


@pytest.mark.parametrize("h,w,upscale,min_side", [(24, 32, 4, 64), (5, 9, 4, 64), (13, 7, 3, 512), (40, 40, 4, 64)])
def test_preprocess_sizes_are_the_preprocessed_shape(h, w, upscale, min_side):
    x = sr_step.preprocess(torch.rand(3, h, w), upscale, min_side)
    _, final = sr_step.preprocess_sizes(h, w, upscale, min_side)
    assert tuple(x.shape) == (1, 3, *final) and final[0] % 8 == final[1] % 8 == 0
    assert min(final) >= min(min_side, upscale * min(h, w)) - 8


@pytest.mark.parametrize("h,w,tile,overlap", [(16, 16, 12, 4), (8, 24, 16, 8), (24, 16, 16, 8), (9, 31, 4, 2)])
def test_tile_count_is_what_latent_eps_runs(h, w, tile, overlap):
    """8×24 at tile 16: the area fits one tile, so one call although a side is longer (the pipeline's rule)."""
    seen = []

    def fn(z):
        seen.append(z.shape[0])
        return z * 2

    z = torch.randn(1, 4, h, w)
    out = sr_step.latent_eps(fn, z, tile, overlap)
    assert sum(seen) == sr_step.tile_count(h, w, tile, overlap)
    torch.testing.assert_close(out, z * 2)


def test_lora_layers_of_the_official_layouts(tmp_path):
    from ..sr_fixtures import make_osediff_pkl, make_pisa_pkl
    from ..video_fixtures import video_components

    parts = video_components()
    pisa = make_pisa_pkl(parts["unet"], tmp_path / "pisa.pkl")
    osediff = make_osediff_pkl(parts["unet"], parts["vae"], tmp_path / "osediff.pkl")
    pix = sr_weights.lora_layers(pisa, "pisa-sr", "pix")
    assert len(pix) == sum(len(pisa[f"unet_lora_{p}_modules_pix"]) for p in sr_weights.UNET_PARTS)
    module, a, b, rank = pix[0]
    assert rank == 4 and a.shape[0] == b.shape[1] == 4 and f"{module}.lora_A.default_encoder_pix.weight" in \
        pisa["state_dict_unet"]
    vae = sr_weights.lora_layers(osediff, "osediff", "vae")
    assert len(vae) == len(set(osediff["vae_lora_encoder_modules"]))  # the official list holds duplicates
    osediff["rank_unet"] = 8
    with pytest.raises(ValueError, match=r"osediff.pkl: LoRA `.*` has rank 4 \(A\) / 4 \(B\); the file declares "
                                         r"rank_unet = 8"):
        sr_weights.lora_layers(osediff, "osediff", "unet", "osediff.pkl")
