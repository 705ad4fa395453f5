"""In a real ComfyUI: SwiftStepNASA on a FLUX.1 or Z-Image MODEL (the negative text as a second row of one model call,
the image tokens' attention output mixed in every joint attention), sampled by ComfyUI's own `euler` on
SwiftStepPresetSigmas' σ at cfg 1 with the positive and negative CONDITIONING, gives the same latents as the diffusers
route for the same random-weight transformer, prompt embeddings and noise (≤ 1e-4 of the latents' scale):

- FLUX.1: `pipelines.nasa_joint.apply_joint_guidance(transformer, guidance, construction="official")` with
  `set_negative(negative_embeds, POSITIVE pooled)` (ComfyUI's route gives both rows the positive pooled embedding so
  that their image streams stay identical; the official NAG code gives the negative text stream its own);
- Z-Image: `pipelines.nasa_joint_zimage.apply_zimage_guidance(transformer, guidance)` with `set_negative(cap_feats)`
  (one image stream, two caption streams; Z-Image's adaLN takes t only, so nothing is approximated).

NASA α = 0 and NAG scale 1 give the unpatched ComfyUI run bit for bit (nothing is installed); installed anyway at
α = 0, the positive row of the two-row call is the unpatched run (the rows do not leak into each other). Z-Image
captions of different lengths (padded to one length in the batch, the shorter's extra keys masked) match too.

Runs on 0.3.64 (FLUX at full width: that release reads FLUX.1's widths from no weights) and 0.33 (tiny FLUX,
ComfyUI-sized Z-Image: ~0.9B parameters, minutes on CPU)."""

from dataclasses import dataclass

import pytest
import torch

from swiftstep.core import nasa
from swiftstep.core.presets import FLOW_PRESETS
from swiftstep.pipelines import DistilledDiTPipeline

from .test_dit_sampler_parity import FAMILIES, PROMPT, SIZE, comfy_model

# As many tokens as PROMPT under the Z-Image fixture's tokenizer (FLUX's T5 pads both to 256): the plain case, where
# the two prompts share the batch without padding; other lengths are tested at the end.
NEGATIVE = "low quality, blurry"
PRESETS = {"flux": ("flux-schnell", 4), "zimage": ("zimage-turbo", 8)}
# FLUX.1 values for both families: NASA α 0.2 (a placeholder, SNOOPI publishes none), NAG the official example's
SETTINGS = dict(nasa_scale=0.2, nag_scale=5.0, nag_tau=2.5, nag_alpha=0.25)


@dataclass
class Setup:
    family: str
    pipe: object
    patcher: object  # the unpatched ComfyUI MODEL of the same weights
    positive: list  # CONDITIONING
    negative: list
    noise: torch.Tensor  # ComfyUI layout [B, C, h, w]
    latents: torch.Tensor  # the same noise in the pipeline's layout
    sigmas: torch.Tensor
    plain: torch.Tensor  # ComfyUI latents without SwiftStepNASA


def _encode(family, pipe, prompt):
    """(CONDITIONING, what the diffusers route's `set_negative` takes) from the stock pipeline's encode_prompt."""
    if family == "flux":
        p = FLOW_PRESETS[PRESETS[family][0]]
        embeds, pooled, _ = pipe.encode_prompt(prompt, None, max_sequence_length=p.max_sequence_length)
        return [[embeds, {"pooled_output": pooled}]], (embeds, pooled)
    (embeds,), _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False)
    return [[embeds[None], {}]], [embeds]


def comfy_sample(patched, s: Setup, positive=None, negative=None):
    import comfy.sample
    import comfy.samplers

    positive, negative = positive or s.positive, negative or s.negative
    out = comfy.sample.sample_custom(patched, s.noise, 1.0, comfy.samplers.sampler_object("euler"), s.sigmas,
                                     positive, negative, torch.zeros_like(s.noise), disable_pbar=True, seed=0)
    return patched.model.latent_format.process_in(out)


@pytest.fixture(scope="module")
def nodes(comfy_inprocess):
    from swiftstep.nodes import nasa_nodes, one_step_nodes

    return nasa_nodes, one_step_nodes


@pytest.fixture(scope="module", params=["flux", "zimage"])
def setup(request, nodes) -> Setup:
    """One family at a time (pytest groups the tests by this parameter): the ComfyUI-sized ones take GBs."""
    import comfy.supported_models

    family = request.param
    spec = FAMILIES[family]
    if not hasattr(comfy.supported_models, spec.comfy_config):
        pytest.skip(f"this ComfyUI has no comfy.supported_models.{spec.comfy_config}")
    pipe = spec.build(seed=0)
    pipe.set_progress_bar_config(disable=True)
    patcher = comfy_model(pipe.transformer)
    assert type(patcher.model.model_config).__name__ == spec.comfy_config
    preset, steps = PRESETS[family]
    latents = spec.noise(pipe, torch.Generator().manual_seed(0))
    (sigmas,) = nodes[1].SwiftStepPresetSigmas.execute(patcher, preset, steps, width=SIZE, height=SIZE).args
    positive, _ = _encode(family, pipe, PROMPT)
    negative, _ = _encode(family, pipe, NEGATIVE)
    assert negative[0][0].shape == positive[0][0].shape, "NEGATIVE must tokenize to as many tokens as PROMPT"
    s = Setup(family, pipe, patcher, positive, negative, spec.unpack(pipe, latents), latents, sigmas, None)
    with torch.no_grad():
        s.plain = comfy_sample(patcher, s)
    return s


