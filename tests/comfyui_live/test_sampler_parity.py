"""In a real ComfyUI: SwiftStepPresetSigmas + SwiftStepOneStepSampler through comfy.sample.sample_custom give the
same latents as OneStepPipeline for the same tiny model, seed and preset (≤ 1e-4)."""

import asyncio

import pytest
import torch

from swiftstep.pipelines import OneStepPipeline
from swiftstep.tiny_models import build_components

from ..ldm_layout import unet_to_ldm

PROMPT = "a lighthouse at dusk"


def comfy_model(comfy, pipe):
    """Our diffusers UNet in the original layout, loaded by ComfyUI's own model detection and loader."""
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.supported_models

    sd = {k.removeprefix("model.diffusion_model."): v for k, v in
          unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config.layers_per_block).items()}
    unet_config = comfy.model_detection.detect_unet_config(sd, "")
    config_cls = {"sd1": comfy.supported_models.SD15, "sd2": comfy.supported_models.SD20}[pipe.family]
    model_config = config_cls(unet_config)
    # diffusers' `attention_head_dim` counts heads per level; ComfyUI takes a constant head width instead
    head_width = pipe.unet.config.block_out_channels[0] // pipe.unet.config.attention_head_dim[0]
    model_config.unet_config.update({"num_heads": -1, "num_head_channels": head_width})
    model = model_config.get_model(sd, "", device="cpu")
    model.load_model_weights(sd, "")
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


@pytest.fixture(scope="module")
def nodes(comfy_inprocess):
    import swiftstep
    from swiftstep.nodes import one_step_nodes

    assert asyncio.run(asyncio.run(swiftstep.comfy_entrypoint()).get_node_list())
    return one_step_nodes


@pytest.mark.parametrize("family,preset,steps", [
    ("sd2", "sd-turbo", 1), ("sd2", "sd-turbo", 4), ("sd1", "tcd", 4), ("sd1", "lcm", 4),
    ("sd1", "hyper-sd-lora-1step", 2), ("sd1", "hyper-sd-lora", 8),
])
def test_comfyui_sampling_equals_onestep_pipeline(comfy_inprocess, nodes, family, preset, steps):
    import comfy.sample

    pipe = OneStepPipeline(**build_components(family))
    pipe.set_progress_bar_config(disable=True)
    patcher = comfy_model(comfy_inprocess, pipe)
    embeds, _ = pipe.encode_prompt([PROMPT])

    (sigmas,) = nodes.SwiftStepPresetSigmas.execute(patcher, preset, steps).args
    (sampler,) = nodes.SwiftStepOneStepSampler.execute(preset, -1.0).args
    latent = torch.zeros(1, 4, 16, 16)
    seed = 11
    noise = comfy.sample.prepare_noise(latent, seed)
    cond = [[embeds, {}]]
    out = comfy.sample.sample_custom(patcher, noise, 1.0, sampler, sigmas, cond, cond, latent, disable_pbar=True,
                                     seed=seed)
    got = patcher.model.latent_format.process_in(out)  # ComfyUI returns latents divided by the VAE scale factor

    ref = pipe(prompt_embeds=embeds, preset=preset, num_inference_steps=steps,
               generator=torch.Generator().manual_seed(seed), output_type="latent").images
    err = (got - ref).abs().max().item()
    assert err <= 1e-4 * max(1.0, ref.abs().max().item()), err


def _sample(patcher, nodes, embeds, preset, steps, seed):
    import comfy.sample

    (sigmas,) = nodes.SwiftStepPresetSigmas.execute(patcher, preset, steps).args
    (sampler,) = nodes.SwiftStepOneStepSampler.execute(preset, -1.0).args
    latent = torch.zeros(1, 4, 16, 16)
    cond = [[embeds, {}]]
    out = comfy.sample.sample_custom(patcher, comfy.sample.prepare_noise(latent, seed), 1.0, sampler, sigmas, cond,
                                     cond, latent, disable_pbar=True, seed=seed)
    return patcher.model.latent_format.process_in(out)


@pytest.mark.parametrize("mode", ["nasa", "nag"])
def test_comfyui_nasa_node_equals_pipeline_negative_prompt(comfy_inprocess, nodes, mode):
    from swiftstep.nodes import nasa_nodes

    pipe = OneStepPipeline(**build_components("sd1"))
    pipe.set_progress_bar_config(disable=True)
    patcher = comfy_model(comfy_inprocess, pipe)
    embeds, _ = pipe.encode_prompt([PROMPT])
    negative, _ = pipe.encode_prompt(["blurry, watermark, extra fingers"])
    options_before = repr(patcher.model_options)

    settings = dict(nasa_scale=0.3, nag_scale=3.0, nag_tau=2.5, nag_alpha=0.5)
    (patched,) = nasa_nodes.SwiftStepNASA.execute(patcher, [[negative, {}]], mode, **settings).args
    got = _sample(patched, nodes, embeds, "tcd", 4, seed=3)
    ref = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, guidance=mode, preset="tcd",
               num_inference_steps=4, generator=torch.Generator().manual_seed(3), output_type="latent", **settings).images
    assert (got - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())

    plain = _sample(patcher, nodes, embeds, "tcd", 4, seed=3)
    assert (got - plain).abs().max() > 1e-3  # the negative prompt did something
    assert repr(patcher.model_options) == options_before  # the input MODEL is untouched
    (off,) = nasa_nodes.SwiftStepNASA.execute(patcher, [[negative, {}]], mode, 0.0, 1.0, 2.5, 0.5).args
    assert torch.equal(_sample(off, nodes, embeds, "tcd", 4, seed=3), plain)  # zero strength: bit-identical


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_triton_attention_node_keeps_the_latents(comfy_inprocess, nodes, backend, monkeypatch):
    """auto on CPU leaves ComfyUI's attention in place (bit-identical); triton runs every attention through the
    kernel (here Triton's CPU interpreter) and agrees to float rounding."""
    from swiftstep.attention_kernels import last_path
    from swiftstep.nodes import attention_nodes

    pipe = OneStepPipeline(**build_components("sd1"))
    patcher = comfy_model(comfy_inprocess, pipe)
    embeds, _ = pipe.encode_prompt([PROMPT])
    plain = _sample(patcher, nodes, embeds, "lcm", 2, seed=4)
    (patched,) = attention_nodes.SwiftStepTritonAttention.execute(patcher, backend).args
    got = _sample(patched, nodes, embeds, "lcm", 2, seed=4)
    assert "optimized_attention_override" not in patcher.model_options.get("transformer_options", {})
    if backend == "auto":
        assert torch.equal(got, plain)
    else:
        assert last_path()["path"] == "triton"
        assert (got - plain).abs().max() <= 1e-4 * plain.abs().max()


