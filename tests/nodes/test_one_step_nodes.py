"""SwiftStepPresetSigmas / SwiftStepOneStepSampler against ComfyUI fakes and the diffusers OneStepPipeline."""

import asyncio

import pytest
import torch

from swiftstep.core.presets import FLOW_PRESETS, PRESETS

from .. import comfy_fakes as fakes
from ..fixtures import gen, load_pipes

PROMPT = "a lighthouse at dusk"


@pytest.fixture
def comfy(monkeypatch):
    return fakes.install(monkeypatch)


@pytest.fixture
def nodes(comfy):
    from swiftstep.nodes import one_step_nodes

    return one_step_nodes


@pytest.fixture(scope="module")
def pipes(models):
    return load_pipes(models)


def patcher_for(pipe, kind=fakes.EPS, config=None):
    embeds, pooled = pipe.encode_prompt([PROMPT])
    added = None
    if pipe.family == "sdxl":
        added = {"text_embeds": pooled, "time_ids": pipe._add_time_ids((32, 32), (0, 0), (32, 32), 1, "cpu",
                                                                       torch.float32)}
    config = config or {"sd1": "SD15", "sd2": "SD20", "sdxl": "SDXL"}[pipe.family]
    base = fakes.FakeBaseModel(pipe.unet, fakes.model_sampling(kind), config, added)
    return fakes.FakeModelPatcher(base), embeds


def run_comfy(nodes, patcher, cond, preset, steps=0, gamma=-1.0, seed=0, callback=None):
    (sigmas,) = nodes.SwiftStepPresetSigmas.execute(patcher, preset, steps).args
    (sampler,) = nodes.SwiftStepOneStepSampler.execute(preset, gamma).args
    latent = torch.zeros(1, 4, 16, 16)
    return fakes.sample_custom(patcher, sampler, sigmas, cond, latent, seed, callback)


@pytest.mark.parametrize("family,preset,steps", [
    ("sd2", "sd-turbo", 1), ("sd2", "sd-turbo", 4), ("sd1", "tcd", 4), ("sd1", "lcm", 2),
    ("sd1", "hyper-sd-lora", 4), ("sdxl", "dmd2-sdxl-4step", 0), ("sdxl", "dmd2-sdxl-1step", 0),
    ("sdxl", "sdxl-turbo", 2), ("sdxl", "nitrofusion-realism", 4), ("sdxl", "hyper-sd-lora-1step", 3),
])
def test_comfy_sampling_equals_the_diffusers_pipeline(nodes, pipes, family, preset, steps):
    pipe = pipes[family]
    patcher, embeds = patcher_for(pipe)
    got = run_comfy(nodes, patcher, embeds, preset, steps, seed=5)
    ref = pipe(PROMPT, preset=preset, num_inference_steps=steps or None, generator=gen(5),
               output_type="latent").images
    err = (got - ref).abs().max().item()
    assert err <= 1e-4 * max(1.0, ref.abs().max().item()), err


def test_gamma_override_equals_pipeline_gamma(nodes, pipes):
    pipe = pipes["sd1"]
    patcher, embeds = patcher_for(pipe)
    got = run_comfy(nodes, patcher, embeds, "lcm", 4, gamma=0.5, seed=1)
    ref = pipe(PROMPT, preset="lcm", num_inference_steps=4, gamma=0.5, generator=gen(1), output_type="latent").images
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_preset_sigmas_are_the_models_own(nodes, pipes):
    patcher, _ = patcher_for(pipes["sdxl"])
    (sigmas,) = nodes.SwiftStepPresetSigmas.execute(patcher, "dmd2-sdxl-4step", 0).args
    ms = patcher.get_model_object("model_sampling")
    torch.testing.assert_close(sigmas, torch.cat([ms.sigma(torch.tensor([999.0, 749, 499, 249])), torch.zeros(1)]))
    (one,) = nodes.SwiftStepPresetSigmas.execute(patcher, "dmd2-sdxl-1step", 0).args
    assert one.shape == (2,) and ms.timestep(one[:1]).item() == 399


