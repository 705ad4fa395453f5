"""In a real ComfyUI: SwiftStepUpscaleV2 on the MODEL/CLIP/VAE that ComfyUI's checkpoint loader makes of an SD2
checkpoint gives OneStepSRPipeline's image for the same weights, input and seed (≤ 1e-4, images in [0, 1]) — PiSA-SR
default and adjustable, OSEDiff, untiled and tiled — and leaves its input MODEL and VAE unpatched."""

import asyncio
import copy
import types

import pytest
import torch

from swiftstep.pipelines import OneStepSRPipeline
from swiftstep.tiny_models import build_components

from ..ldm_layout import save_single_file
from ..sr_fixtures import make_osediff_pkl, make_pisa_pkl

PROMPT = "a red brick wall, sharp"  # OSEDiff's condition; PiSA-SR must ignore it
MIN_SIDE = 64
WEIGHTS = {"pisa-sr": "pisa_sr.pkl", "osediff": "osediff.pkl"}


@pytest.fixture(scope="module")
def setup(comfy_inprocess, tmp_path_factory):
    """The smallest SD2 checkpoint ComfyUI recognises (real VAE and text encoder, 2-level UNet), written as one
    fp16 single file and loaded by `comfy.sd.load_checkpoint_guess_config` (what Load Checkpoint runs), and the
    same weights (rounded to fp16) in OneStepSRPipelines with random official-layout SR weights."""
    import comfy.sd
    import folder_paths

    import swiftstep

    assert asyncio.run(asyncio.run(swiftstep.comfy_entrypoint()).get_node_list())
    from swiftstep.nodes import sr_nodes

    components = build_components("sd2", size="comfy")
    with torch.no_grad():
        for name in ("unet", "vae", "text_encoder"):
            for p in components[name].parameters():
                p.copy_(p.half().float())
    root = tmp_path_factory.mktemp("native-sr")
    checkpoint = root / "sd21-base.safetensors"
    save_single_file(types.SimpleNamespace(unet=components["unet"], vae=components["vae"],
                                           text_encoder=components["text_encoder"], text_encoder_2=None),
                     checkpoint, dtype=torch.float16)
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(checkpoint), output_vae=True, output_clip=True,
                                                             embedding_directory=None)[:3]
    checkpoint.unlink()
    unet_before = {k: v.clone() for k, v in model.model.state_dict().items()}
    vae_before = {k: v.clone() for k, v in vae.first_stage_model.state_dict().items()}
    (root / "swiftstep").mkdir()
    make_pisa_pkl(components["unet"], root / "swiftstep" / WEIGHTS["pisa-sr"])
    make_osediff_pkl(components["unet"], components["vae"], root / "swiftstep" / WEIGHTS["osediff"])
    folder_paths.add_model_folder_path("swiftstep", str(root / "swiftstep"))

    # the pipelines get ComfyUI's text condition: the test is about the SR step, not about two CLIP tokenizers
    conds = {p: clip.encode_from_tokens(clip.tokenize(p)).float() for p in ("", PROMPT)}
    pipes = {}
    for method, weights in WEIGHTS.items():
        pipe = OneStepSRPipeline(vae=copy.deepcopy(components["vae"]), text_encoder=components["text_encoder"],
                                 tokenizer=components["tokenizer"], unet=copy.deepcopy(components["unet"]),
                                 scheduler=components["scheduler"])
        pipe.load_sr_weights(root / "swiftstep" / weights)
        pipe.set_progress_bar_config(disable=True)
        pipe._prompt_embeds = lambda prompt, device: conds[prompt]
        pipes[method] = pipe
    return types.SimpleNamespace(nodes=sr_nodes, model=model, clip=clip, vae=vae, pipes=pipes,
                                 unet_before=unet_before, vae_before=vae_before)


