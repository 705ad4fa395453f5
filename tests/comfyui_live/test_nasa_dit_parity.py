"""In a real ComfyUI: SwiftStepNASA on a joint-attention MODEL (the negative text as a second row of one model call, the
image tokens' attention output mixed in every joint attention), sampled by ComfyUI's own `euler` on
SwiftStepPresetSigmas' σ at cfg 1 with the positive and negative CONDITIONING, gives the same latents as the diffusers
route for the same random-weight transformer, prompt embeddings and noise (≤ 1e-4 of the latents' scale):

- FLUX.1: `pipelines.nasa_joint.apply_joint_guidance(transformer, guidance, construction="official")` with
  `set_negative(negative_embeds, POSITIVE pooled)` (ComfyUI's route gives both rows the positive pooled embedding so
  that their image streams stay identical; the official NAG code gives the negative text stream its own);
- FLUX.2-klein: `pipelines.nasa_joint_flux2.apply_flux2_guidance(transformer, guidance)` with
  `set_negative(negative_embeds, negative_text_ids)` (modulation from t alone: nothing approximated);
- Z-Image: `pipelines.nasa_joint_zimage.apply_zimage_guidance(transformer, guidance)` with `set_negative(cap_feats)`
  (one image stream, two caption streams; Z-Image's adaLN takes t only, so nothing is approximated);
- Qwen-Image: `pipelines.nasa_joint_qwenimage.apply_qwenimage_guidance(transformer, guidance)` with
  `set_negative(negative_embeds, negative_mask)` (modulation from t alone; texts of any length);
- SD3.5: `pipelines.nasa_joint_sd3.apply_sd3_guidance(transformer, guidance)` with `set_negative(negative_embeds)`,
  i.e. the positive pooled embedding for the negative text stream too, as the official diffusers NAG pipeline.

NASA α = 0 and NAG scale 1 give the unpatched ComfyUI run bit for bit (nothing is installed); installed anyway at
α = 0, the positive row of the two-row call is the unpatched run (the rows do not leak into each other), also where the
negative is longer than the positive (FLUX.2, SD3: the positive row padded, its padding masked). Texts of different
lengths (padded to one length in the batch, the shorter's extra keys masked) match the diffusers routes for Z-Image
and Qwen-Image, whose diffusers routes take them.

Runs on 0.3.64 (FLUX.1 at full width: that release reads FLUX.1's widths from no weights; Qwen-Image; SD3) and 0.33
(tiny FLUX.1, tiny FLUX.2-klein, ComfyUI-sized Z-Image ~0.9B and Qwen-Image ~0.4B parameters: minutes on CPU)."""

from dataclasses import dataclass

import pytest
import torch

from swiftstep.core import nag, nasa
from swiftstep.core.presets import FLOW_PRESETS
from swiftstep.pipelines import DistilledDiTPipeline

from ..dit_fixtures.flux_sd3 import _perturb_constants, build_sd3
from ..dit_fixtures.qwen_family import build_flux2_klein, build_qwenimage
from .test_dit_sampler_parity import FAMILIES as SAMPLER_FAMILIES
from .test_dit_sampler_parity import PROMPT, SIZE, Family, comfy_model


