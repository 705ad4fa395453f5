"""`load_one_step` on tiny DiT folders gives the stock diffusers pipeline's image under the model card's settings,
infers the preset where the folder leaves no doubt, and refuses combinations that would sample the wrong recipe."""

import math

import pytest
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler

from swiftstep.pipelines import DistilledDiTPipeline, OneStepPipeline, load_one_step

from ..dit_fixtures import write_folder
from ..tolerance import assert_close_to_scale

PROMPT = "a lighthouse at dusk"
SIZE = {"flux": 32, "flux2": 32, "sd3": 32, "zimage": 32, "qwenimage": 32, "sana-sprint": 32}

# ModelTC/Qwen-Image-Lightning generate_with_diffusers.py L82–97: the scheduler its README runs the LoRA with
LIGHTNING_SCHEDULER = dict(base_image_seq_len=256, base_shift=math.log(3), invert_sigmas=False, max_image_seq_len=8192,
                           max_shift=math.log(3), num_train_timesteps=1000, shift=1.0, shift_terminal=None,
                           stochastic_sampling=False, time_shift_type="exponential", use_beta_sigmas=False,
                           use_dynamic_shifting=True, use_exponential_sigmas=False, use_karras_sigmas=False)

# preset → (family, steps, the stock call the model card prescribes, with the folder's own scheduler)
CARDS = [
    ("flux-schnell", "flux", 4, dict(guidance_scale=0.0, max_sequence_length=256)),
    ("flux-schnell", "flux", 1, dict(guidance_scale=0.0, max_sequence_length=256)),
    ("flux2-klein", "flux2", 4, dict(guidance_scale=1.0)),
    ("zimage-turbo", "zimage", 8, dict(guidance_scale=0.0)),
    ("sd35-large-turbo", "sd3", 4, dict(guidance_scale=0.0)),
    ("qwen-image-lightning-4step", "qwenimage", 4, dict(true_cfg_scale=1.0)),
    ("qwen-image-lightning-8step", "qwenimage", 8, dict(true_cfg_scale=1.0)),
    ("sana-sprint", "sana-sprint", 2, dict()),  # the stock defaults: max 1.5708, intermediate 1.3, guidance 4.5
    ("sana-sprint", "sana-sprint", 4, dict(intermediate_timesteps=None)),
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("dits")
    return {family: write_folder(family, root) for family in SIZE}


@pytest.fixture(scope="module")
def lightning_lora(tmp_path_factory, folders):
    """A random LoRA on every attention projection of the Qwen-Image transformer, written by diffusers' own LoRA
    writer (`save_lora_weights`: `transformer.….lora_A/B.weight`)."""
    from diffusers import QwenImagePipeline
    from diffusers.models import QwenImageTransformer2DModel

    transformer = QwenImageTransformer2DModel.from_pretrained(folders["qwenimage"], subfolder="transformer")
    g = torch.Generator().manual_seed(1)
    layers = {}
    for name, module in transformer.named_modules():
        if name.endswith(("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj")):
            layers[f"{name}.lora_A.weight"] = torch.randn(4, module.in_features, generator=g) * 0.05
            layers[f"{name}.lora_B.weight"] = torch.randn(module.out_features, 4, generator=g) * 0.05
    path = tmp_path_factory.mktemp("lora")
    QwenImagePipeline.save_lora_weights(path, transformer_lora_layers=layers, weight_name="lightning.safetensors")
    return path / "lightning.safetensors"


def run(pipe, output_type, steps, seed=0, **kw):
    size = SIZE[pipe.family]
    if pipe.family == "sana-sprint":  # the stock default bins 32 px up to 1024² and back: correct, but slow
        kw.setdefault("use_resolution_binning", False)
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt=PROMPT, height=size, width=size, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                output_type=output_type, **kw).images


def stock_for(preset, family, folder, lora):
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.family = family
    if preset.startswith("qwen-image-lightning"):
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(**LIGHTNING_SCHEDULER)
        pipe.load_lora_weights(str(lora))
    return pipe


