"""`swiftstep.guiders`: NASA/NAG as diffusers guiders in the modular pipelines of SDXL (`StableDiffusionXLAutoBlocks`
as diffusers ships them), FLUX.1 (`flux_guided_blocks()`), Qwen-Image (`QwenImageAutoBlocks` and the Qwen-Image-Edit
denoise blocks as diffusers ships them) and FLUX.2 / FLUX.2-klein / FLUX.2-klein base (`flux2_guided_blocks()`), on
tiny random models.

References: the same pipeline with no guidance (a CFG guider at scale 1, which runs the conditional pass only, or
diffusers' own blocks that run no guider) while our processors are installed by hand for the whole run
(`nasa_processor.nasa_attention` on the UNet, `apply_joint_guidance` / `apply_qwenimage_guidance` /
`apply_flux2_guidance` on the transformers), with the negative prompt encoded by the non-modular routes
(`OneStepPipeline`, `FluxPipeline`, `QwenImagePipeline`, `Flux2KleinPipeline` `.encode_prompt`; for FLUX.2-dev,
whose modular step words its system message differently from `Flux2Pipeline`, by diffusers' modular encoder
function)."""

import copy

import pytest
import torch
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.guiders.guider_utils import GuiderOutput
from diffusers import Flux2Pipeline, Flux2Transformer2DModel, QwenImageTransformer2DModel
from diffusers.modular_pipelines import (Flux2AutoBlocks, Flux2KleinAutoBlocks, Flux2KleinBaseAutoBlocks,
                                         FluxAutoBlocks, QwenImageAutoBlocks, StableDiffusionXLAutoBlocks)
from diffusers.modular_pipelines.flux.denoise import FluxLoopDenoiser
from diffusers.modular_pipelines.flux2.denoise import Flux2KleinBaseLoopDenoiser, Flux2KleinLoopDenoiser
from diffusers.modular_pipelines.flux2.encoders import Flux2KleinTextEncoderStep, Flux2TextEncoderStep
from diffusers.modular_pipelines.qwenimage.modular_blocks_qwenimage_edit import QwenImageEditCoreDenoiseStep
from PIL import Image
from transformers import Mistral3Config, Mistral3ForConditionalGeneration

from swiftstep.core.nasa import NegativeGuidance
from swiftstep.guiders import (Flux2GuidedLoopDenoiser, Flux2KleinBaseGuidedTextEncoderStep,
                               Flux2KleinGuidedLoopDenoiser, Flux2KleinGuidedTextEncoderStep, FluxGuidedLoopDenoiser,
                               NAGGuidance, NASAGuidance, flux2_guided_blocks, flux_guided_blocks)
from swiftstep.pipelines import OneStepPipeline
from swiftstep.pipelines.nasa_joint import apply_joint_guidance
from swiftstep.pipelines.nasa_joint_flux2 import apply_flux2_guidance
from swiftstep.pipelines.nasa_joint_qwenimage import apply_qwenimage_guidance
from swiftstep.pipelines.nasa_processor import NASAAttnProcessor, nasa_attention
from swiftstep.tiny_models import build_components

from .dit_fixtures.flux_sd3 import build_flux
from .dit_fixtures.qwen_family import _perturb_constants, build_flux2_klein, build_qwenimage, qwen_tokenizer
from .tolerance import assert_close_to_scale

PROMPT, NEGATIVE, STEPS = "a red cat on a sofa", "blurry, a dog", 2


