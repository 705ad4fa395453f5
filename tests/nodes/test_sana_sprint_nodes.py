"""SwiftStepSanaSprintLoader / SwiftStepSanaSprintSampler against ComfyUI fakes, on the tiny SANA-Sprint folder."""

import asyncio
import json
import sys

import pytest
import torch

from swiftstep.pipelines import DistilledDiTPipeline, load_one_step

from .. import comfy_fakes as fakes
from ..dit_fixtures import write_folder

SANA = "sana-sprint-folder"  # the folder name write_folder gives


@pytest.fixture(scope="module")
def models_root(tmp_path_factory):
    """models/diffusers with the tiny SANA-Sprint folder and a folder of another pipeline class."""
    root = tmp_path_factory.mktemp("models")
    write_folder("sana-sprint", root / "diffusers")
    (root / "diffusers" / "sd-turbo").mkdir()
    (root / "diffusers" / "sd-turbo" / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1"}))
    return root


class CountingProgressBar(fakes.ProgressBar):
    """comfy.utils.ProgressBar that also counts its updates."""

    def __init__(self, total):
        super().__init__(total)
        self.updates = []

    def update_absolute(self, value, total=None, preview=None):
        super().update_absolute(value, total, preview)
        self.updates.append((value, total))


@pytest.fixture
def nodes(monkeypatch, models_root):
    fakes.install(monkeypatch, models_root=models_root)
    monkeypatch.setattr(sys.modules["comfy.utils"], "ProgressBar", CountingProgressBar)
    from swiftstep.nodes import sana_sprint_nodes

    return sana_sprint_nodes


@pytest.fixture
def managed(nodes):
    (model,) = nodes.SwiftStepSanaSprintLoader.execute(SANA, "auto").args
    return model


ARGS = dict(prompt="a red fox in the snow", steps=2, seed=7, width=64, height=32, guidance=3.0, batch_size=2)


def reference(folder, steps, seed, width, height, guidance, batch_size, prompt):
    pipe = load_one_step(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt=prompt, num_inference_steps=steps, height=height, width=width, guidance_scale=guidance,
                num_images_per_prompt=batch_size, generator=torch.Generator().manual_seed(seed),
                output_type="pt").images


def test_loader_offers_only_sana_sprint_folders_and_loads_one(nodes, managed):
    schema = nodes.SwiftStepSanaSprintLoader.define_schema()
    options = {i.id: i.kwargs["options"] for i in schema.inputs}
    assert options["model"] == [SANA] and options["dtype"] == ["auto", "bf16", "fp16", "fp32"]
    assert isinstance(managed.pipe, DistilledDiTPipeline) and managed.pipe.preset.name == "sana-sprint"
    assert managed.pipe.transformer.dtype == torch.float32  # auto on the CPU


def test_loader_dtype_is_passed_to_the_weights(nodes):
    (model,) = nodes.SwiftStepSanaSprintLoader.execute(SANA, "bf16").args
    assert {model.pipe.transformer.dtype, model.pipe.vae.dtype, model.pipe.text_encoder.dtype} == {torch.bfloat16}


def test_loader_without_sana_sprint_folders_offers_the_released_name(monkeypatch, tmp_path):
    fakes.install(monkeypatch, models_root=tmp_path)
    from swiftstep.nodes import sana_sprint_nodes

    schema = sana_sprint_nodes.SwiftStepSanaSprintLoader.define_schema()
    assert schema.inputs[0].kwargs["options"] == ["Sana_Sprint_1.6B_1024px_diffusers"]
    assert "Efficient-Large-Model/Sana_Sprint_0.6B_1024px_diffusers" in schema.inputs[0].kwargs["tooltip"]


def test_loader_refuses_a_folder_that_is_not_sana_sprint(nodes):
    with pytest.raises(ValueError, match=r"SwiftStepSanaSprintLoader: input `model`: 'sd-turbo' is a "
                                         r"StableDiffusionPipeline folder .* expected a SANA-Sprint folder "
                                         r"\(SanaSprintPipeline\); download Efficient-Large-Model/Sana_Sprint_1\.6B"
                                         r"_1024px_diffusers .*into ComfyUI/models/diffusers/"):
        nodes.SwiftStepSanaSprintLoader.execute("sd-turbo", "auto")
    with pytest.raises(FileNotFoundError, match=r"SwiftStepSanaSprintLoader: input `model`: no diffusers folder "
                                                r"'Sana_Sprint_0\.6B_1024px_diffusers' .* in .*models/diffusers"):
        nodes.SwiftStepSanaSprintLoader.execute("Sana_Sprint_0.6B_1024px_diffusers", "auto")


@pytest.mark.parametrize("steps", [2, 3])
def test_sampler_image_equals_the_pipeline_with_progress_per_step(nodes, managed, models_root, steps):
    args = {**ARGS, "steps": steps}
    (images,) = nodes.SwiftStepSanaSprintSampler.execute(managed, **args).args
    assert images.shape == (2, 32, 64, 3) and images.dtype == torch.float32  # IMAGE: [B, H, W, C]
    assert 0 <= images.min() and images.max() <= 1
    ref = reference(models_root / "diffusers" / SANA, **args)
    torch.testing.assert_close(images, ref.permute(0, 2, 3, 1), atol=1e-6, rtol=0)
    assert fakes.ProgressBar.last.total == steps
    assert fakes.ProgressBar.last.updates == [(i, steps) for i in range(1, steps + 1)]


def test_sampler_passes_guidance_and_seed(nodes, managed):
    def run(**kw):
        return nodes.SwiftStepSanaSprintSampler.execute(managed, **{**ARGS, "batch_size": 1, **kw}).args[0]

    base = run()
    assert torch.equal(base, run())
    assert (base - run(guidance=6.0)).abs().max() > 1e-3
    assert (base - run(seed=8)).abs().max() > 1e-3


def test_interruption_stops_the_sampler(nodes, managed):
    fakes.INTERRUPT["flag"] = True
    with pytest.raises(fakes.InterruptProcessingException):
        nodes.SwiftStepSanaSprintSampler.execute(managed, **ARGS)
    assert fakes.ProgressBar.last.updates == []


def test_sizes_that_are_not_multiples_of_32_are_refused_naming_node_and_input(nodes, managed):
    validate = nodes.SwiftStepSanaSprintSampler.validate_inputs
    assert validate(width=1024, height=768) is True and validate() is True
    assert validate(width=1000, height=768) == ("SwiftStepSanaSprintSampler: input `width` must be a multiple of 32 "
                                                "(SANA-Sprint's VAE factor), got 1000; nearest: 992.")
    with pytest.raises(ValueError, match=r"SwiftStepSanaSprintSampler: input `height` must be a multiple of 32 "
                                         r"\(SANA-Sprint's VAE factor\), got 48"):
        nodes.SwiftStepSanaSprintSampler.execute(managed, **{**ARGS, "height": 48})


def test_the_pipeline_runs_under_comfyui_model_management(nodes, managed):
    """Transformer, text encoder and VAE are one ModelPatcher: loaded through `load_models_gpu` at the first run,
    once across runs, and again after ComfyUI unloads everything, with the same image."""
    assert set(managed.patcher.model) == {"transformer", "text_encoder", "vae"}
    assert managed.patcher not in fakes.LOADED
    args = {**ARGS, "batch_size": 1}
    first = nodes.SwiftStepSanaSprintSampler.execute(managed, **args).args[0]
    nodes.SwiftStepSanaSprintSampler.execute(managed, **args)
    assert fakes.LOADED == [managed.patcher] and managed.patcher.loads == 1
    import comfy.model_management

    comfy.model_management.unload_all_models()
    assert managed.patcher not in fakes.LOADED
    again = nodes.SwiftStepSanaSprintSampler.execute(managed, **args).args[0]
    assert managed.patcher.loads == 2 and torch.equal(first, again)


def test_entrypoint_registers_both_nodes_with_tooltips(nodes):
    import swiftstep

    node_list = asyncio.run(asyncio.run(swiftstep.comfy_entrypoint()).get_node_list())
    ours = [n for n in node_list if n.define_schema().node_id.startswith("SwiftStepSanaSprint")]
    assert [n.define_schema().node_id for n in ours] == ["SwiftStepSanaSprintLoader", "SwiftStepSanaSprintSampler"]
    for node in ours:
        schema = node.define_schema()
        assert schema.category == "swiftstep/sana-sprint"
        for spec in schema.inputs:
            assert spec.kwargs["tooltip"], (schema.node_id, spec.id)
            if spec.io_type in ("INT", "FLOAT"):
                assert spec.kwargs["min"] <= spec.kwargs["default"] <= spec.kwargs["max"], spec.id
    steps = next(i for i in ours[1].define_schema().inputs if i.id == "steps").kwargs
    assert (steps["min"], steps["default"], steps["max"]) == (1, 2, 4)


def test_loader_without_diffusers_names_the_package(monkeypatch, models_root):
    fakes.install(monkeypatch, models_root=models_root)
    for name in [m for m in sys.modules if m == "diffusers" or m.startswith(("diffusers.", "swiftstep.pipelines"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now fails as if it were not installed
    from swiftstep.nodes import sana_sprint_nodes

    with pytest.raises(ModuleNotFoundError, match=r"SwiftStepSanaSprintLoader needs the Python package `diffusers`"):
        sana_sprint_nodes.SwiftStepSanaSprintLoader.execute(SANA, "auto")