@pytest.mark.parametrize("preset,family,steps,card", CARDS, ids=[f"{c[0]}-{c[2]}" for c in CARDS])
def test_load_one_step_equals_the_stock_pipeline_with_the_card_settings(folders, lightning_lora, preset, family, steps,
                                                                        card):
    lora = lightning_lora if preset.startswith("qwen-image-lightning") else None
    ours = load_one_step(folders[family], preset=preset, lora=lora)
    assert isinstance(ours, DistilledDiTPipeline) and ours.preset.name == preset
    stock = stock_for(preset, family, folders[family], lightning_lora)
    for output_type in ("latent", "pt"):
        expected = run(stock, output_type, steps, **card)
        got = run(ours, output_type, steps)
        assert torch.isfinite(got).all() and got.shape == expected.shape
        assert_close_to_scale(got, expected, rel=1e-5)
    # the folder's scheduler is untouched: a later stock call still samples its own recipe
    assert type(ours.scheduler).__name__ == type(stock.scheduler).__name__


def test_the_preset_recipe_is_not_the_folder_scheduler_default(folders):
    """Z-Image through diffusers' default `num_inference_steps=9` (the card's number) samples 9 evaluations on
    another grid; the preset gives the official 8."""
    ours = load_one_step(folders["zimage"], preset="zimage-turbo")
    calls = []
    ours.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    run(ours, "latent", None)
    assert len(calls) == 8


def test_explicit_sigmas_and_timesteps_are_used_as_given(folders):
    ours = load_one_step(folders["flux"])
    stock = DiffusionPipeline.from_pretrained(folders["flux"])  # FLUX.1-schnell's scheduler: shift 1, no dynamic μ
    stock.family = "flux"
    expected = run(stock, "latent", None, sigmas=[1.0, 0.6, 0.2], guidance_scale=0.0, max_sequence_length=256)
    assert_close_to_scale(run(ours, "latent", None, sigmas=[1.0, 0.6, 0.2]), expected, rel=1e-6)
    assert_close_to_scale(run(ours, "latent", None, timesteps=[1000, 600, 200]), expected, rel=1e-6)
    with pytest.raises(ValueError, match="strictly decreasing"):
        run(ours, "latent", None, sigmas=[0.5, 0.9])
    with pytest.raises(ValueError, match="`timesteps` or `sigmas`, not both"):
        run(ours, "latent", None, sigmas=[1.0], timesteps=[1000])


def test_latents_seed_and_callback_behave_as_in_diffusers(folders):
    ours = load_one_step(folders["sd3"], preset="sd35-large-turbo")
    a, b = run(ours, "latent", None, seed=3), run(ours, "latent", None, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, run(ours, "latent", None, seed=4))
    z = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(5))
    stock = DiffusionPipeline.from_pretrained(folders["sd3"])
    stock.family = "sd3"
    assert_close_to_scale(run(ours, "latent", None, latents=z),
                          run(stock, "latent", 4, latents=z, guidance_scale=0.0), rel=1e-5)
    seen = []

    def callback(pipe, i, t, kwargs):
        seen.append(float(t))
        return kwargs

    run(ours, "latent", None, callback_on_step_end=callback)
    assert len(seen) == 4 and seen[0] == 1000.0
    with pytest.raises(ValueError, match="`latents` must be finite unit Gaussian noise, got 1 NaN"):
        run(ours, "latent", None, latents=z.index_put((torch.tensor([0]),) * 4, torch.tensor(float("nan"))))


def test_presets_are_inferred_only_where_the_folder_is_unambiguous(folders):
    assert load_one_step(folders["flux"]).preset.name == "flux-schnell"  # no guidance embedding: schnell
    assert load_one_step(folders["flux2"]).preset.name == "flux2-klein"  # model_index is_distilled: true
    assert load_one_step(folders["sana-sprint"]).preset.name == "sana-sprint"
    for family, fitting in (("zimage", "zimage-turbo"), ("sd3", "sd35-large-turbo"),
                            ("qwenimage", "qwen-image-lightning-4step, qwen-image-lightning-8step")):
        with pytest.raises(ValueError, match=rf"does not say which distilled variant.*one of: {fitting}\)"):
            load_one_step(folders[family])