def _flux2_noise(pipe, generator):
    """FLUX.2 noise in the model's own layout [B, 128, h, w] (what Flux2KleinPipeline takes as `latents=`)."""
    channels = pipe.transformer.config.in_channels
    return torch.randn(1, channels, SIZE // 16, SIZE // 16, generator=generator)


def _flux2_unpack(pipe, latents):
    """Flux2KleinPipeline's `output_type="latent"` is the VAE's [B, 32, 2h, 2w] (batch-norm undone, unpatchified):
    back to the model's [B, 128, h, w], where ComfyUI's Flux2 latents live; noise is already there."""
    if latents.shape[1] == pipe.transformer.config.in_channels:
        return latents
    bn = pipe.vae.bn
    std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
    return (pipe._patchify_latents(latents) - bn.running_mean.view(1, -1, 1, 1)) / std


def _qwen_noise(pipe, generator):
    packed = pipe.prepare_latents(1, pipe.transformer.config.in_channels // 4, SIZE, SIZE, torch.float32, "cpu",
                                  generator)
    return packed


def build_sd35_medium(seed: int = 0):
    """`build_sd3`'s pipeline with an SD3.5-Medium-shaped transformer: the first block also has the image-only second
    attention (`attn2`, `dual_attention_layers`), which the node must leave alone; the last is `context_pre_only`."""
    from diffusers import SD3Transformer2DModel

    pipe = build_sd3(seed)
    torch.manual_seed(seed)
    config = {k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")}  # no `_use_default_values`
    transformer = SD3Transformer2DModel(**{**config, "dual_attention_layers": (0,)}).eval()
    _perturb_constants(transformer)
    pipe.register_modules(transformer=transformer)
    return pipe


FAMILIES = {
    **SAMPLER_FAMILIES,
    "sd35-medium": Family(build_sd35_medium, "SD3", None, SAMPLER_FAMILIES["sd3"].noise),
    # ComfyUI 0.33 only (0.3.64 has no FLUX.2), in the BFL key layout (`flux2_bfl_weights`)
    "flux2": Family(build_flux2_klein, "Flux2", None, _flux2_noise, _flux2_unpack),
    # ComfyUI detects Qwen-Image only at width 3072 with 3584-wide text: the fixture's "comfy" size (~0.4B)
    "qwenimage": Family(lambda seed=0: build_qwenimage(seed, size="comfy"), "QwenImage", None, _qwen_noise,
                        lambda pipe, x: pipe._unpack_latents(x, SIZE, SIZE, pipe.vae_scale_factor)),
}

# As many tokens as PROMPT under the Z-Image fixture's tokenizer (FLUX's T5 pads both to 256, FLUX.2's Qwen3 to 512,
# SD3's CLIP+T5 to 77+256): the plain case, where the two prompts share the batch without padding; Qwen-Image keeps
# each prompt's own length (one token apart here); other lengths are tested at the end.
NEGATIVE = "low quality, blurry"
PRESETS = {"flux": ("flux-schnell", 4), "zimage": ("zimage-turbo", 8), "flux2": ("flux2-klein", 4),
           "qwenimage": ("qwen-image-lightning-4step", 4), "sd3": ("sd35-large-turbo", 4)}
# FLUX.1 values for every family: NASA α 0.2 (a placeholder, SNOOPI publishes none), NAG the official example's; the
# node takes the per-token norm from core.nag.DEFAULTS (L1 on SD3, L2 on the others)
SETTINGS = dict(nasa_scale=0.2, nag_scale=5.0, nag_tau=2.5, nag_alpha=0.25)


def flux2_bfl_weights(transformer) -> dict:
    """A diffusers Flux2Transformer2DModel's weights in the BFL layout ComfyUI 0.33 loads (the inverse of diffusers'
    `convert_flux2_transformer_checkpoint_to_diffusers`, checked against it): fused qkv, `.scale` QK norms, the final
    adaLN's (scale, shift) halves swapped back to (shift, scale)."""
    sd = {k: v.clone() for k, v in transformer.state_dict().items()}
    renames = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
               "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
               "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
               "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
               "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
               "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
               "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
               "single_stream_modulation.linear": "single_stream_modulation.lin"}
    double = {"attn.norm_q.weight": "img_attn.norm.query_norm.scale",
              "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
              "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
              "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale", "attn.to_out.0": "img_attn.proj",
              "attn.to_add_out": "txt_attn.proj", "ff.linear_in": "img_mlp.0", "ff.linear_out": "img_mlp.2",
              "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2"}
    single = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2",
              "attn.norm_q.weight": "norm.query_norm.scale", "attn.norm_k.weight": "norm.key_norm.scale"}
    out = {}
    for i in range(len(transformer.transformer_blocks)):
        pre = f"transformer_blocks.{i}."
        for stream, names in (("img_attn", ("to_q", "to_k", "to_v")), ("txt_attn", ("add_q_proj", "add_k_proj",
                                                                                   "add_v_proj"))):
            out[f"double_blocks.{i}.{stream}.qkv.weight"] = torch.cat([sd.pop(f"{pre}attn.{n}.weight")
                                                                       for n in names])
    for key in list(sd):
        value = sd.pop(key)
        if key == "norm_out.linear.weight":
            scale, shift = value.chunk(2, dim=0)
            out["final_layer.adaLN_modulation.1.weight"] = torch.cat([shift, scale])
            continue
        for prefix, block, table in (("transformer_blocks.", "double_blocks.", double),
                                     ("single_transformer_blocks.", "single_blocks.", single)):
            if key.startswith(prefix):
                index, rest = key[len(prefix):].split(".", 1)
                name = next((new + rest[len(old):] for old, new in table.items() if rest.startswith(old)), None)
                assert name is not None, key
                out[f"{block}{index}.{name}"] = value
                break
        else:
            name = next((new + key[len(old):] for old, new in renames.items() if key.startswith(old)), None)
            assert name is not None, key
            out[name] = value
    return out