@pytest.fixture(scope="module")
def sdxl():
    components = build_components("sdxl")
    pipe = StableDiffusionXLAutoBlocks().init_pipeline()
    pipe.update_components(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe, components


@pytest.fixture(scope="module")
def flux():
    stock = build_flux()
    components = {name: c for name, c in stock.components.items() if c is not None}
    pipes = {}
    for name, blocks in (("guided", flux_guided_blocks()), ("stock", FluxAutoBlocks())):
        pipes[name] = blocks.init_pipeline()
        pipes[name].update_components(**components)
        pipes[name].set_progress_bar_config(disable=True)
    return pipes, stock


def run_sdxl(pipe, guider, negative_prompt=NEGATIVE):
    pipe.update_components(guider=guider)
    return pipe(prompt=PROMPT, negative_prompt=negative_prompt, num_inference_steps=STEPS, height=32, width=32,
                generator=torch.Generator().manual_seed(0), output="images", output_type="pt")


def run_flux(pipe, guider=None, **kw):
    if guider is not None:
        pipe.update_components(guider=guider)
    return pipe(prompt=PROMPT, num_inference_steps=STEPS, height=32, width=32, max_sequence_length=16,
                generator=torch.Generator().manual_seed(0), output="images", output_type="pt", **kw)


STOCK_PROCESSORS = {"AttnProcessor2_0", "FluxAttnProcessor", "QwenDoubleStreamAttnProcessor2_0",
                    "Flux2AttnProcessor", "Flux2ParallelSelfAttnProcessor"}


class Watch:
    """Counts the denoiser's forward calls and records, per call, whether our processors were installed; snapshots
    every processor object and every module hook to compare after the run."""

    def __init__(self, model):
        self.model, self.calls, self.patched = model, 0, []
        self.hook = model.register_forward_pre_hook(self._seen)
        self.processors = dict(model.attn_processors)
        self.hooks = self._hooks()

    def _seen(self, module, args):
        self.calls += 1
        names = {type(p).__name__ for p in module.attn_processors.values()}
        self.patched.append(bool(names - STOCK_PROCESSORS))

    def _hooks(self):
        return {name: (tuple(m._forward_pre_hooks), tuple(m._forward_hooks))
                for name, m in self.model.named_modules()}

    def assert_restored(self):
        now = self.model.attn_processors
        assert now.keys() == self.processors.keys()
        assert all(now[name] is proc for name, proc in self.processors.items()), "a processor was not restored"
        assert self._hooks() == self.hooks, "a hook was left behind"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.hook.remove()


# ---------------------------------------------------------------- the guider contract, on a plain UNet call
def test_contract_one_batch_negative_kept_processors_installed_and_restored(sdxl):
    _, components = sdxl
    unet = components["unet"]
    pos, neg = torch.randn(1, 77, 80), torch.randn(1, 77, 80)
    pooled, neg_pooled = torch.randn(1, 32), torch.randn(1, 32)
    guider = NASAGuidance(nasa_scale=0.3)
    assert guider.num_conditions == 2  # before the loop: asks the text-encoder blocks for the negative prompt
    guider.set_state(step=0, num_inference_steps=STEPS, timestep=torch.tensor(999))
    assert guider.num_conditions == 1 and guider.is_conditional
    (batch,) = guider.prepare_inputs({"prompt_embeds": (pos, neg), "text_embeds": (pooled, neg_pooled),
                                      "time_ids": (torch.ones(1, 6), torch.zeros(1, 6)), "image_embeds": (None, None)})
    assert batch.prompt_embeds is pos and batch.text_embeds is pooled and batch.time_ids.sum() == 6
    assert getattr(batch, "__guidance_identifier__") == "pred_cond"
    with Watch(unet) as watch:
        guider.prepare_models(unet)
        installed = [p for p in unet.attn_processors.values() if isinstance(p, NASAAttnProcessor)]
        assert installed and all(p.context.encoder_hidden_states is not None for p in installed)
        assert all(p.context.alpha == 0.3 for p in installed)
        guider.cleanup_models(unet)
        watch.assert_restored()
    assert guider.num_conditions == 1
    pred = torch.randn(1, 4, 4, 4)
    out = guider([batch.__class__(noise_pred=pred, **{"__guidance_identifier__": "pred_cond"})])
    assert isinstance(out, GuiderOutput) and out.pred is pred and out.pred_cond is pred and out.pred_uncond is None
    assert guider.num_conditions == 2  # the step is over


def test_prepare_inputs_from_block_state_reads_the_named_fields():
    from diffusers.modular_pipelines.modular_pipeline import BlockState

    state = BlockState(prompt_embeds=torch.ones(1, 3, 4), negative_prompt_embeds=torch.zeros(1, 3, 4),
                       pooled_prompt_embeds=torch.ones(1, 2), negative_pooled_prompt_embeds=torch.zeros(1, 2))
    fields = {"encoder_hidden_states": ("prompt_embeds", "negative_prompt_embeds"),
              "pooled_projections": ("pooled_prompt_embeds", "negative_pooled_prompt_embeds")}
    guider = NAGGuidance()
    (batch,) = guider.prepare_inputs_from_block_state(state, fields)
    assert batch.encoder_hidden_states is state.prompt_embeds
    assert batch.pooled_projections is state.pooled_prompt_embeds
    assert guider._negative["text"] is state.negative_prompt_embeds
    assert guider._negative["pooled"] is state.negative_pooled_prompt_embeds
    assert guider._negative["mask"] is None and guider._negative["text_ids"] is None


def test_a_step_that_raised_leaves_no_patch_after_the_next_step(sdxl):
    _, components = sdxl
    unet = components["unet"]
    guider = NASAGuidance()
    with Watch(unet) as watch:
        for _ in range(2):  # the first step "raises" between prepare_models and cleanup_models
            guider.set_state(step=0, num_inference_steps=STEPS, timestep=torch.tensor(999))
            guider.prepare_inputs({"prompt_embeds": (torch.randn(1, 77, 80), torch.randn(1, 77, 80))})
            guider.prepare_models(unet)
        guider.cleanup_models(unet)
        watch.assert_restored()


# ---------------------------------------------------------------- SDXL modular pipeline (diffusers' own blocks)
def test_sdxl_run_interrupted_inside_the_unet_then_the_next_run_is_whole(sdxl):
    """diffusers' loops have no `finally`: a KeyboardInterrupt in the UNet skips cleanup_models and forward."""
    pipe, components = sdxl
    expected = run_sdxl(pipe, NASAGuidance(nasa_scale=0.5))
    guider = NASAGuidance(nasa_scale=0.5)

    def interrupt(module, args):
        raise KeyboardInterrupt

    with Watch(components["unet"]) as watch:
        hook = components["unet"].register_forward_pre_hook(interrupt)
        with pytest.raises(KeyboardInterrupt):
            run_sdxl(pipe, guider)
        hook.remove()
        assert guider.num_conditions == 2  # so the next run encodes the negative prompt again
        assert torch.equal(run_sdxl(pipe, guider), expected)
        watch.assert_restored()



@pytest.mark.parametrize("guider, off", [(NASAGuidance(), NASAGuidance(nasa_scale=0.0)),
                                         (NAGGuidance(), NAGGuidance(nag_scale=1.0))], ids=["nasa", "nag"])
def test_sdxl_negative_prompt_changes_the_image_off_settings_are_exact_one_pass_per_step(sdxl, guider, off):
    pipe, components = sdxl
    with Watch(components["unet"]) as watch:
        plain = run_sdxl(pipe, ClassifierFreeGuidance(guidance_scale=1.0))
        assert watch.calls == STEPS
        guided = run_sdxl(pipe, guider)
        assert watch.calls == 2 * STEPS  # one UNet pass per step, not CFG's two
        assert watch.patched[STEPS:] == [True] * STEPS
        watch.assert_restored()
        assert (guided - plain).abs().max() > 1e-3  # the negative prompt acts (tiny model: ~3e-3 on [0, 1])
        assert torch.equal(run_sdxl(pipe, off), plain)
        assert watch.patched[2 * STEPS:] == [False] * STEPS  # off installs nothing
        watch.assert_restored()


@pytest.mark.parametrize("settings", [dict(mode="nasa", alpha=0.4),
                                      dict(mode="nag", nag_scale=4.0, nag_tau=2.0, nag_alpha=0.6)],
                         ids=["nasa", "nag"])
def test_sdxl_guider_equals_the_processors_installed_by_hand(sdxl, settings):
    pipe, components = sdxl
    if settings["mode"] == "nasa":
        guider = NASAGuidance(nasa_scale=settings["alpha"])
    else:
        guider = NAGGuidance(nag_scale=settings["nag_scale"], nag_tau=settings["nag_tau"],
                             nag_alpha=settings["nag_alpha"])
    guided = run_sdxl(pipe, guider)
    negative, _ = OneStepPipeline(**components).encode_prompt([NEGATIVE], 1, torch.device("cpu"))
    with nasa_attention(components["unet"], negative, **settings):
        by_hand = run_sdxl(pipe, ClassifierFreeGuidance(guidance_scale=1.0), negative_prompt=None)
    assert_close_to_scale(guided, by_hand, what="modular guider vs processors by hand")


@pytest.mark.parametrize("guider, expected", [
    (NASAGuidance(), dict(mode="nasa", alpha=0.2)),  # SNOOPI: SDXL takes SD2.1's 0.2 (none published)
    (NAGGuidance(), dict(mode="nag", nag_scale=3.0, nag_tau=2.5, nag_alpha=0.5, nag_norm=1)),  # NAG Table 5, SDXL
    (NAGGuidance(nag_alpha=0.3), dict(mode="nag", nag_scale=3.0, nag_tau=2.5, nag_alpha=0.3))],
    ids=["nasa", "nag", "nag-given-alpha"])
def test_family_defaults_on_the_sdxl_unet(sdxl, guider, expected):
    unet = sdxl[1]["unet"]
    guider.prepare_inputs({"prompt_embeds": (torch.randn(1, 77, 80), torch.randn(1, 77, 80))})
    guider.prepare_models(unet)
    (settings,) = {p.context.guidance for p in unet.attn_processors.values() if isinstance(p, NASAAttnProcessor)}
    guider.cleanup_models(unet)
    assert {k: getattr(settings, k) for k in expected} == expected


@pytest.mark.parametrize("guider, expected", [
    (NASAGuidance(), dict(mode="nasa", alpha=0.2)),  # no published FLUX α
    (NAGGuidance(), dict(mode="nag", nag_scale=5.0, nag_tau=2.5, nag_alpha=0.25, nag_norm=2))],  # official FLUX
    ids=["nasa", "nag"])
def test_family_defaults_on_the_flux_transformer(flux, guider, expected):
    transformer = flux[1].transformer
    guider.prepare_inputs({"encoder_hidden_states": (torch.randn(1, 16, 32), torch.randn(1, 16, 32)),
                           "pooled_projections": (torch.randn(1, 32), torch.randn(1, 32))})
    guider.prepare_models(transformer)
    (settings,) = {p.guidance for p in transformer.attn_processors.values()}
    guider.cleanup_models(transformer)
    assert {k: getattr(settings, k) for k in expected} == expected


def test_sdxl_outside_start_stop_the_step_is_plain(sdxl):
    pipe, components = sdxl
    with Watch(components["unet"]) as watch:
        run_sdxl(pipe, NASAGuidance(nasa_scale=0.5, start=0.5))
        assert watch.patched == [False, True]
        run_sdxl(pipe, NASAGuidance(nasa_scale=0.5, stop=0.5))
        assert watch.patched[2:] == [True, False]
        watch.assert_restored()


def test_disabled_guider_installs_nothing(sdxl):
    _, components = sdxl
    unet = components["unet"]
    guider = NAGGuidance(enabled=False)
    guider.set_state(step=0, num_inference_steps=STEPS, timestep=torch.tensor(999))
    guider.prepare_inputs({"prompt_embeds": (torch.randn(1, 77, 80), torch.randn(1, 77, 80))})
    with Watch(unet) as watch:
        guider.prepare_models(unet)
        watch.assert_restored()


# ---------------------------------------------------------------- FLUX.1 modular pipeline (flux_guided_blocks)
def test_flux_guided_blocks_leave_diffusers_blocks_alone():
    blocks = flux_guided_blocks()
    assert isinstance(blocks.sub_blocks["denoise"].sub_blocks["denoise"].sub_blocks["denoiser"],
                      FluxGuidedLoopDenoiser)
    fresh = FluxAutoBlocks().sub_blocks["denoise"].sub_blocks["denoise"].sub_blocks["denoiser"]
    assert type(fresh) is FluxLoopDenoiser  # diffusers' FluxAutoBlocks share step instances: we copy first


@pytest.mark.parametrize("guider, off", [(NAGGuidance(), NAGGuidance(nag_scale=1.0)),
                                         (NASAGuidance(), NASAGuidance(nasa_scale=0.0))], ids=["nag", "nasa"])
def test_flux_negative_prompt_changes_the_image_off_settings_are_exact_one_pass_per_step(flux, guider, off):
    pipes, stock = flux  # tiny model: NAG ~5e-3, NASA ~3e-3 on [0, 1]
    assert_one_pass_a_visible_change_and_exact_off(run_flux, pipes["stock"], pipes["guided"], stock.transformer,
                                                   guider, off)


def assert_one_pass_a_visible_change_and_exact_off(run, stock_pipe, guided_pipe, transformer, guider, off):
    """The guided blocks with CFG off give the stock image; the guider runs the transformer once per step with its
    processors in place and restored after; the image moves (> 1e-3 on [0, 1]); off settings are bit-identical."""
    plain = run(stock_pipe)
    with Watch(transformer) as watch:
        assert torch.equal(run(guided_pipe, ClassifierFreeGuidance(guidance_scale=1.0)), plain)
        guided = run(guided_pipe, guider, negative_prompt=NEGATIVE)
        assert watch.calls == 2 * STEPS and watch.patched == [False] * STEPS + [True] * STEPS
        watch.assert_restored()
        assert (guided - plain).abs().max() > 1e-3
        assert torch.equal(run(guided_pipe, off, negative_prompt=NEGATIVE), plain)
        watch.assert_restored()


@pytest.mark.parametrize("construction", ["shared", "official"])
def test_flux_guider_equals_the_joint_route_installed_by_hand(flux, construction):
    pipes, stock = flux
    guided = run_flux(pipes["guided"], NAGGuidance(construction=construction), negative_prompt=NEGATIVE)
    negative, negative_pooled, _ = stock.encode_prompt(NEGATIVE, prompt_2=None, max_sequence_length=16)
    official = NegativeGuidance.checked("nag", nag_scale=5.0, nag_tau=2.5, nag_alpha=0.25, nag_norm=2)
    with apply_joint_guidance(stock.transformer, official, construction=construction).set_negative(
            negative, negative_pooled):
        by_hand = run_flux(pipes["stock"])
    assert_close_to_scale(guided, by_hand, what=f"modular guider vs apply_joint_guidance ({construction})")


def test_flux_without_negative_embeddings_raises(flux):
    _, stock = flux
    guider = NAGGuidance()
    guider.set_state(step=0, num_inference_steps=STEPS, timestep=torch.tensor(1.0))
    guider.prepare_inputs({"encoder_hidden_states": (torch.randn(1, 16, 32), None)})
    with pytest.raises(ValueError, match="no negative prompt embeddings"):
        guider.prepare_models(stock.transformer)


# ---------------------------------------------------------------- Qwen-Image modular pipelines (diffusers' own blocks)
CFG_OFF = dict(guidance_scale=1.0)  # ClassifierFreeGuidance at scale 1: the conditional pass only


@pytest.fixture(scope="module")
def qwenimage():
    stock = build_qwenimage()
    pipe = QwenImageAutoBlocks().init_pipeline()
    pipe.update_components(**{name: c for name, c in stock.components.items() if c is not None})
    pipe.set_progress_bar_config(disable=True)
    return pipe, stock


def run_qwenimage(pipe, guider, prompt=PROMPT, **kw):
    pipe.update_components(guider=guider)
    return pipe(prompt=prompt, num_inference_steps=STEPS, height=32, width=32,
                generator=torch.Generator().manual_seed(0), output="images", output_type="pt", **kw)


@pytest.mark.parametrize("guider, off", [(NAGGuidance(), NAGGuidance(nag_scale=1.0)),
                                         (NASAGuidance(), NASAGuidance(nasa_scale=0.0))], ids=["nag", "nasa"])
def test_qwenimage_negative_prompt_changes_the_image_off_settings_are_exact_one_pass_per_step(qwenimage, guider,
                                                                                               off):
    pipe, stock = qwenimage
    with Watch(stock.transformer) as watch:
        plain = run_qwenimage(pipe, ClassifierFreeGuidance(**CFG_OFF), negative_prompt=NEGATIVE)
        guided = run_qwenimage(pipe, guider, negative_prompt=NEGATIVE)
        assert watch.calls == 2 * STEPS and watch.patched == [False] * STEPS + [True] * STEPS
        watch.assert_restored()
        assert (guided - plain).abs().max() > 1e-3  # tiny model: NAG ~8e-3, NASA ~3e-3 on [0, 1]
        assert torch.equal(run_qwenimage(pipe, off, negative_prompt=NEGATIVE), plain)
        assert watch.patched[2 * STEPS:] == [False] * STEPS
        watch.assert_restored()


@pytest.mark.parametrize("case", ["one-prompt-nag", "two-prompts-padded-nasa"])
def test_qwenimage_guider_equals_the_route_installed_by_hand(qwenimage, case):
    """Two prompts and two negatives of different lengths: each side is padded and masked, so the output depends on
    the guider handing the pipeline's unconditional `encoder_hidden_states_mask` to `set_negative`."""
    pipe, stock = qwenimage
    if case == "one-prompt-nag":
        prompt, negative = PROMPT, NEGATIVE
        guider, guidance = NAGGuidance(), NegativeGuidance.for_family("qwenimage", "nag")  # FLUX.1's: 5 / 2.5 / 0.25
    else:
        prompt, negative = [PROMPT, "a cat"], ["blurry", "a dog on a red sofa in the rain"]
        guider, guidance = NASAGuidance(nasa_scale=0.4), NegativeGuidance.for_family("qwenimage", "nasa", alpha=0.4)
    guided = run_qwenimage(pipe, guider, prompt=prompt, negative_prompt=negative)
    embeds, mask = stock.encode_prompt(negative, device=torch.device("cpu"))
    assert (mask is None) == (case == "one-prompt-nag")  # encode_prompt gives no mask where nothing is padded
    with apply_qwenimage_guidance(stock.transformer, guidance).set_negative(embeds, mask):
        by_hand = run_qwenimage(pipe, ClassifierFreeGuidance(**CFG_OFF), prompt=prompt)
    assert_close_to_scale(guided, by_hand, what=f"modular guider vs apply_qwenimage_guidance ({case})")


@pytest.mark.parametrize("zero_cond_t", [False, True], ids=["edit", "edit-2511-zero-cond-t"])
def test_qwenimage_edit_denoise_blocks_guider_equals_the_route_installed_by_hand(qwenimage, zero_cond_t):
    """diffusers' Qwen-Image-Edit denoise workflow as it ships (`QwenImageEditCoreDenoiseStep`: the condition image's
    tokens after the target's in the image stream, `QwenImageEditLoopDenoiser`). Its VL text encoder is left out (the
    Qwen2VLProcessor needs torchvision): the embeddings are random, as that encoder hands them — the negative longer
    (edit embeddings carry the image's tokens) and padded."""
    _, stock = qwenimage
    transformer = stock.transformer
    if zero_cond_t:  # Qwen-Image-Edit-2511: the condition image modulated by t = 0
        torch.manual_seed(1)
        config = {k: v for k, v in stock.transformer.config.items() if not k.startswith("_")}
        transformer = QwenImageTransformer2DModel.from_config({**config, "zero_cond_t": True}).eval()
        _perturb_constants(transformer)
    pipe = QwenImageEditCoreDenoiseStep().init_pipeline()
    pipe.update_components(transformer=transformer, scheduler=stock.scheduler)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(1, 9, 32, generator=g), torch.randn(1, 14, 32, generator=g)
    neg_mask = (torch.arange(14) < 11).long()[None]
    fields = dict(prompt_embeds=pos, prompt_embeds_mask=torch.ones(1, 9, dtype=torch.long), height=32, width=32,
                  image_latents=torch.randn(1, 16, 1, 4, 4, generator=g), num_inference_steps=STEPS, output="latents")

    def run(guider, **kw):
        pipe.update_components(guider=guider)
        return pipe(generator=torch.Generator().manual_seed(0), **fields, **kw)

    with Watch(transformer) as watch:
        plain = run(ClassifierFreeGuidance(**CFG_OFF))
        guided = run(NAGGuidance(), negative_prompt_embeds=neg, negative_prompt_embeds_mask=neg_mask)
        assert watch.calls == 2 * STEPS and watch.patched == [False] * STEPS + [True] * STEPS
        watch.assert_restored()
        with apply_qwenimage_guidance(transformer, NegativeGuidance.for_family("qwenimage", "nag")).set_negative(
                neg, neg_mask):
            by_hand = run(ClassifierFreeGuidance(**CFG_OFF))
        watch.assert_restored()
    assert (guided - plain).abs().max() > 1e-3 * plain.abs().max()  # tiny model: ~4e-3 of the latents' scale
    assert_close_to_scale(guided, by_hand, what="Qwen-Image-Edit modular guider vs apply_qwenimage_guidance")


# ---------------------------------------------------------------- FLUX.2 modular pipelines (flux2_guided_blocks)
# A chat template reading the content parts of Flux2TextEncoderStep's messages, as the Pixtral processor's does
MISTRAL_CHAT_TEMPLATE = ("{%- for message in messages -%}{{- '<|im_start|>' + message['role'] + '\\n' -}}"
                         "{%- for part in message['content'] -%}{{- part['text'] -}}{%- endfor -%}"
                         "{{- '<|im_end|>\\n' -}}{%- endfor -%}")
MISTRAL_LAYERS = (1, 2, 3)  # text_encoder_out_layers of the 3-layer tiny Mistral3 (the real one: 10, 20, 30)
# FLUX.2's system message alone takes ~170 byte-level tokens of the tiny tokenizer: the prompt must fit after it
MISTRAL_LENGTH = 224


def build_flux2_dev(klein) -> Flux2Pipeline:
    """FLUX.2-dev-shaped: a tiny Mistral3 text encoder (3 layers, width 16: its three hidden states make the klein
    DiT's 48-wide context) and the klein fixture's DiT with FLUX.2-dev's guidance embedding."""
    torch.manual_seed(0)
    tokenizer = qwen_tokenizer()
    tokenizer.chat_template = MISTRAL_CHAT_TEMPLATE
    config = Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=1, head_dim=16, image_size=32, patch_size=16))
    text_encoder = Mistral3ForConditionalGeneration(config).eval()
    transformer = Flux2Transformer2DModel.from_config({**klein.transformer.config, "guidance_embeds": True}).eval()
    _perturb_constants(text_encoder, transformer)
    return Flux2Pipeline(scheduler=copy.deepcopy(klein.scheduler), vae=klein.vae, text_encoder=text_encoder,
                         tokenizer=tokenizer, transformer=transformer)


