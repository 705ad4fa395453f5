"""In a real ComfyUI: SwiftStepPresetSigmas' σ for a distilled DiT, sampled by ComfyUI's own `euler` through
comfy.sample.sample_custom, give the same latents as DistilledDiTPipeline (the stock diffusers pipeline on the
preset's grid) for the same random-weight transformer, prompt embeddings and noise (≤ 1e-4)."""

from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from swiftstep.core.presets import FLOW_PRESETS
from swiftstep.pipelines import DistilledDiTPipeline

from ..dit_fixtures.flux_sd3 import build_flux, build_sd3
from ..dit_fixtures.qwen_family import build_zimage

PROMPT = "a lighthouse at dusk"
SIZE = 64  # px: 8×8 latents, 4×4 image tokens


@dataclass(frozen=True)
class Family:
    """How one family's stock pipeline hands its parts to ComfyUI: CONDITIONING from its own `encode_prompt`, noise
    from its own `prepare_latents` (diffusers layout, for `latents=`) and latents in ComfyUI's [B, C, h, w]."""

    build: Callable
    comfy_config: str  # the comfy.supported_models class ComfyUI's detection must pick
    cond: Callable  # (pipe, preset) → CONDITIONING
    noise: Callable  # (pipe, generator) → diffusers latents
    unpack: Callable = lambda pipe, latents: latents  # diffusers latents → [B, C, h, w]


def _flux_cond(pipe, preset):
    embeds, pooled, _ = pipe.encode_prompt(PROMPT, None, max_sequence_length=preset.max_sequence_length)
    return [[embeds, {"pooled_output": pooled}]]


def _flux_noise(pipe, generator):
    packed, _ = pipe.prepare_latents(1, pipe.transformer.config.in_channels // 4, SIZE, SIZE, torch.float32, "cpu",
                                     generator)
    return packed


def _sd3_cond(pipe, preset):
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, None, None, do_classifier_free_guidance=False)
    return [[embeds, {"pooled_output": pooled}]]


def _zimage_cond(pipe, preset):
    # ZImagePipeline keeps only the prompt's real tokens (no padding), so no attention mask is needed
    (embeds,), _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False)
    return [[embeds[None], {}]]


def _unpacked_noise(channels):
    return lambda pipe, generator: pipe.prepare_latents(1, channels(pipe), SIZE, SIZE, torch.float32, "cpu", generator)


FAMILIES = {
    "flux": Family(lambda seed=0: build_flux(seed, size=flux_size()), "FluxSchnell", _flux_cond, _flux_noise,
                   lambda pipe, x: pipe._unpack_latents(x, SIZE, SIZE, pipe.vae_scale_factor)),
    "sd3": Family(build_sd3, "SD3", _sd3_cond, _unpacked_noise(lambda pipe: pipe.transformer.config.in_channels)),
    # ComfyUI detects Z-Image only at width 3840: the fixture's "comfy" size (one main layer, ~0.9B parameters)
    "zimage": Family(lambda seed=0: build_zimage(seed, size="comfy"), "ZImage", _zimage_cond,
                     _unpacked_noise(lambda pipe: pipe.transformer.in_channels)),
}


def flux_size() -> str:
    """The fixture size this ComfyUI detects as the net it is: "tiny" where detection reads Flux's widths from the
    weights (0.33), "comfy" where it hard-codes FLUX.1's (0.3.64: 3072 wide, 24 heads, 4096-d text)."""
    import comfy.model_detection

    tiny = build_flux(size="tiny").transformer
    sd = comfy.model_detection.convert_diffusers_mmdit({k: v.clone() for k, v in tiny.state_dict().items()}, "")
    width = tiny.config.num_attention_heads * tiny.config.attention_head_dim
    return "tiny" if comfy.model_detection.detect_unet_config(sd, "")["hidden_size"] == width else "comfy"


def comfy_model(transformer):
    """The same transformer weights through ComfyUI's own detection and diffusers → ComfyUI key conversion."""
    import comfy.sd

    # copies: the conversion rewrites some tensors in place (convert_diffusers_mmdit: Flux's norm_out scale/shift)
    weights = {k: v.clone() for k, v in transformer.state_dict().items()}
    patcher = comfy.sd.load_diffusion_model_state_dict(weights, {"dtype": torch.float32})
    assert patcher is not None, "ComfyUI did not recognise the transformer"
    return patcher


@pytest.fixture(scope="module")
def nodes(comfy_inprocess):
    from swiftstep.nodes import one_step_nodes

    return one_step_nodes


@pytest.fixture(scope="module")
def pipes(comfy_inprocess):
    """family → its stock pipeline, built once for all its step counts (the ComfyUI-sized ones take a while)."""
    return {}


@pytest.mark.parametrize("family,preset,steps", [
    ("flux", "flux-schnell", 1), ("flux", "flux-schnell", 4), ("sd3", "sd35-large-turbo", 4),
    ("zimage", "zimage-turbo", 8),
])
@torch.no_grad()
def test_comfyui_euler_on_preset_sigmas_equals_distilled_dit_pipeline(nodes, pipes, family, preset, steps):
    import comfy.sample
    import comfy.samplers
    import comfy.supported_models

    spec = FAMILIES[family]
    if not hasattr(comfy.supported_models, spec.comfy_config):
        pytest.skip(f"this ComfyUI has no comfy.supported_models.{spec.comfy_config}")
    if family not in pipes:
        pipes[family] = spec.build(seed=0)
        pipes[family].set_progress_bar_config(disable=True)
    pipe, p = pipes[family], FLOW_PRESETS[preset]

    patcher = comfy_model(pipe.transformer)
    assert type(patcher.model.model_config).__name__ == spec.comfy_config

    latents = spec.noise(pipe, torch.Generator().manual_seed(0))
    noise = spec.unpack(pipe, latents)
    ours = DistilledDiTPipeline(pipe, preset)
    ref = spec.unpack(pipe, ours(PROMPT, height=SIZE, width=SIZE, num_inference_steps=steps, latents=latents,
                                 output_type="latent").images)

    (sigmas,) = nodes.SwiftStepPresetSigmas.execute(patcher, preset, steps, width=SIZE, height=SIZE).args
    assert torch.equal(sigmas, p.sigmas(steps).float())
    cond = spec.cond(pipe, p)
    out = comfy.sample.sample_custom(patcher, noise, 1.0, comfy.samplers.sampler_object("euler"), sigmas, cond, cond,
                                     torch.zeros_like(noise), disable_pbar=True, seed=0)
    got = patcher.model.latent_format.process_in(out)  # ComfyUI returns latents in the VAE's space (÷ scale + shift)

    err = (got - ref).abs().max().item()
    assert err <= 1e-4 * ref.abs().max().item(), err
    assert (ref - noise).abs().max() > 0.1  # the network moved the latents: the comparison is not noise vs noise