def comfy_model_of(family: str, transformer):
    if family != "flux2":
        return comfy_model(transformer)
    import comfy.sd
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    bfl = flux2_bfl_weights(transformer)
    back = convert_flux2_transformer_checkpoint_to_diffusers({k: v.clone() for k, v in bfl.items()})
    reference = transformer.state_dict()
    assert back.keys() == reference.keys() and all(torch.equal(back[k], reference[k]) for k in back)
    patcher = comfy.sd.load_diffusion_model_state_dict(bfl, {"dtype": torch.float32})
    assert patcher is not None, "ComfyUI did not recognise the FLUX.2 transformer"
    return patcher


@dataclass
class Setup:
    family: str
    pipe: object
    patcher: object  # the unpatched ComfyUI MODEL of the same weights
    positive: list  # CONDITIONING
    negative: list
    noise: torch.Tensor  # ComfyUI layout [B, C, h, w] ([B, C, 1, h, w] for Qwen-Image)
    latents: torch.Tensor  # the same noise in the pipeline's layout
    sigmas: torch.Tensor
    plain: torch.Tensor  # ComfyUI latents without SwiftStepNASA


def _encode(family, pipe, prompt):
    """(CONDITIONING, what the diffusers route's `set_negative` takes) from the stock pipeline's encode_prompt."""
    if family == "flux":
        p = FLOW_PRESETS[PRESETS[family][0]]
        embeds, pooled, _ = pipe.encode_prompt(prompt, None, max_sequence_length=p.max_sequence_length)
        return [[embeds, {"pooled_output": pooled}]], (embeds, pooled)
    if family == "flux2":  # Qwen3 hidden states padded to 512 tokens (ComfyUI's klein encoder pads to 512 too)
        embeds, text_ids = pipe.encode_prompt(prompt, device="cpu")
        return [[embeds, {}]], (embeds, text_ids)
    if family == "qwenimage":  # the prompt's own tokens; a mask only where a batch of prompts was padded
        embeds, mask = pipe.encode_prompt(prompt, device="cpu")
        return [[embeds, {} if mask is None else {"attention_mask": mask}]], (embeds, mask)
    if family == "sd3":
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, None, None, do_classifier_free_guidance=False)
        return [[embeds, {"pooled_output": pooled}]], (embeds,)  # no negative pooled: the positive's serves both
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


@pytest.fixture(scope="module", params=["flux", "zimage", "flux2", "qwenimage", "sd3", "sd35-medium"])
def setup(request, nodes) -> Setup:
    """One family at a time (pytest groups the tests by this parameter): the ComfyUI-sized ones take GBs."""
    import comfy.supported_models

    spec = FAMILIES[request.param]
    family = {"sd35-medium": "sd3"}.get(request.param, request.param)
    if not hasattr(comfy.supported_models, spec.comfy_config):
        pytest.skip(f"this ComfyUI has no comfy.supported_models.{spec.comfy_config}")
    pipe = spec.build(seed=0)
    pipe.set_progress_bar_config(disable=True)
    patcher = comfy_model_of(family, pipe.transformer)
    assert type(patcher.model.model_config).__name__ == spec.comfy_config
    assert nodes[0].joint_family(patcher) == family
    if request.param == "sd35-medium":  # ComfyUI built the image-only attention too
        assert patcher.model.diffusion_model.joint_blocks[0].x_block.x_block_self_attn
    preset, steps = PRESETS[family]
    latents = spec.noise(pipe, torch.Generator().manual_seed(0))
    (sigmas,) = nodes[1].SwiftStepPresetSigmas.execute(patcher, preset, steps, width=SIZE, height=SIZE).args
    positive, _ = _encode(family, pipe, PROMPT)
    negative, _ = _encode(family, pipe, NEGATIVE)
    if family != "qwenimage":
        assert negative[0][0].shape == positive[0][0].shape, "NEGATIVE must tokenize to as many tokens as PROMPT"
    s = Setup(family, pipe, patcher, positive, negative, spec.unpack(pipe, latents), latents, sigmas, None)
    with torch.no_grad():
        s.plain = comfy_sample(patcher, s)
    return s


