"""SwiftStepSRLoader with DLoRAL weights → SwiftStepVideoUpscale against ComfyUI fakes: frames in, one frame out per
frame, the pipeline's result, progress, interruption and the wrong-model errors."""

import pytest
import torch

from swiftstep.pipelines import OneStepSRPipeline

from .. import comfy_fakes as fakes
from ..sr_fixtures import make_pisa_pkl
from ..video_fixtures import make_dloral_pkl, tiny_cfr, video_components


@pytest.fixture(scope="module")
def models_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    comps = video_components()
    OneStepSRPipeline(**comps).save_pretrained(root / "diffusers" / "sd21-base")
    (root / "swiftstep").mkdir()
    make_dloral_pkl(comps["unet"], tiny_cfr(), root / "swiftstep" / "model.pkl")
    make_pisa_pkl(comps["unet"], root / "swiftstep" / "pisa_sr.pkl")
    return root


@pytest.fixture
def comfy(monkeypatch, models_root):
    fakes.install(monkeypatch, models_root=models_root)
    from swiftstep.nodes import sr_nodes

    return sr_nodes


def frames(n=3):
    return torch.rand(n, 128, 136, 3, generator=torch.Generator().manual_seed(0))  # IMAGE [N, H, W, C]


def test_loader_picks_the_video_pipeline_and_upscale_matches_it(comfy):
    (model,) = comfy.SwiftStepSRLoader.execute("diffusers/sd21-base", "model.pkl", "auto").args
    assert type(model.pipe).__name__ == "VideoSRPipeline" and model.pipe.sr_method == "dloral"
    clip = frames()
    (out,) = comfy.SwiftStepVideoUpscale.execute(model, clip, 4, "full", "a cat", "adain", 96, 32, 512, 2, 7).args
    assert out.shape == (3, 512, 544, 3) and out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1
    assert fakes.ProgressBar.last.current == 3
    ref = model.pipe(clip.permute(0, 3, 1, 2), prompt="a cat", generator=torch.Generator().manual_seed(7),
                output_type="pt").images
    torch.testing.assert_close(out, ref.permute(0, 2, 3, 1), rtol=0, atol=1e-4)
    fakes.INTERRUPT["flag"] = True
    with pytest.raises(fakes.InterruptProcessingException):
        comfy.SwiftStepVideoUpscale.execute(model, clip, 4, "full", "", "adain", 96, 32, 512, 1, 0)


def test_wrong_model_or_input_is_a_clear_error(comfy):
    (video,) = comfy.SwiftStepSRLoader.execute("diffusers/sd21-base", "model.pkl", "auto").args
    (image,) = comfy.SwiftStepSRLoader.execute("diffusers/sd21-base", "pisa_sr.pkl", "auto").args
    with pytest.raises(ValueError, match="SwiftStepUpscale: input `sr_model` holds DLoRAL video weights"):
        comfy.SwiftStepUpscale.execute(video, frames(1), 4, 1.0, 1.0, "adain", 96, 32, 512, 0)
    with pytest.raises(ValueError, match="SwiftStepVideoUpscale: input `sr_model` holds pisa-sr image weights"):
        comfy.SwiftStepVideoUpscale.execute(image, frames(), 4, "full", "", "adain", 96, 32, 512, 1, 0)
    with pytest.raises(ValueError, match="input `frames` has 1 frame; a video needs at least 2"):
        comfy.SwiftStepVideoUpscale.execute(video, frames(1), 4, "full", "", "adain", 96, 32, 512, 1, 0)
    with pytest.raises(ValueError, match="input `frames` has 0 frames; a video needs at least 2"):
        comfy.SwiftStepVideoUpscale.execute(video, frames(0), 4, "full", "", "adain", 96, 32, 512, 1, 0)
    with pytest.raises(ValueError, match=r"SwiftStepVideoUpscale: input `frames` must be an IMAGE batch .* found "
                                         r"shape \(3, 128, 0, 3\)"):
        comfy.SwiftStepVideoUpscale.execute(video, frames()[:, :, :0], 4, "full", "", "adain", 96, 32, 512, 1, 0)
    with pytest.raises(ValueError, match=r"input `tile_overlap` \(96\) must be smaller"):
        comfy.SwiftStepVideoUpscale.execute(video, frames(), 4, "full", "", "adain", 96, 96, 512, 1, 0)