def test_progress_callback_per_step_and_interrupt(nodes, pipes, comfy):
    pipe = pipes["sd1"]
    patcher, embeds = patcher_for(pipe)
    seen = []
    run_comfy(nodes, patcher, embeds, "tcd", 4, callback=lambda i, x0, x, total: seen.append((i, total)))
    assert seen == [(0, 4), (1, 4), (2, 4), (3, 4)]
    fakes.INTERRUPT["flag"] = True
    with pytest.raises(fakes.InterruptProcessingException):
        run_comfy(nodes, patcher, embeds, "tcd", 4)


def test_x0_preset_on_an_eps_model_names_node_input_and_fitting_presets(nodes, pipes):
    patcher, _ = patcher_for(pipes["sdxl"])
    with pytest.raises(ValueError, match=r"SwiftStepPresetSigmas: input `preset` = 'sdxl-lightning-1step' needs a "
                                         r"sample model.*samples as epsilon. Presets that fit it: \['sd-turbo'"):
        nodes.SwiftStepPresetSigmas.execute(patcher, "sdxl-lightning-1step", 0)
    x0_patcher, _ = patcher_for(pipes["sdxl"], kind=fakes.X0)
    nodes.SwiftStepPresetSigmas.execute(x0_patcher, "sdxl-lightning-1step", 0)  # fits once sampling is x0


def test_family_mismatch_and_bad_steps(nodes, pipes):
    patcher, _ = patcher_for(pipes["sd1"])
    with pytest.raises(ValueError, match=r"SwiftStepPresetSigmas: input `preset` = 'dmd2-sdxl-4step' is for SDXL "
                                         r"models; this MODEL is SD1.x"):
        nodes.SwiftStepPresetSigmas.execute(patcher, "dmd2-sdxl-4step", 0)
    with pytest.raises(ValueError, match=r"SwiftStepPresetSigmas: input `steps`: .*supports num_inference_steps"):
        nodes.SwiftStepPresetSigmas.execute(patcher, "hyper-sd-lora", 3)


def test_unsupported_step_count_fails_validation_before_the_run(nodes):
    v = nodes.SwiftStepPresetSigmas.validate_inputs
    assert v(preset="dmd2-sdxl-4step", steps=0) is True and v(preset="tcd", steps=8) is True
    assert v(preset="dmd2-sdxl-4step", steps=2) == (
        "SwiftStepPresetSigmas: input `steps` = 2 does not fit preset 'dmd2-sdxl-4step'; allowed: 0 (the preset's "
        "default, 4) or [4].")


def test_sigmas_outside_the_model_range_are_rejected(nodes, pipes):
    patcher, embeds = patcher_for(pipes["sd1"])
    (sampler,) = nodes.SwiftStepOneStepSampler.execute("tcd", -1.0).args
    with pytest.raises(ValueError, match=r"SwiftStepOneStepSampler: input `sigmas` must lie in the model's range"):
        fakes.sample_custom(patcher, sampler, torch.tensor([80.0, 0.0]), embeds, torch.zeros(1, 4, 16, 16), 0)


def test_entrypoint_registers_every_node_with_tooltips(comfy):
    import swiftstep

    extension = asyncio.run(swiftstep.comfy_entrypoint())
    node_list = asyncio.run(extension.get_node_list())
    ids = [n.define_schema().node_id for n in node_list]
    assert ids == ["SwiftStepPresetSigmas", "SwiftStepOneStepSampler", "SwiftStepNASA", "SwiftStepTritonAttention",
                   "SwiftStepFastPath", "SwiftStepSRLoader", "SwiftStepUpscale", "SwiftStepUpscaleV2",
                   "SwiftStepVideoUpscale", "SwiftStepMARLoader", "SwiftStepMARSample", "SwiftStepSanaSprintLoader",
                   "SwiftStepSanaSprintSampler"]
    for node in node_list:
        schema = node.define_schema()
        assert schema.node_id.startswith("SwiftStep") and schema.category.startswith("swiftstep/")
        for spec in schema.inputs:
            assert spec.kwargs["tooltip"], (schema.node_id, spec.id)
            if spec.io_type in ("INT", "FLOAT"):
                k = spec.kwargs
                assert k["min"] <= k["default"] <= k["max"], (schema.node_id, spec.id)
            if spec.io_type == "COMBO":
                assert spec.kwargs["default"] in spec.kwargs["options"]


