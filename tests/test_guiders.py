"""`swiftstep.guiders`: NASA/NAG as diffusers guiders in the modular pipelines of SDXL (`StableDiffusionXLAutoBlocks`
as diffusers ships them) and FLUX.1 (`flux_guided_blocks()`), on tiny random models.

References: the same pipeline with no guidance (a CFG guider at scale 1, which runs the conditional pass only) while
our processors are installed by hand for the whole run (`nasa_processor.nasa_attention` on the UNet,
`nasa_joint.apply_joint_guidance` on the FLUX transformer), with the negative prompt encoded by the non-modular
routes (`OneStepPipeline.encode_prompt`, `FluxPipeline.encode_prompt`)."""

import pytest
import torch
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.guiders.guider_utils import GuiderOutput
from diffusers.modular_pipelines import FluxAutoBlocks, StableDiffusionXLAutoBlocks
from diffusers.modular_pipelines.flux.denoise import FluxLoopDenoiser

from swiftstep.core.nasa import NegativeGuidance
from swiftstep.guiders import FluxGuidedLoopDenoiser, NAGGuidance, NASAGuidance, flux_guided_blocks
from swiftstep.pipelines import OneStepPipeline
from swiftstep.pipelines.nasa_joint import apply_joint_guidance
from swiftstep.pipelines.nasa_processor import NASAAttnProcessor, nasa_attention
from swiftstep.tiny_models import build_components

from .dit_fixtures.flux_sd3 import build_flux
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
        self.patched.append(bool(names - {"AttnProcessor2_0", "FluxAttnProcessor"}))

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
    assert guider._negative == (state.negative_prompt_embeds, state.negative_pooled_prompt_embeds)


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
    pipes, stock = flux
    plain = run_flux(pipes["stock"])
    with Watch(stock.transformer) as watch:
        assert torch.equal(run_flux(pipes["guided"], ClassifierFreeGuidance(guidance_scale=1.0)), plain)
        guided = run_flux(pipes["guided"], guider, negative_prompt=NEGATIVE)
        assert watch.calls == 2 * STEPS and watch.patched == [False] * STEPS + [True] * STEPS
        watch.assert_restored()
        assert (guided - plain).abs().max() > 1e-3  # tiny model: NAG ~5e-3, NASA ~3e-3 on [0, 1]
        assert torch.equal(run_flux(pipes["guided"], off, negative_prompt=NEGATIVE), plain)
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