@pytest.fixture(scope="module")
def flux2():
    klein = build_flux2_klein()
    dev = build_flux2_dev(klein)
    pipes = {}
    for name, stock, blocks in (("klein", klein, flux2_guided_blocks()),
                                ("klein-stock", klein, Flux2KleinAutoBlocks()),
                                ("base", klein, flux2_guided_blocks(Flux2KleinBaseAutoBlocks())),
                                ("base-stock", klein, Flux2KleinBaseAutoBlocks()),
                                ("dev", dev, flux2_guided_blocks(Flux2AutoBlocks())),
                                ("dev-stock", dev, Flux2AutoBlocks())):
        pipes[name] = blocks.init_pipeline()
        pipes[name].update_components(**{n: c for n, c in stock.components.items() if c is not None})
        pipes[name].set_progress_bar_config(disable=True)
    return pipes, {"klein": klein, "dev": dev}


def run_flux2(pipe, guider=None, prompt=PROMPT, max_sequence_length=16, **kw):
    if guider is not None:
        pipe.update_components(guider=guider)
    return pipe(prompt=prompt, num_inference_steps=STEPS, height=32, width=32, max_sequence_length=max_sequence_length,
                generator=torch.Generator().manual_seed(0), output="images", output_type="pt", **kw)


def sub_blocks_named(blocks, name):
    found = []
    for key, sub in getattr(blocks, "sub_blocks", {}).items():
        found += [sub] if key == name else sub_blocks_named(sub, name)
    return found