def test_rectified_flow_unet_presets_are_not_offered_in_comfyui(nodes):
    assert "instaflow" not in nodes.COMFY_PRESETS
    assert set(nodes.COMFY_PRESETS) == {n for n, p in PRESETS.items() if p.schedule == "vp"}


# --------------------------------------------------------------------------- flow-matching DiT presets


def flow_patcher(config="FluxSchnell", shift=1.0, multiplier=1.0):
    """A ComfyUI flow MODEL (CONST sampling) of the given model config class; the σ node never runs the network."""
    return fakes.FakeModelPatcher(fakes.FakeBaseModel(None, fakes.flow_model_sampling(shift, multiplier), config))


def preset_sigmas(nodes, patcher, preset, steps=0, **size):
    (sigmas,) = nodes.SwiftStepPresetSigmas.execute(patcher, preset, steps, **size).args
    return sigmas


def test_combos_offer_dit_presets_only_for_sigmas(nodes):
    schemas = {n.define_schema().node_id: n.define_schema() for n in nodes.NODES}
    combo = {s.id: s.kwargs["options"] for s in schemas["SwiftStepPresetSigmas"].inputs if s.io_type == "COMBO"}
    flow = [n for n, p in FLOW_PRESETS.items() if n != "sana-sprint"]
    assert combo["preset"] == nodes.COMFY_PRESETS + flow  # UNet presets first, in their old order
    sampler = [s for s in schemas["SwiftStepOneStepSampler"].inputs if s.io_type == "COMBO"][0]
    assert sampler.kwargs["options"] == nodes.COMFY_PRESETS
    size = {s.id: s.kwargs for s in schemas["SwiftStepPresetSigmas"].inputs if s.id in ("width", "height")}
    assert all(k["optional"] and k["default"] == 1024 and k["step"] == 16 for k in size.values())