def test_wrong_combinations_name_what_fits(folders, models):
    with pytest.raises(ValueError, match=r"'flux-schnell' is for FLUX.1 \(FluxPipeline\), but this "
                                         r"StableDiffusion3Pipeline is SD3/SD3.5; presets that fit: sd35-large-turbo"):
        load_one_step(folders["sd3"], preset="flux-schnell")
    with pytest.raises(ValueError, match=r"'sd-turbo' is for SD/SDXL UNets, .* presets that fit: flux-schnell"):
        load_one_step(folders["flux"], preset="sd-turbo")
    with pytest.raises(ValueError, match=r"'zimage-turbo' is for Z-Image \(ZImagePipeline\), but .* UNet folder"):
        load_one_step(models["sd2"]["folder"], preset="zimage-turbo")
    with pytest.raises(ValueError, match=r"'qwen-image-lightning-4step' needs its LoRA \(lightx2v/Qwen-Image-Lightning"):
        run(load_one_step(folders["qwenimage"], preset="qwen-image-lightning-4step"), "latent", None)
    sprint = load_one_step(folders["sana-sprint"])
    with pytest.raises(ValueError, match=r"'sana-sprint' supports num_inference_steps in \[1, 2, 3, 4\], got 6"):
        run(sprint, "latent", 6)
    with pytest.raises(ValueError, match=r"`intermediate_timesteps` \(1.3\) exists only for 2-step sampling"):
        run(sprint, "latent", 4, intermediate_timesteps=1.3)
    with pytest.raises(ValueError, match=r"'zimage-turbo' supports num_inference_steps in \[8\], got 9"):
        run(load_one_step(folders["zimage"], preset="zimage-turbo"), "latent", 9)
    with pytest.raises(ValueError, match=r"`guidance` must be one of \('nasa', 'nag'\), got 'cfg'"):
        run(load_one_step(folders["flux2"]), "latent", None, negative_prompt="blurry", guidance="cfg")


def test_sd35_negative_prompt_is_the_sd3_handle_applied_for_the_call(folders):
    """NAG with SD3.5's official settings (L1 ratio, α 0.125), installed for the call only; scale 1 is the plain
    image. (FLUX.1: tests/pipelines/test_joint_guidance_flux.py; the construction: test_joint_guidance_sd3.py.)"""
    from swiftstep.core.nasa import NegativeGuidance
    from swiftstep.pipelines.nasa_joint_sd3 import apply_sd3_guidance

    pipe = load_one_step(folders["sd3"], preset="sd35-large-turbo")
    plain = run(pipe, "latent", None)
    guided = run(pipe, "latent", None, negative_prompt="blurry")
    assert not torch.equal(guided, plain) and torch.equal(run(pipe, "latent", None), plain)  # removed after the call
    assert torch.equal(run(pipe, "latent", None, negative_prompt="blurry", nag_scale=1.0), plain)
    embeds, _, pooled, _ = pipe.encode_prompt("blurry", None, None, do_classifier_free_guidance=False)
    with apply_sd3_guidance(pipe.transformer, NegativeGuidance.for_family("sd3", "nag")).set_negative(embeds, pooled):
        by_hand = run(pipe, "latent", None)
    assert torch.equal(guided, by_hand)


def test_unet_folders_still_load_as_one_step_pipelines(models):
    pipe = load_one_step(models["sd2"]["folder"], preset="sd-turbo")
    assert isinstance(pipe, OneStepPipeline) and pipe.resolve_preset(None).name == "sd-turbo"


def test_not_a_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model_index.json: not found"):
        load_one_step(tmp_path)
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"model_index.json: expected a diffusers JSON config"):
        load_one_step(tmp_path)


def test_zimage_negative_prompt_is_the_zimage_handle_applied_for_the_call(folders):
    from swiftstep.core.nasa import NegativeGuidance
    from swiftstep.pipelines.nasa_joint_zimage import apply_zimage_guidance

    pipe = load_one_step(folders["zimage"], preset="zimage-turbo")
    plain = run(pipe, "latent", None)
    guided = run(pipe, "latent", None, negative_prompt="blurry", guidance="nasa")
    assert not torch.equal(guided, plain) and torch.equal(run(pipe, "latent", None), plain)
    assert torch.equal(run(pipe, "latent", None, negative_prompt="blurry", nasa_scale=0.0, guidance="nasa"), plain)
    embeds, _ = pipe.encode_prompt(prompt=["blurry"], do_classifier_free_guidance=False)
    with apply_zimage_guidance(pipe.transformer, NegativeGuidance.for_family("zimage", "nasa")).set_negative(embeds):
        by_hand = run(pipe, "latent", None)
    assert torch.equal(guided, by_hand)