def test_flux2_guided_blocks_swap_in_subclasses_and_leave_diffusers_blocks_alone():
    klein, base, dev = (flux2_guided_blocks(), flux2_guided_blocks(Flux2KleinBaseAutoBlocks()),
                        flux2_guided_blocks(Flux2AutoBlocks()))
    assert type(klein.sub_blocks["text_encoder"]) is Flux2KleinGuidedTextEncoderStep
    assert type(base.sub_blocks["text_encoder"]) is Flux2KleinBaseGuidedTextEncoderStep
    for blocks, denoiser in ((klein, Flux2KleinGuidedLoopDenoiser), (base, Flux2KleinBaseLoopDenoiser),
                             (dev, Flux2GuidedLoopDenoiser)):
        found = sub_blocks_named(blocks, "denoiser")
        assert len(found) == 2 and all(type(d) is denoiser for d in found)  # text-to-image and image-conditioned
    fresh = Flux2KleinAutoBlocks()  # diffusers' blocks share step instances: we copy first
    assert type(fresh.sub_blocks["text_encoder"]) is Flux2KleinTextEncoderStep
    assert all(type(d) is Flux2KleinLoopDenoiser for d in sub_blocks_named(fresh, "denoiser"))
    with pytest.raises(ValueError, match="FLUX.2 auto blocks.*got FluxAutoBlocks"):
        flux2_guided_blocks(FluxAutoBlocks())