def diffusers_route(s: Setup, guidance: nasa.NegativeGuidance, prompt=PROMPT, negative_prompt=NEGATIVE):
    """DistilledDiTPipeline (the stock pipeline on the preset's grid) with the diffusers NASA/NAG route installed."""
    family = s.family
    preset, steps = PRESETS[family]
    _, positive = _encode(family, s.pipe, prompt)
    _, negative = _encode(family, s.pipe, negative_prompt)
    if family == "flux":
        from swiftstep.pipelines.nasa_joint import apply_joint_guidance

        handle = apply_joint_guidance(s.pipe.transformer, guidance, construction="official")
        handle.set_negative(negative[0], positive[1])  # the POSITIVE pooled embedding for the negative stream
    else:
        from swiftstep.pipelines.nasa_joint_zimage import apply_zimage_guidance

        handle = apply_zimage_guidance(s.pipe.transformer, guidance).set_negative(negative)
    try:
        out = DistilledDiTPipeline(s.pipe, preset)(prompt, height=SIZE, width=SIZE, num_inference_steps=steps,
                                                   latents=s.latents, output_type="latent").images
    finally:
        handle.remove()
    return FAMILIES[family].unpack(s.pipe, out)


@pytest.mark.parametrize("mode", ["nag", "nasa"])
@torch.no_grad()
def test_comfyui_swiftstep_nasa_equals_the_diffusers_route(nodes, setup, mode):
    s = setup
    guidance = nasa.NegativeGuidance.checked(mode, SETTINGS["nasa_scale"], SETTINGS["nag_scale"],
                                             SETTINGS["nag_tau"], SETTINGS["nag_alpha"], nag_norm=2)
    ref = diffusers_route(s, guidance)

    (patched,) = nodes[0].SwiftStepNASA.execute(s.patcher, s.negative, mode, **SETTINGS).args
    got = comfy_sample(patched, s)

    err = (got - ref).abs().max().item()
    scale = ref.abs().max().item()
    print(f"{s.family} {mode}: max |ComfyUI − diffusers| = {err:.2e} ({err / scale:.2e} of max |latents|); "
          f"the negative prompt moved the latents by {(ref - s.plain).abs().max().item():.2e}")
    assert err <= 1e-4 * scale, err
    assert (ref - s.plain).abs().max() > 100 * err  # the negative prompt changed the latents, well beyond the error


@torch.no_grad()
def test_guidance_off_is_the_unpatched_comfyui_run(nodes, setup):
    s = setup
    for mode, settings in (("nasa", dict(SETTINGS, nasa_scale=0.0)), ("nag", dict(SETTINGS, nag_scale=1.0))):
        (patched,) = nodes[0].SwiftStepNASA.execute(s.patcher, s.negative, mode, **settings).args
        assert torch.equal(comfy_sample(patched, s), s.plain), mode
    # installed anyway (α = 0): the two-row call's positive row is the plain model's output
    forced = nodes[0].patch_joint_model(s.patcher, s.negative[0][0], nasa.NegativeGuidance.checked("nasa", 0.0))
    err = (comfy_sample(forced, s) - s.plain).abs().max().item()
    print(f"{s.family}: α = 0 installed, max |two-row − plain| = {err:.2e}")
    assert err <= 1e-5 * s.plain.abs().max().item(), err


# Z-Image conditionings have one token per prompt token; ComfyUI pads each caption to a multiple of 32.
LONG_PROMPT = "a lighthouse at dusk over a calm sea, with gulls circling the tower and warm light in its windows"


@pytest.mark.parametrize("prompt,negative_prompt", [
    (PROMPT, "blurry, low quality."),  # 23 and 25 tokens, both padded to 32: the positive's 23…24 become pad tokens
    (LONG_PROMPT, NEGATIVE),  # 86 and 23 tokens, padded to 96 and 32: the negative's keys 32…95 masked
])
@torch.no_grad()
def test_zimage_captions_of_different_lengths_equal_the_diffusers_route(nodes, setup, prompt, negative_prompt):
    s = setup
    if s.family != "zimage":
        pytest.skip("FLUX's T5 conditionings share one length (256)")
    guidance = nasa.NegativeGuidance.checked("nag", SETTINGS["nasa_scale"], SETTINGS["nag_scale"], SETTINGS["nag_tau"],
                                             SETTINGS["nag_alpha"], nag_norm=2)
    ref = diffusers_route(s, guidance, prompt, negative_prompt)
    positive, _ = _encode(s.family, s.pipe, prompt)
    negative, _ = _encode(s.family, s.pipe, negative_prompt)
    assert positive[0][0].shape[1] != negative[0][0].shape[1]
    (patched,) = nodes[0].SwiftStepNASA.execute(s.patcher, negative, "nag", **SETTINGS).args
    got = comfy_sample(patched, s, positive, negative)
    err = (got - ref).abs().max().item()
    scale = ref.abs().max().item()
    print(f"zimage nag, {positive[0][0].shape[1]} vs {negative[0][0].shape[1]} tokens: max |ComfyUI − diffusers| = "
          f"{err:.2e} ({err / scale:.2e} of max |latents|)")
    assert err <= 1e-4 * scale, err
