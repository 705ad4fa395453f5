"""In a real ComfyUI: the SR, DLoRAL and MAR pipelines (no ComfyUI model type exists for them) are registered with
`comfy.model_management` when a node runs, leave the load device when ComfyUI unloads everything, and are loaded
again by the next run with identical output."""

import asyncio

import pytest
import torch

from swiftstep.pipelines import MARPipeline, OneStepSRPipeline, VideoSRPipeline

from ..models.test_mar import tiny
from ..pipelines.test_pipeline_mar import tiny_vae
from ..sr_fixtures import make_pisa_pkl
from ..video_fixtures import make_dloral_pkl, tiny_cfr, video_components


@pytest.fixture(scope="module")
def nodes(comfy_inprocess):
    import swiftstep
    from swiftstep.nodes import mar_nodes, sr_nodes

    assert asyncio.run(asyncio.run(swiftstep.comfy_entrypoint()).get_node_list())
    return mar_nodes, sr_nodes


def _managed(kind, tmp_path, nodes):
    mar_nodes, sr_nodes = nodes
    if kind == "mar":
        pipe = MARPipeline(mar=tiny(), vae=tiny_vae())
        run = lambda m: mar_nodes.SwiftStepMARSample.execute(  # noqa: E731
            m, "3", 1, 2, "constant", 2, 2, 1.0, "constant", 1.0, False, 5).args[0]
    elif kind == "pisa-sr":
        components = video_components()
        make_pisa_pkl(components["unet"], tmp_path / "pisa_sr.pkl")
        pipe = OneStepSRPipeline(**components)
        pipe.load_sr_weights(tmp_path / "pisa_sr.pkl")
        image = torch.rand(1, 12, 16, 3, generator=torch.Generator().manual_seed(0))
        run = lambda m: sr_nodes.SwiftStepUpscale.execute(  # noqa: E731
            m, image, 4, 1.0, 1.0, "adain", 96, 32, 64, 3).args[0]
    else:
        components = video_components()
        cfr = tiny_cfr()
        make_dloral_pkl(components["unet"], cfr, tmp_path / "model.pkl")
        pipe = VideoSRPipeline(**components)
        pipe.load_sr_weights(tmp_path / "model.pkl")
        frames = torch.rand(2, 16, 16, 3, generator=torch.Generator().manual_seed(0))
        run = lambda m: sr_nodes.SwiftStepVideoUpscale.execute(  # noqa: E731
            m, frames, 4, "full", "", "adain", 96, 32, 512, 1, 3).args[0]
    pipe.set_progress_bar_config(disable=True)
    return sr_nodes.ManagedPipeline(pipe), run


@pytest.mark.parametrize("kind", ["mar", "pisa-sr", "dloral"])
def test_pipelines_are_loaded_offloaded_and_reloaded_by_comfyui(comfy_inprocess, nodes, tmp_path, kind):
    import comfy.model_management as mm

    managed, run = _managed(kind, tmp_path, nodes)
    registered = lambda: [lm for lm in mm.current_loaded_models if lm.model is managed.patcher]  # noqa: E731
    assert not registered()
    size = mm.module_size(managed.patcher.model)
    modules = [m for m in managed.pipe.components.values() if isinstance(m, torch.nn.Module)]
    assert size == sum(mm.module_size(m) for m in modules) > 0  # ComfyUI counts every module of the pipeline
    first = run(managed)
    (loaded,) = registered()
    assert loaded.model_memory() == size and loaded.device == managed.patcher.load_device
    mm.unload_all_models()
    assert not registered()
    assert all(p.device == managed.patcher.offload_device for p in managed.patcher.model.parameters())
    again = run(managed)
    assert len(registered()) == 1
    torch.testing.assert_close(again, first, rtol=0, atol=0)


def test_one_step_then_upscale_in_one_graph(comfy_inprocess, nodes, tmp_path):
    """SD1.5-architecture one-step sampling (ComfyUI's own MODEL) feeding SwiftStep Upscale: both models are
    registered with ComfyUI, both leave when it unloads everything, and the graph run again gives the same image."""
    import comfy.model_management as mm

    from swiftstep.nodes import one_step_nodes
    from swiftstep.pipelines import OneStepPipeline
    from swiftstep.tiny_models import build_components

    from .test_sampler_parity import _sample, comfy_model

    pipe = OneStepPipeline(**build_components("sd1"))
    pipe.set_progress_bar_config(disable=True)
    unet = comfy_model(comfy_inprocess, pipe)
    embeds, _ = pipe.encode_prompt(["a lighthouse at dusk"])
    managed, _ = _managed("pisa-sr", tmp_path, nodes)
    _, sr_nodes = nodes

    def graph():
        latent = _sample(unet, one_step_nodes, embeds, "tcd", 4, seed=2)
        image = pipe.image_processor.postprocess(pipe.decode_latents(latent), output_type="pt").permute(0, 2, 3, 1)
        return sr_nodes.SwiftStepUpscale.execute(managed, image, 4, 1.0, 1.0, "adain", 96, 32, 64, 3).args[0]

    first = graph()
    loaded = [lm.model for lm in mm.current_loaded_models]
    assert unet in loaded and managed.patcher in loaded
    mm.unload_all_models()
    assert not mm.current_loaded_models
    again = graph()
    assert managed.patcher in [lm.model for lm in mm.current_loaded_models]
    torch.testing.assert_close(again, first, rtol=0, atol=0)