@pytest.mark.parametrize("guider, off", [(NAGGuidance(), NAGGuidance(nag_scale=1.0)),
                                         (NASAGuidance(), NASAGuidance(nasa_scale=0.0))], ids=["nag", "nasa"])
def test_flux2_klein_negative_prompt_changes_the_image_off_settings_are_exact_one_pass_per_step(flux2, guider, off):
    pipes, stock = flux2  # tiny model: NAG ~8e-3, NASA ~4e-3 on [0, 1]
    assert_one_pass_a_visible_change_and_exact_off(run_flux2, pipes["klein-stock"], pipes["klein"],
                                                   stock["klein"].transformer, guider, off)


# the FLUX.2 image processor takes PIL images of at least 64 px
REFERENCE_IMAGE = Image.fromarray(torch.linspace(0, 255, 64 * 64 * 3).reshape(64, 64, 3).to(torch.uint8).numpy())
FLUX2_CASES = {  # pipeline, call arguments, guider, its settings as NegativeGuidance (none published: FLUX.1's)
    "klein": ("klein", dict(negative_prompt=NEGATIVE), NAGGuidance(), ("nag",)),
    "klein-two-prompts-two-images-each": (
        "klein", dict(prompt=[PROMPT, "a car"], negative_prompt=["blurry", "a dog"], num_images_per_prompt=2),
        NASAGuidance(nasa_scale=0.3), ("nasa", 0.3)),
    "klein-reference-image": ("klein", dict(negative_prompt=NEGATIVE, image=REFERENCE_IMAGE), NAGGuidance(), ("nag",)),
    "klein-base": ("base", dict(negative_prompt=NEGATIVE), NAGGuidance(), ("nag",)),  # negative_txt_ids forwarded
    "dev": ("dev", dict(negative_prompt=NEGATIVE, text_encoder_out_layers=MISTRAL_LAYERS,
                        max_sequence_length=MISTRAL_LENGTH), NAGGuidance(), ("nag",)),
}


