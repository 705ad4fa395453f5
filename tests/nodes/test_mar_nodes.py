"""SwiftStepMARLoader / SwiftStepMARSample against ComfyUI fakes."""

import pytest
import torch

from swiftstep.pipelines import MARPipeline

from .. import comfy_fakes as fakes
from ..models.test_mar import tiny
from ..pipelines.test_pipeline_mar import tiny_vae


@pytest.fixture
def nodes(monkeypatch, tmp_path):
    root = tmp_path / "models"
    (root / "swiftstep").mkdir(parents=True)
    (root / "swiftstep" / "checkpoint-last.pth").write_bytes(b"")
    (root / "swiftstep" / "kl16.ckpt").write_bytes(b"")
    fakes.install(monkeypatch, models_root=root)
    from swiftstep.nodes import mar_nodes

    return mar_nodes


def test_loader_finds_the_official_files_and_passes_the_size(nodes, monkeypatch):
    schema = nodes.SwiftStepMARLoader.define_schema()
    options = {i.id: i.kwargs["options"] for i in schema.inputs}
    assert options["mar_checkpoint"] == ["checkpoint-last.pth"] and options["vae_checkpoint"] == ["kl16.ckpt"]
    seen = {}

    def fake_official(cls, mar_ckpt, vae_ckpt, size="base"):
        seen.update(mar=mar_ckpt, vae=vae_ckpt, size=size)
        return MARPipeline(mar=tiny(), vae=tiny_vae())

    monkeypatch.setattr(MARPipeline, "from_official", classmethod(fake_official))
    (model,) = nodes.SwiftStepMARLoader.execute("checkpoint-last.pth", "kl16.ckpt", "large").args
    assert seen["size"] == "large" and seen["mar"].endswith("swiftstep/checkpoint-last.pth")
    assert isinstance(model.pipe, MARPipeline)


def test_sample_returns_images_with_progress_and_matches_the_pipeline(nodes):
    pipe = MARPipeline(mar=tiny(), vae=tiny_vae())
    pipe.set_progress_bar_config(disable=True)
    managed = nodes.ManagedPipeline(pipe)
    args = dict(class_name="003 tiger shark", batch_size=2, num_iter=4, step_schedule="disa-linear", steps_start=6,
                steps_end=2, cfg=2.0, cfg_schedule="linear", temperature=1.0, official_compat=False, seed=5)
    (images,) = nodes.SwiftStepMARSample.execute(managed, **args).args
    assert images.shape == (2, 64, 64, 3) and 0 <= images.min() and images.max() <= 1
    assert fakes.ProgressBar.last.current == 4
    ref = pipe([3, 3], num_iter=4, steps_start=6, steps_end=2, cfg=2.0, generator=torch.Generator().manual_seed(5),
               output_type="pt").images
    torch.testing.assert_close(images, ref.permute(0, 2, 3, 1))
    fakes.INTERRUPT["flag"] = True
    with pytest.raises(fakes.InterruptProcessingException):
        nodes.SwiftStepMARSample.execute(managed, **args)
    with pytest.raises(ValueError, match=r"SwiftStepMARSample: input `steps_start` \(2\) must be ≥"):
        nodes.SwiftStepMARSample.execute(managed, **{**args, "steps_start": 2, "steps_end": 6})


def test_the_pipeline_runs_under_comfyui_model_management(nodes):
    """The MAR and VAE modules are one ModelPatcher: on the offload device until a run asks
    `load_models_gpu` for them, loaded once across runs, loaded again after ComfyUI unloads everything."""
    loaded = fakes.LOADED
    managed = nodes.ManagedPipeline(MARPipeline(mar=tiny(), vae=tiny_vae()))
    managed.pipe.set_progress_bar_config(disable=True)
    assert set(managed.patcher.model) == {"mar", "vae"} and managed.patcher not in loaded
    args = dict(class_name="3", batch_size=1, num_iter=2, step_schedule="constant", steps_start=2, steps_end=2,
                cfg=1.0, cfg_schedule="constant", temperature=1.0, official_compat=False, seed=1)
    first = nodes.SwiftStepMARSample.execute(managed, **args).args[0]
    nodes.SwiftStepMARSample.execute(managed, **args)
    assert loaded == [managed.patcher] and managed.patcher.loads == 1
    import comfy.model_management

    comfy.model_management.unload_all_models()
    assert managed.patcher not in loaded
    again = nodes.SwiftStepMARSample.execute(managed, **args).args[0]
    assert managed.patcher.loads == 2 and torch.equal(first, again)