def test_sana_sprint_negative_prompt_uses_the_cross_attention_processors(folders):
    """SANA has text cross-attention: NASA/NAG there is SNOOPI's own setting (α 0.5 for SANA), the negative prompt
    encoded as the positive one is (the call's Gemma instruction)."""
    import inspect

    from swiftstep.core.nasa import NegativeGuidance
    from swiftstep.pipelines.nasa_processor import apply_guidance

    pipe = load_one_step(folders["sana-sprint"])
    plain = run(pipe, "latent", None)
    guided = run(pipe, "latent", None, negative_prompt="blurry", guidance="nasa")
    assert not torch.equal(guided, plain) and torch.equal(run(pipe, "latent", None), plain)
    assert torch.equal(run(pipe, "latent", None, negative_prompt="blurry", guidance="nasa", nasa_scale=0.0), plain)
    instruction = inspect.signature(pipe.pipe.__call__).parameters["complex_human_instruction"].default
    embeds, mask = pipe.encode_prompt(["blurry"], complex_human_instruction=instruction)
    handle = apply_guidance(pipe.transformer, NegativeGuidance.for_family("sana", "nasa")).set_negative(embeds, mask)
    try:
        by_hand = run(pipe, "latent", None)
    finally:
        handle.remove()
    assert torch.equal(guided, by_hand)


def test_qwen_image_negative_prompt_is_the_qwen_handle_applied_for_the_call(folders, lightning_lora):
    from swiftstep.core.nasa import NegativeGuidance
    from swiftstep.pipelines.nasa_joint_qwenimage import apply_qwenimage_guidance

    pipe = load_one_step(folders["qwenimage"], preset="qwen-image-lightning-4step", lora=lightning_lora)
    plain = run(pipe, "latent", None)
    guided = run(pipe, "latent", None, negative_prompt="blurry, watermark")
    assert not torch.equal(guided, plain) and torch.equal(run(pipe, "latent", None), plain)
    assert torch.equal(run(pipe, "latent", None, negative_prompt="blurry", nag_scale=1.0), plain)
    embeds, mask = pipe.encode_prompt("blurry, watermark")
    with apply_qwenimage_guidance(pipe.transformer, NegativeGuidance.for_family("qwenimage", "nag")).set_negative(
            embeds, mask):
        by_hand = run(pipe, "latent", None)
    assert torch.equal(guided, by_hand)


def test_every_family_takes_a_negative_prompt():
    from swiftstep.pipelines.pipeline_distilled_dit import NEGATIVE_PROMPT_ROUTES, PIPELINE_FAMILIES

    assert set(NEGATIVE_PROMPT_ROUTES) == set(PIPELINE_FAMILIES.values())


def test_flux2_klein_negative_prompt_is_the_flux2_handle_applied_for_the_call(folders):
    from swiftstep.core.nasa import NegativeGuidance
    from swiftstep.pipelines.nasa_joint_flux2 import apply_flux2_guidance

    pipe = load_one_step(folders["flux2"])
    plain = run(pipe, "latent", None)
    guided = run(pipe, "latent", None, negative_prompt="blurry, watermark")
    assert not torch.equal(guided, plain) and torch.equal(run(pipe, "latent", None), plain)
    assert torch.equal(run(pipe, "latent", None, negative_prompt="blurry", nag_scale=1.0), plain)
    embeds, text_ids = pipe.encode_prompt("blurry, watermark")
    with apply_flux2_guidance(pipe.transformer, NegativeGuidance.for_family("flux2", "nag")).set_negative(embeds,
                                                                                                       text_ids):
        by_hand = run(pipe, "latent", None)
    assert torch.equal(guided, by_hand)