@pytest.mark.parametrize("case", FLUX2_CASES)
def test_flux2_guider_equals_the_route_installed_by_hand(flux2, case):
    pipes, stock = flux2
    name, kw, guider, settings = FLUX2_CASES[case]
    guided = run_flux2(pipes[name], guider, **kw)
    model = stock["dev" if name == "dev" else "klein"]
    if name == "dev":  # the modular step's system message is FLUX.2's on one line; Flux2Pipeline's breaks it in two
        embeds = Flux2TextEncoderStep._get_mistral_3_prompt_embeds(
            model.text_encoder, model.tokenizer, kw["negative_prompt"], max_sequence_length=MISTRAL_LENGTH,
            system_message=Flux2TextEncoderStep.DEFAULT_SYSTEM_MESSAGE, hidden_states_layers=MISTRAL_LAYERS)
        text_ids = model._prepare_text_ids(embeds)
    else:
        embeds, text_ids = model.encode_prompt(kw["negative_prompt"], device=torch.device("cpu"),
                                               max_sequence_length=16)
    plain_kw = {k: v for k, v in kw.items() if k != "negative_prompt"}
    plain = run_flux2(pipes[f"{name}-stock"], ClassifierFreeGuidance(**CFG_OFF), **plain_kw)
    with apply_flux2_guidance(model.transformer, NegativeGuidance.for_family("flux2", *settings)).set_negative(
            embeds, text_ids):
        by_hand = run_flux2(pipes[f"{name}-stock"], ClassifierFreeGuidance(**CFG_OFF), **plain_kw)
    assert (guided - plain).abs().max() > 1e-3  # the negative prompt acts (tiny model: ≥ 3e-3 on [0, 1])
    assert_close_to_scale(guided, by_hand, what=f"modular guider vs apply_flux2_guidance ({case})")