def _max_error(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("method,lambdas,tile,batch", [
    ("pisa-sr", (1.0, 1.0), 96, 2), ("pisa-sr", (1.0, 1.0), 12, 1), ("pisa-sr", (0.8, 1.2), 96, 1),
    ("pisa-sr", (0.8, 1.2), 12, 1), ("osediff", (1.0, 1.0), 96, 1), ("osediff", (1.0, 1.0), 12, 1),
])
def test_node_equals_the_pipeline(setup, method, lambdas, tile, batch):
    """16×16 latents: tile 12 (overlap 4) runs 2×2 Gaussian-blended tiles, 96 one pass. A batch of two draws the
    posterior samples from one generator in order, as the pipeline called per image does."""
    image = torch.rand(batch, 32, 32, 3, generator=torch.Generator().manual_seed(1))
    seed = 7
    (out,) = setup.nodes.SwiftStepUpscaleV2.execute(setup.model, setup.clip, setup.vae, WEIGHTS[method], image,
                                                    PROMPT, 4, *lambdas, "adain", tile, 4, MIN_SIDE, seed).args
    assert out.shape == (batch, 128, 128, 3) and out.dtype == torch.float32
    generator = torch.Generator().manual_seed(seed)
    ref = torch.stack([setup.pipes[method](frame, upscale=4, prompt=PROMPT, lambda_pix=lambdas[0],
                                           lambda_sem=lambdas[1], tile_size=tile, tile_overlap=4, min_side=MIN_SIDE,
                                           generator=generator, output_type="pt").images[0]
                       for frame in image.permute(0, 3, 1, 2)])
    error = _max_error(out.permute(0, 3, 1, 2), ref)
    print(f"{method} λ={lambdas} tile={tile} batch={batch}: max |node − pipeline| = {error:.2e}")
    assert error <= 1e-4, error
    assert out.std() > 0.02


def test_vae_tiles_as_the_pipeline(setup, monkeypatch):
    """Above 2048² output px on CUDA both tile the VAE with image-wide GroupNorm statistics (`core.sr_step`), here
    through ComfyUI's own VAE modules; forced on a 64² output (8×8 latent, VAE tiles of 4 latent px)."""
    from swiftstep.core import sr_step, tiling

    calls = []
    tiled = tiling.tiled_norm_synced
    monkeypatch.setattr(tiling, "tiled_norm_synced", lambda *a, **k: calls.append(k["tile"]) or tiled(*a, **k))
    monkeypatch.setattr(sr_step, "auto_vae_tile", lambda device, size: 4)
    image = torch.rand(1, 16, 16, 3, generator=torch.Generator().manual_seed(2))
    (out,) = setup.nodes.SwiftStepUpscaleV2.execute(setup.model, setup.clip, setup.vae, WEIGHTS["osediff"], image,
                                                    PROMPT, 4, 1.0, 1.0, "adain", 96, 32, MIN_SIDE, 3).args
    assert calls == [32, 4]  # encoder tiles of 8 × 4 px, decoder tiles of 4 latent px
    ref = setup.pipes["osediff"](image[0].permute(2, 0, 1), upscale=4, prompt=PROMPT, min_side=MIN_SIDE, vae_tile=4,
                                 generator=torch.Generator().manual_seed(3), output_type="pt").images
    error = _max_error(out.permute(0, 3, 1, 2), ref)
    print(f"osediff, VAE tiles of 4 latent px: max |node − pipeline| = {error:.2e}")
    assert error <= 1e-4, error


def test_inputs_stay_unpatched(setup):
    """The SR patches live on clones: once ComfyUI loads the input MODEL / VAE again, every weight is the
    checkpoint's (OSEDiff patches the most: conv_in, UNet and VAE-encoder LoRAs)."""
    import comfy.model_management

    setup.nodes.SwiftStepUpscaleV2.execute(setup.model, setup.clip, setup.vae, WEIGHTS["osediff"],
                                           torch.rand(1, 16, 16, 3), PROMPT, 4, 1.0, 1.0, "adain", 96, 32, MIN_SIDE, 0)
    assert not setup.model.patches and not setup.vae.patcher.patches
    for patcher, before in ((setup.model, setup.unet_before), (setup.vae.patcher, setup.vae_before)):
        comfy.model_management.load_models_gpu([patcher])
        after = patcher.model.state_dict()
        changed = [k for k, v in before.items() if not torch.equal(after[k].cpu(), v)]
        assert not changed, changed[:3]