@pytest.mark.parametrize("mode", ["nasa", "nag"])
def test_nasa_node_with_the_core_ksampler_at_cfg_1(comfy_inprocess, mode):
    """The patched MODEL also drives ComfyUI's own KSampler (lcm sampler, sgm_uniform, cfg 1.0)."""
    import comfy.sample

    from swiftstep.nodes import nasa_nodes

    pipe = OneStepPipeline(**build_components("sd1"))
    patcher = comfy_model(comfy_inprocess, pipe)
    embeds, _ = pipe.encode_prompt([PROMPT])
    negative, _ = pipe.encode_prompt(["blurry"])
    latent = torch.zeros(1, 4, 16, 16)

    def ksample(model):
        noise = comfy.sample.prepare_noise(latent, 2)
        cond = [[embeds, {}]]
        return comfy.sample.sample(model, noise, 4, 1.0, "lcm", "sgm_uniform", cond, cond, latent, disable_pbar=True,
                                   seed=2)

    plain = ksample(patcher)
    (patched,) = nasa_nodes.SwiftStepNASA.execute(patcher, [[negative, {}]], mode, 0.3, 3.0, 2.5, 0.5).args
    (off,) = nasa_nodes.SwiftStepNASA.execute(patcher, [[negative, {}]], mode, 0.0, 1.0, 2.5, 0.5).args
    assert (ksample(patched) - plain).abs().max() > 1e-3
    assert torch.equal(ksample(off), plain)


def test_fast_path_node_keeps_the_latents_with_the_core_ksampler(comfy_inprocess):
    """SwiftStepFastPath through ComfyUI's own sampling: on the CPU the model calls run eagerly (channels-last), and
    with the graph runner's static buffers forced (run eagerly) the real conditioning dicts go through the graph
    call's signature and buffer handling — the latents stay those of the plain model."""
    import comfy.sample

    from swiftstep.nodes import fast_path_nodes
    from swiftstep.pipelines.fast_path import GraphedCall

    pipe = OneStepPipeline(**build_components("sd1"))
    patcher = comfy_model(comfy_inprocess, pipe)
    embeds, _ = pipe.encode_prompt([PROMPT])
    latent = torch.zeros(1, 4, 16, 16)

    def ksample(model, cfg=1.0):
        noise = comfy.sample.prepare_noise(latent, 5)
        pos, neg = [[embeds, {}]], [[torch.zeros_like(embeds), {}]]
        return comfy.sample.sample(model, noise, 4, cfg, "lcm", "sgm_uniform", pos, neg, latent, disable_pbar=True,
                                   seed=5)

    plain, plain_cfg = ksample(patcher), ksample(patcher, cfg=2.0)
    (fast,) = fast_path_nodes.SwiftStepFastPath.execute(patcher, True, True, "auto").args
    assert "model_function_wrapper" not in patcher.model_options
    eager = ksample(fast)
    torch.testing.assert_close(eager, plain, rtol=0, atol=1e-3)  # channels-last convolutions round differently
    wrapper = fast.model_options["model_function_wrapper"]
    wrapper.graphs = GraphedCall(capture=False)
    torch.testing.assert_close(ksample(fast), eager, rtol=0, atol=1e-6)
    torch.testing.assert_close(ksample(fast, cfg=2.0), plain_cfg, rtol=0, atol=1e-3)  # cond+uncond batches
    # one signature per batch layout, reused across steps (ComfyUI may unload the model between runs: released)
    assert any(key[-1] == (1, 0) for key in wrapper.graphs._graphs)


def test_fast_path_graphs_are_released_when_comfyui_unloads_the_model(comfy_inprocess):
    from comfy.patcher_extension import CallbacksMP

    from swiftstep.nodes import fast_path_nodes
    from swiftstep.pipelines.fast_path import GraphedCall

    patcher = comfy_model(comfy_inprocess, OneStepPipeline(**build_components("sd1")))
    (fast,) = fast_path_nodes.SwiftStepFastPath.execute(patcher, True, False, "off").args
    wrapper = fast.model_options["model_function_wrapper"]
    wrapper.graphs = GraphedCall(capture=False)
    wrapper.graphs._graphs["signature"] = object()
    assert fast.get_all_callbacks(CallbacksMP.ON_DETACH)
    fast.detach()
    assert wrapper.graphs._graphs == {}