def test_flux2_klein_base_blocks_take_negative_prompt_under_cfg_too(flux2):
    """diffusers' klein base step encodes "" whatever the call asks; ours the given negative (None: "" as before)."""
    pipes, _ = flux2
    cfg = ClassifierFreeGuidance(guidance_scale=3.0)
    stock_empty = run_flux2(pipes["base-stock"], cfg)
    assert torch.equal(run_flux2(pipes["base"], cfg), stock_empty)
    assert (run_flux2(pipes["base"], cfg, negative_prompt=NEGATIVE) - stock_empty).abs().max() > 1e-3


# ---------------------------------------------------------------- Qwen-Image / FLUX.2 transformers, no pipeline
@pytest.mark.parametrize("family", ["qwenimage", "flux2"])
@pytest.mark.parametrize("guider, mode", [(NASAGuidance(), "nasa"), (NAGGuidance(), "nag")], ids=["nasa", "nag"])
def test_family_defaults_on_the_qwenimage_and_flux2_transformers(qwenimage, flux2, family, guider, mode):
    transformer = qwenimage[1].transformer if family == "qwenimage" else flux2[1]["klein"].transformer
    width = transformer.config.joint_attention_dim
    guider.prepare_inputs({"encoder_hidden_states": (torch.randn(1, 6, width), torch.randn(1, 6, width))})
    with Watch(transformer) as watch:
        guider.prepare_models(transformer)
        (settings,) = {p.guidance for p in transformer.attn_processors.values()}
        guider.cleanup_models(transformer)
        watch.assert_restored()
    assert settings == NegativeGuidance.for_family(family, mode)  # none published: FLUX.1's (α 0.2; 5/2.5/0.25, L2)


