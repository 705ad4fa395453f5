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