def guidance_for(family, mode, **settings):
    """What the node builds: the settings with the family's per-token norm."""
    settings = {**SETTINGS, **settings}
    return nasa.NegativeGuidance.checked(mode, settings["nasa_scale"], settings["nag_scale"], settings["nag_tau"],
                                         settings["nag_alpha"], nag_norm=nag.DEFAULTS[family]["nag_norm"])


def diffusers_route(s: Setup, guidance: nasa.NegativeGuidance, prompt=PROMPT, negative_prompt=NEGATIVE):
    """DistilledDiTPipeline (the stock pipeline on the preset's grid) with the diffusers NASA/NAG route installed."""
    family = s.family
    preset, steps = PRESETS[family]
    _, positive = _encode(family, s.pipe, prompt)
    _, negative = _encode(family, s.pipe, negative_prompt)
    transformer = s.pipe.transformer
    if family == "flux":
        from swiftstep.pipelines.nasa_joint import apply_joint_guidance

        handle = apply_joint_guidance(transformer, guidance, construction="official")
        handle.set_negative(negative[0], positive[1])  # the POSITIVE pooled embedding for the negative stream
    elif family == "flux2":
        from swiftstep.pipelines.nasa_joint_flux2 import apply_flux2_guidance

        handle = apply_flux2_guidance(transformer, guidance).set_negative(*negative)
    elif family == "qwenimage":
        from swiftstep.pipelines.nasa_joint_qwenimage import apply_qwenimage_guidance

        handle = apply_qwenimage_guidance(transformer, guidance).set_negative(*negative)
    elif family == "sd3":
        from swiftstep.pipelines.nasa_joint_sd3 import apply_sd3_guidance

        handle = apply_sd3_guidance(transformer, guidance).set_negative(*negative)  # pooled None: the positive's
    else:
        from swiftstep.pipelines.nasa_joint_zimage import apply_zimage_guidance

        handle = apply_zimage_guidance(transformer, guidance).set_negative(negative)
    p, schedule = FLOW_PRESETS[preset], {}
    if p.lora:  # the random weights stand for the model with the LoRA merged: the preset's σ, passed explicitly
        preset, schedule = None, {"sigmas": p.sigmas(steps)[:-1].tolist()}
    try:
        out = DistilledDiTPipeline(s.pipe, preset)(prompt, height=SIZE, width=SIZE, num_inference_steps=steps,
                                                   latents=s.latents, output_type="latent", **schedule).images
    finally:
        handle.remove()
    return FAMILIES[family].unpack(s.pipe, out)


@pytest.mark.parametrize("mode", ["nag", "nasa"])
@torch.no_grad()
def test_comfyui_swiftstep_nasa_equals_the_diffusers_route(nodes, setup, mode):
    s = setup
    ref = diffusers_route(s, guidance_for(s.family, mode))

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


# Z-Image and Qwen-Image conditionings have one token per prompt token (Z-Image's captions padded to a multiple of 32)
LONG_PROMPT = "a lighthouse at dusk over a calm sea, with gulls circling the tower and warm light in its windows"