@pytest.mark.parametrize("family", ["qwenimage", "flux2"])
def test_the_mask_and_the_text_ids_reach_set_negative(qwenimage, flux2, family):
    """A negative mask / text ids of the wrong length is refused by the handle's `set_negative`, which only sees
    them if the guider forwards the unconditional `encoder_hidden_states_mask` / `txt_ids`; nothing stays installed."""
    transformer = qwenimage[1].transformer if family == "qwenimage" else flux2[1]["klein"].transformer
    width = transformer.config.joint_attention_dim
    pos, neg = torch.randn(1, 6, width), torch.randn(1, 6, width)
    if family == "qwenimage":
        fields = {"encoder_hidden_states_mask": (torch.ones(1, 6), torch.ones(1, 5))}
        match = "negative `prompt_embeds_mask` must be"
    else:
        fields = {"txt_ids": (torch.zeros(1, 6, 4), torch.zeros(1, 5, 4))}
        match = "negative `text_ids` must be"
    guider = NAGGuidance()
    guider.set_state(step=0, num_inference_steps=STEPS, timestep=torch.tensor(1.0))
    guider.prepare_inputs({"encoder_hidden_states": (pos, neg), **fields})
    with Watch(transformer) as watch:
        with pytest.raises(ValueError, match=match):
            guider.prepare_models(transformer)
        watch.assert_restored()
        guider.cleanup_models(transformer)


# ---------------------------------------------------------------- arguments
@pytest.mark.parametrize("make, name", [
    (lambda: NASAGuidance(nasa_scale=float("nan")), "nasa_scale"),
    (lambda: NAGGuidance(nag_scale=0.5), "nag_scale"),
    (lambda: NAGGuidance(nag_tau=0.0), "nag_tau"),
    (lambda: NAGGuidance(nag_alpha=1.5), "nag_alpha"),
    (lambda: NAGGuidance(construction="twice"), "construction"),
    (lambda: NASAGuidance(start=1.0), "start"),
    (lambda: NAGGuidance(start=0.5, stop=0.2), "stop"),
])
def test_bad_arguments_raise_naming_them(make, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        make()


def test_unsupported_denoiser_raises_naming_the_supported_ones():
    guider = NASAGuidance()
    guider.prepare_inputs({"prompt_embeds": (torch.randn(1, 4, 8), torch.randn(1, 4, 8))})
    with pytest.raises(ValueError, match="UNet2DConditionModel.*FluxTransformer2DModel.*got Linear"):
        guider.prepare_models(torch.nn.Linear(2, 2))


def test_config_round_trip(tmp_path):
    guider = NAGGuidance(nag_scale=4.0, nag_alpha=0.3, construction="official", stop=0.5)
    guider.save_pretrained(tmp_path)
    loaded = NAGGuidance.from_pretrained(tmp_path)
    assert (loaded.nag_scale, loaded.nag_tau, loaded.nag_alpha, loaded.construction, loaded._stop) == \
           (4.0, None, 0.3, "official", 0.5)
    assert guider.new(nag_scale=2.0).nag_scale == 2.0


@pytest.mark.parametrize("family", ["sd3", "zimage"])
def test_sd3_and_zimage_denoisers_get_their_joint_route_with_their_defaults(family):
    """The guider's step on an SD3 / Z-Image transformer equals that family's route installed by hand with its
    defaults (core.nag.DEFAULTS: SD3.5's L1 official settings, Z-Image FLUX.1's), and leaves the model plain after."""
    from swiftstep.core.nasa import NegativeGuidance

    from .dit_fixtures.flux_sd3 import build_sd3
    from .dit_fixtures.qwen_family import build_zimage

    g = torch.Generator().manual_seed(0)
    if family == "sd3":
        from swiftstep.pipelines.nasa_joint_sd3 import apply_sd3_guidance as apply_guidance

        model = build_sd3().transformer
        pos, neg = torch.randn(1, 12, 64, generator=g), torch.randn(1, 12, 64, generator=g)
        pooled, neg_pooled = torch.randn(1, 48, generator=g), torch.randn(1, 48, generator=g)
        fields = {"encoder_hidden_states": (pos, neg), "pooled_projections": (pooled, neg_pooled)}
        x = torch.randn(1, 16, 8, 8, generator=g)

        def call():
            return model(hidden_states=x, encoder_hidden_states=pos, pooled_projections=pooled,
                         timestep=torch.tensor([500.0]), return_dict=False)[0]
        negative = (neg, neg_pooled)
    else:
        from swiftstep.pipelines.nasa_joint_zimage import apply_zimage_guidance as apply_guidance

        model = build_zimage().transformer
        pos, neg = [torch.randn(7, 32, generator=g)], [torch.randn(5, 32, generator=g)]
        fields = {"cap_feats": (pos, neg)}
        x = [torch.randn(16, 1, 8, 8, generator=g)]

        def call():
            return model(x, torch.tensor([0.5]), pos, return_dict=False)[0][0]
        negative = (neg,)
    plain = call()
    guider = NAGGuidance()
    (batch,) = guider.prepare_inputs(fields)
    guider.prepare_models(model)
    guided = call()
    guider.cleanup_models(model)
    assert torch.equal(call(), plain) and not torch.equal(guided, plain)
    with apply_guidance(model, NegativeGuidance.for_family(family, "nag")).set_negative(*negative):
        by_hand = call()
    assert torch.equal(guided, by_hand)