@pytest.mark.parametrize("config,preset,steps", [
    ("FluxSchnell", "flux-schnell", 1), ("FluxSchnell", "flux-schnell", 0), ("Flux", "flux-schnell", 2),
    ("FluxInpaint", "flux-schnell", 3), ("SD3", "sd35-large-turbo", 0), ("ZImage", "zimage-turbo", 8),
    ("QwenImage", "qwen-image-lightning-4step", 0), ("QwenImage", "qwen-image-lightning-8step", 8),
    ("Flux2", "flux2-klein", 4),
])
def test_flow_preset_sigmas_are_the_presets_grid(nodes, config, preset, steps):
    got = preset_sigmas(nodes, flow_patcher(config), preset, steps, width=768, height=512)
    ref = FLOW_PRESETS[preset].sigmas(steps or None, image_seq_len=(512 // 16) * (768 // 16))
    assert got.dtype == torch.float32 and got.device.type == "cpu"
    assert torch.equal(got, ref.float())
    assert len(got) == (steps or FLOW_PRESETS[preset].default_steps) + 1 and got[-1] == 0


def test_flux_schnell_sigmas_are_the_plain_grid(nodes):
    """FLUX.1-schnell samples the plain grid linspace(1, 1/n, n), unshifted (black-forest-labs/flux cli.py)."""
    flux = preset_sigmas(nodes, flow_patcher("FluxSchnell"), "flux-schnell", 4)
    torch.testing.assert_close(flux, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))


def test_flux2_klein_sigmas_follow_the_image_size(nodes):
    patcher = flow_patcher("Flux2")
    small = preset_sigmas(nodes, patcher, "flux2-klein", 4, width=512, height=512)
    large = preset_sigmas(nodes, patcher, "flux2-klein", 4, width=1024, height=1024)
    wide = preset_sigmas(nodes, patcher, "flux2-klein", 4, width=1024, height=512)
    assert (small[1:-1] < large[1:-1]).all() and (small[1:-1] < wide[1:-1]).all() and (wide[1:-1] < large[1:-1]).all()
    assert torch.equal(wide, FLOW_PRESETS["flux2-klein"].sigmas(4, image_seq_len=64 * 32).float())
    assert torch.equal(preset_sigmas(nodes, patcher, "flux2-klein"), large)  # widgets missing (old API prompts): 1024²
    flux = flow_patcher("FluxSchnell")  # a preset with a fixed grid ignores the size
    assert torch.equal(preset_sigmas(nodes, flux, "flux-schnell", 4, width=512, height=256),
                       preset_sigmas(nodes, flux, "flux-schnell", 4, width=2048, height=2048))


def test_unet_presets_ignore_width_and_height(nodes, pipes):
    patcher, _ = patcher_for(pipes["sdxl"])
    assert torch.equal(preset_sigmas(nodes, patcher, "dmd2-sdxl-4step", 0, width=512, height=256),
                       preset_sigmas(nodes, patcher, "dmd2-sdxl-4step", 0))


def test_wrong_family_combos_name_node_input_family_and_fitting_presets(nodes, pipes):
    with pytest.raises(ValueError, match=r"SwiftStepPresetSigmas: input `preset` = 'sd-turbo' is for SD/SDXL UNets; "
                                         r"this MODEL is FLUX.1 \(flow matching\). Presets that fit it: "
                                         r"\['flux-schnell'\]"):
        preset_sigmas(nodes, flow_patcher("FluxSchnell"), "sd-turbo")
    with pytest.raises(ValueError, match=r"SwiftStepPresetSigmas: input `preset` = 'flux-schnell' is for FLUX.1 "
                                         r"models; this MODEL is SD3/SD3.5. Presets that fit it: "
                                         r"\['sd35-large-turbo'\]"):
        preset_sigmas(nodes, flow_patcher("SD3", 3.0, 1000), "flux-schnell")
    with pytest.raises(ValueError, match=r"input `preset` = 'flux2-klein' is for FLUX.2 models; this MODEL is "
                                         r"FLUX.1. Presets that fit it: \['flux-schnell'\]"):
        preset_sigmas(nodes, flow_patcher("Flux"), "flux2-klein")
    with pytest.raises(ValueError, match=r"input `preset` = 'zimage-turbo' is for Z-Image models; this MODEL is a "
                                         r"ComfyUI `Lumina2` model. Presets that fit it: none"):
        preset_sigmas(nodes, flow_patcher("Lumina2", 6.0), "zimage-turbo")
    unet, _ = patcher_for(pipes["sd1"])
    with pytest.raises(ValueError, match=r"SwiftStepPresetSigmas: input `preset` = 'zimage-turbo' is for Z-Image "
                                         r"\(flow matching\) models, but this MODEL is SD1.x and samples as "
                                         r"epsilon. Presets that fit it: \['sd-turbo'"):
        preset_sigmas(nodes, unet, "zimage-turbo")


def test_flow_preset_step_count_is_checked(nodes):
    v = nodes.SwiftStepPresetSigmas.validate_inputs
    assert v(preset="flux-schnell", steps=3) is True and v(preset="zimage-turbo", steps=0) is True
    assert v(preset="flux2-klein", steps=2) == (
        "SwiftStepPresetSigmas: input `steps` = 2 does not fit preset 'flux2-klein'; allowed: 0 (the preset's "
        "default, 4) or [4].")
    assert "allowed: 0 (the preset's default, 8) or [8]" in v(preset="zimage-turbo", steps=4)
    with pytest.raises(ValueError, match=r"SwiftStepPresetSigmas: input `steps`: .*supports num_inference_steps in "
                                         r"\[4\], got 2"):
        preset_sigmas(nodes, flow_patcher("SD3", 3.0, 1000), "sd35-large-turbo", 2)