@pytest.mark.parametrize("prompt,negative_prompt", [
    (PROMPT, "blurry, low quality."),  # 23 and 25 tokens, both padded to 32: the positive's 23…24 become pad tokens
    (LONG_PROMPT, NEGATIVE),  # 86 and 23 tokens, padded to 96 and 32: the negative's keys 32…95 masked
])
@torch.no_grad()
def test_texts_of_different_lengths_equal_the_diffusers_route(nodes, setup, prompt, negative_prompt):
    """Z-Image (the token counts are its) and Qwen-Image (positive 1 token longer / 68 tokens shorter than the
    negative): the shorter text padded in the batch, its padding masked."""
    s = setup
    if s.family == "flux":
        pytest.skip("FLUX.1: the two T5 texts need one length (ComfyUI pads them to 256; the node refuses others)")
    if s.family not in ("zimage", "qwenimage"):
        pytest.skip(f"{s.family}: its diffusers route takes texts of one length (the node's padding is checked by "
                    f"test_a_longer_negative_leaves_the_positive_row_unchanged)")
    ref = diffusers_route(s, guidance_for(s.family, "nag"), prompt, negative_prompt)
    positive, _ = _encode(s.family, s.pipe, prompt)
    negative, _ = _encode(s.family, s.pipe, negative_prompt)
    assert positive[0][0].shape[1] != negative[0][0].shape[1]
    (patched,) = nodes[0].SwiftStepNASA.execute(s.patcher, negative, "nag", **SETTINGS).args
    got = comfy_sample(patched, s, positive, negative)
    err = (got - ref).abs().max().item()
    scale = ref.abs().max().item()
    print(f"{s.family} nag, {positive[0][0].shape[1]} vs {negative[0][0].shape[1]} tokens: "
          f"max |ComfyUI − diffusers| = {err:.2e} ({err / scale:.2e} of max |latents|)")
    assert err <= 1e-4 * scale, err


@torch.no_grad()
def test_a_longer_negative_leaves_the_positive_row_unchanged(nodes, setup):
    """FLUX.2, Qwen-Image, SD3: a negative longer than the positive (FLUX.2 past its 512 tokens, SD3 with a long T5
    prompt) pads the positive row, whose padding is masked: installed at α = 0 the run is the unpatched one. FLUX.2: a
    negative shorter than 512 tokens is left-padded with zeros as ComfyUI pads its conditionings."""
    s = setup
    if s.family not in ("flux2", "qwenimage", "sd3"):
        pytest.skip(f"{s.family}: the node refuses a negative longer than the positive (FLUX.1: one T5 length; "
                    f"Z-Image: beyond the positive's caption block)")
    neg = s.negative[0][0]
    longer = torch.cat([neg, neg[:, :8]], dim=1)
    forced = nodes[0].patch_joint_model(s.patcher, longer, nasa.NegativeGuidance.checked("nasa", 0.0))
    err = (comfy_sample(forced, s) - s.plain).abs().max().item()
    print(f"{s.family}: α = 0 installed, negative {longer.shape[1]} vs positive {s.positive[0][0].shape[1]} tokens, "
          f"max |two-row − plain| = {err:.2e}")
    assert err <= 1e-5 * s.plain.abs().max().item(), err
    if s.family == "flux2":
        short = neg[:, :300]
        runs = [comfy_sample(nodes[0].SwiftStepNASA.execute(s.patcher, [[n, {}]], "nag", **SETTINGS).args[0], s)
                for n in (short, torch.nn.functional.pad(short, (0, 0, 512 - 300, 0)))]
        assert torch.equal(*runs)


@torch.no_grad()
def test_qwenimage_text_masks_are_honoured(nodes, setup):
    """Qwen-Image conditionings padded in a batch carry `attention_mask` (1 = token): a negative padded with 6 tokens
    and masked gives the unpadded negative's latents; so does a padded positive where ComfyUI passes its mask to the
    model (0.33; 0.3.64's Qwen-Image ignores text masks, so the node does too)."""
    import inspect

    import comfy.model_base

    s = setup
    if s.family != "qwenimage":
        pytest.skip("only Qwen-Image's conditionings carry text masks")

    def padded(cond, n=6):
        embeds = cond[0][0]
        mask = torch.cat([torch.ones(1, embeds.shape[1], dtype=torch.long), torch.zeros(1, n, dtype=torch.long)], 1)
        return [[torch.cat([embeds, embeds[:, :n]], 1), {"attention_mask": mask}]]

    ref = diffusers_route(s, guidance_for(s.family, "nag"))
    takes_mask = "attention_mask" in inspect.getsource(comfy.model_base.QwenImage.extra_conds)
    positive, negative = padded(s.positive) if takes_mask else s.positive, padded(s.negative)
    (patched,) = nodes[0].SwiftStepNASA.execute(s.patcher, negative, "nag", **SETTINGS).args
    got = comfy_sample(patched, s, positive, negative)
    err = (got - ref).abs().max().item()
    print(f"qwenimage nag, masked padding (positive too: {takes_mask}): max |ComfyUI − diffusers| = {err:.2e}")
    assert err <= 1e-4 * ref.abs().max().item(), err
