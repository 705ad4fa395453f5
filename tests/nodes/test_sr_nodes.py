"""SwiftStepSRLoader / SwiftStepUpscale against ComfyUI fakes: model folders, IMAGE in and out, same result as the
pipeline, progress and interruption."""

import shutil

import pytest
import torch

from swiftstep.pipelines import OneStepPipeline

from .. import comfy_fakes as fakes
from ..sr_fixtures import make_osediff_pkl, make_pisa_pkl


@pytest.fixture
def comfy(monkeypatch, tmp_path, models):
    root = tmp_path / "models"
    shutil.copytree(models["sd2"]["folder"], root / "diffusers" / "sd21-base")
    (root / "swiftstep").mkdir(parents=True)
    base = OneStepPipeline.from_pretrained(models["sd2"]["folder"]).components
    make_pisa_pkl(base["unet"], root / "swiftstep" / "pisa_sr.pkl")
    make_osediff_pkl(base["unet"], base["vae"], root / "swiftstep" / "osediff.pkl")
    fakes.install(monkeypatch, models_root=root)
    from swiftstep.nodes import sr_nodes

    return sr_nodes


def test_loader_lists_folders_and_loads(comfy):
    schema = comfy.SwiftStepSRLoader.define_schema()
    options = {i.id: i.kwargs.get("options") for i in schema.inputs}
    assert "diffusers/sd21-base" in options["base"]
    assert options["weights"] == ["osediff.pkl", "pisa_sr.pkl"]
    (model,) = comfy.SwiftStepSRLoader.execute("diffusers/sd21-base", "pisa_sr.pkl", "auto").args
    assert model.pipe.sr_method == "pisa-sr"
    with pytest.raises(FileNotFoundError, match="no diffusers folder 'nope'"):
        comfy.SwiftStepSRLoader.execute("diffusers/nope", "pisa_sr.pkl", "auto")


def test_upscale_image_batch_matches_the_pipeline(comfy):
    (model,) = comfy.SwiftStepSRLoader.execute("diffusers/sd21-base", "pisa_sr.pkl", "auto").args
    image = torch.rand(2, 12, 16, 3, generator=torch.Generator().manual_seed(0))  # IMAGE [B, H, W, C]
    (out,) = comfy.SwiftStepUpscale.execute(model, image, 4, 0.8, 1.2, "adain", 96, 32, 64, 5).args
    assert out.shape == (2, 48, 64, 3) and out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1
    assert fakes.ProgressBar.last.current == 2
    g = torch.Generator().manual_seed(5)
    ref = [model.pipe(f, lambda_pix=0.8, lambda_sem=1.2, min_side=64, generator=g, output_type="pt").images[0]
           for f in image.permute(0, 3, 1, 2)]
    torch.testing.assert_close(out, torch.stack(ref).permute(0, 2, 3, 1))


def test_interrupt_and_bad_tiles(comfy):
    (model,) = comfy.SwiftStepSRLoader.execute("diffusers/sd21-base", "osediff.pkl", "auto").args
    image = torch.rand(1, 8, 8, 3)
    with pytest.raises(ValueError, match=r"SwiftStepUpscale: input `tile_overlap` \(96\) must be smaller"):
        comfy.SwiftStepUpscale.execute(model, image, 4, 1.0, 1.0, "adain", 96, 96, 64, 0)
    with pytest.raises(ValueError, match="need PiSA-SR weights"):
        comfy.SwiftStepUpscale.execute(model, image, 4, 0.5, 1.0, "adain", 96, 32, 64, 0)
    fakes.INTERRUPT["flag"] = True
    with pytest.raises(fakes.InterruptProcessingException):
        comfy.SwiftStepUpscale.execute(model, image, 4, 1.0, 1.0, "adain", 96, 32, 64, 0)


def test_bad_images_lambdas_and_weight_files_are_named(comfy, tmp_path):
    (model,) = comfy.SwiftStepSRLoader.execute("diffusers/sd21-base", "pisa_sr.pkl", "auto").args
    for image in (torch.rand(1, 0, 16, 3), torch.rand(2, 8, 0, 3), torch.rand(0, 8, 8, 3)):
        with pytest.raises(ValueError, match=rf"SwiftStepUpscale: input `image` must be an IMAGE batch \[B, H, W, C\] "
                                             rf"of at least one image with every side ≥ 1, found shape "
                                             rf"\({', '.join(map(str, image.shape))}\)"):
            comfy.SwiftStepUpscale.execute(model, image, 4, 1.0, 1.0, "adain", 96, 32, 64, 0)
    with pytest.raises(ValueError, match="`lambda_pix` must be a finite number, got nan"):
        comfy.SwiftStepUpscale.execute(model, torch.rand(1, 8, 8, 3), 4, float("nan"), 1.0, "adain", 96, 32, 64, 0)
    with pytest.raises(ValueError, match="`lambda_sem` must be a finite number, got inf"):
        comfy.SwiftStepUpscale.execute(model, torch.rand(1, 8, 8, 3), 4, 1.0, float("inf"), "adain", 96, 32, 64, 0)
    weights = tmp_path / "models" / "swiftstep"
    (weights / "cut.pkl").write_bytes((weights / "pisa_sr.pkl").read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"cut.pkl: expected SR weights .*found a truncated or damaged zip archive"):
        comfy.SwiftStepSRLoader.execute("diffusers/sd21-base", "cut.pkl", "auto")
    (weights / "notes.safetensors").write_text("not weights")
    with pytest.raises(ValueError, match="notes.safetensors: expected SR weights exported by save_sr_weights .* "
                                         "header too large"):
        comfy.SwiftStepSRLoader.execute("diffusers/sd21-base", "notes.safetensors", "auto")
