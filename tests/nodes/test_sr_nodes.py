"""SwiftStepSRLoader / SwiftStepUpscale (deprecated) and SwiftStepUpscaleV2 against ComfyUI fakes: model folders,
IMAGE in and out, same result as the pipeline, progress, interruption, errors naming the input, no diffusers on the
native path."""

import copy
import shutil
import sys
import types

import pytest
import torch

from swiftstep.pipelines import OneStepPipeline
from swiftstep.pipelines.pipeline_sr import OneStepSRPipeline

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


# ----------------------------------------------------------------------------- SwiftStepUpscaleV2
# On the fakes of an SD2 checkpoint's MODEL/CLIP/VAE (comfy_fakes: diffusers parts under ComfyUI's patcher surface,
# LoRA patches applied on load); the real ComfyUI runs in tests/comfyui_live/test_native_sr.py.

V2_INPUTS = ["model", "clip", "vae", "weights", "image", "prompt", "upscale", "lambda_pix", "lambda_sem", "color_fix",
             "tile_size", "tile_overlap", "min_side", "seed"]


@pytest.fixture(scope="module")
def sd2_parts(tmp_path_factory):
    """SD2-shaped tiny parts with an 8× VAE (what ComfyUI's SD VAE is) and SR weights in the official layouts."""
    from ..video_fixtures import make_dloral_pkl, tiny_cfr, video_components

    components = video_components()
    root = tmp_path_factory.mktemp("sr-v2")
    make_pisa_pkl(components["unet"], root / "pisa_sr.pkl")
    make_osediff_pkl(components["unet"], components["vae"], root / "osediff.pkl")
    make_dloral_pkl(components["unet"], tiny_cfr(), root / "model.pkl")
    return components, root


@pytest.fixture
def v2(monkeypatch, tmp_path, sd2_parts):
    components, weights = sd2_parts
    root = tmp_path / "models"
    shutil.copytree(weights, root / "swiftstep")
    fakes.install(monkeypatch, models_root=root)
    fakes.install_checkpoint_parts(monkeypatch)
    from swiftstep.nodes import sr_nodes

    unet, vae = copy.deepcopy(components["unet"]), copy.deepcopy(components["vae"])
    return types.SimpleNamespace(
        nodes=sr_nodes, components=components, weights=root / "swiftstep",
        model=fakes.WeightPatcher(fakes.FakeSD2Model(unet, fakes.model_sampling(fakes.EPS))),
        clip=fakes.FakeCLIP(components["tokenizer"], components["text_encoder"]), vae=fakes.FakeVAE(vae))


def run_v2(v2, weights="pisa_sr.pkl", image=None, prompt="", upscale=4, lambda_pix=1.0, lambda_sem=1.0,
           color_fix="adain", tile_size=96, tile_overlap=32, min_side=64, seed=0, model=None, clip=None, vae=None):
    image = torch.rand(1, 16, 16, 3, generator=torch.Generator().manual_seed(2)) if image is None else image
    (out,) = v2.nodes.SwiftStepUpscaleV2.execute(
        v2.model if model is None else model, v2.clip if clip is None else clip, v2.vae if vae is None else vae,
        weights, image, prompt, upscale, lambda_pix, lambda_sem, color_fix, tile_size, tile_overlap, min_side,
        seed).args
    return out


def test_v2_schema_tooltips_and_the_deprecated_v1(v2):
    schema = v2.nodes.SwiftStepUpscaleV2.define_schema()
    assert (schema.node_id, schema.category, schema.is_deprecated) == ("SwiftStepUpscaleV2", "swiftstep/upscale", False)
    assert [i.id for i in schema.inputs] == V2_INPUTS
    assert [i.io_type for i in schema.inputs[:5]] == ["MODEL", "CLIP", "VAE", "COMBO", "IMAGE"]
    assert all(i.kwargs["tooltip"] for i in schema.inputs) and schema.outputs[0].kwargs["tooltip"]
    assert schema.inputs[3].kwargs["options"] == ["model.pkl", "osediff.pkl", "pisa_sr.pkl"]
    old = v2.nodes.SwiftStepUpscale.define_schema()
    assert old.is_deprecated and "V2" in old.description
    assert [i.id for i in old.inputs][1:] == [i for i in V2_INPUTS if i not in ("model", "clip", "vae", "weights",
                                                                                "prompt")]
    assert v2.nodes.SwiftStepUpscaleV2 in v2.nodes.NODES and v2.nodes.SwiftStepUpscale in v2.nodes.NODES


@pytest.mark.parametrize("method,lambdas,tile,batch", [("pisa-sr", (1.0, 1.0), 96, 2), ("pisa-sr", (0.8, 1.2), 4, 1),
                                                       ("osediff", (1.0, 1.0), 4, 1)])
def test_v2_equals_the_pipeline_and_leaves_the_inputs_unpatched(v2, method, lambdas, tile, batch):
    """8×8 latents: tile 4 (overlap 2) runs 3×3 blended tiles. The fakes hold diffusers' UNet/VAE, so the node and
    the pipeline differ in how LoRAs are merged and in the float64 σ-space round trip (rounding, ~1e-5)."""
    import comfy.model_management

    weights = {"pisa-sr": "pisa_sr.pkl", "osediff": "osediff.pkl"}[method]
    unet_before = {k: v.clone() for k, v in v2.model.model.state_dict().items()}
    vae_before = {k: v.clone() for k, v in v2.vae.first_stage_model.state_dict().items()}
    image = torch.rand(batch, 16, 16, 3, generator=torch.Generator().manual_seed(1))
    out = run_v2(v2, weights, image, "a cat", 4, *lambdas, "adain", tile, 2, 64, 3)
    assert out.shape == (batch, 64, 64, 3) and out.dtype == torch.float32 and out.std() > 0.02
    progress = fakes.ProgressBar.last
    passes = 2 if lambdas != (1.0, 1.0) else 1
    assert progress.current == progress.total == batch * passes * (9 if tile == 4 else 1)

    pipe = OneStepSRPipeline(**{k: copy.deepcopy(v) for k, v in v2.components.items()})
    pipe.load_sr_weights(v2.weights / weights)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(3)
    ref = torch.stack([pipe(f, prompt="a cat", lambda_pix=lambdas[0], lambda_sem=lambdas[1], tile_size=tile,
                            tile_overlap=2, min_side=64, generator=g, output_type="pt").images[0]
                       for f in image.permute(0, 3, 1, 2)])
    assert (out.permute(0, 3, 1, 2) - ref).abs().max() <= 1e-4

    assert not v2.model.patches and not v2.vae.patcher.patches  # the patches went on clones
    comfy.model_management.load_models_gpu([v2.model, v2.vae.patcher])
    for before, after in ((unet_before, v2.model.model.state_dict()),
                          (vae_before, v2.vae.first_stage_model.state_dict())):
        assert all(torch.equal(after[k], v) for k, v in before.items())


def test_v2_vae_tiles_as_the_pipeline(v2, monkeypatch):
    """Above 2048² output px on CUDA both tile the VAE with image-wide GroupNorm (core.sr_step); forced here."""
    from swiftstep.core import sr_step, tiling

    calls = []
    tiled = tiling.tiled_norm_synced
    monkeypatch.setattr(tiling, "tiled_norm_synced", lambda *a, **k: calls.append(k["tile"]) or tiled(*a, **k))
    monkeypatch.setattr(sr_step, "auto_vae_tile", lambda device, size: 4)
    out = run_v2(v2, "osediff.pkl", prompt="a cat", seed=5)
    assert calls == [32, 4]  # encoder tiles of 8 × 4 px, decoder tiles of 4 latent px
    pipe = OneStepSRPipeline(**{k: copy.deepcopy(v) for k, v in v2.components.items()})
    pipe.load_sr_weights(v2.weights / "osediff.pkl")
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 16, 16, 3, generator=torch.Generator().manual_seed(2))
    ref = pipe(image[0].permute(2, 0, 1), prompt="a cat", min_side=64, vae_tile=4,
               generator=torch.Generator().manual_seed(5), output_type="pt").images
    assert (out.permute(0, 3, 1, 2) - ref).abs().max() <= 1e-4


def test_v2_prompt_conditions_osediff_only(v2):
    a = run_v2(v2, "pisa_sr.pkl", prompt="")
    assert torch.equal(run_v2(v2, "pisa_sr.pkl", prompt="a dog"), a)  # PiSA-SR: always the empty prompt
    assert (run_v2(v2, "osediff.pkl", prompt="a dog") - run_v2(v2, "osediff.pkl", prompt="")).abs().max() > 1e-4


def test_v2_errors_name_the_input(v2):
    node = "SwiftStepUpscaleV2"
    for image in (torch.rand(1, 0, 16, 3), torch.rand(0, 8, 8, 3)):
        with pytest.raises(ValueError, match=rf"{node}: input `image` must be an IMAGE batch"):
            run_v2(v2, image=image)
    with pytest.raises(ValueError, match=rf"{node}: input `lambda_pix` must be a finite number, got nan"):
        run_v2(v2, lambda_pix=float("nan"))
    with pytest.raises(ValueError, match=rf"{node}: input `tile_overlap` \(96\) must be smaller than `tile_size`"):
        run_v2(v2, tile_overlap=96)
    with pytest.raises(ValueError, match=rf"{node}: inputs `lambda_pix`/`lambda_sem` need PiSA-SR weights"):
        run_v2(v2, "osediff.pkl", lambda_sem=1.5)
    with pytest.raises(ValueError, match=rf"{node}: input `weights`: model.pkl is a DLoRAL video SR checkpoint.*"
                                         rf"SwiftStep Video Upscale"):
        run_v2(v2, "model.pkl")
    unet = v2.model.model.diffusion_model
    sd1 = fakes.WeightPatcher(fakes.FakeSD2Model(unet, fakes.model_sampling(fakes.EPS), config_name="SD15"))
    with pytest.raises(ValueError, match=rf"{node}: input `model` must be SD2.1-base .* this MODEL is SD15"):
        run_v2(v2, model=sd1)
    v_pred = fakes.WeightPatcher(fakes.FakeSD2Model(unet, fakes.model_sampling(fakes.V_PREDICTION)))
    with pytest.raises(ValueError, match=rf"{node}: input `model` .* samples as v_prediction"):
        run_v2(v2, model=v_pred)
    with pytest.raises(ValueError, match=rf"{node}: input `clip` is empty"):
        v2.nodes.SwiftStepUpscaleV2.execute(v2.model, None, v2.vae, "pisa_sr.pkl", torch.rand(1, 8, 8, 3), "", 4,
                                            1.0, 1.0, "adain", 96, 32, 64, 0)
    wide = types.SimpleNamespace(**{**vars(v2.vae), "latent_channels": 16})
    with pytest.raises(ValueError, match=rf"{node}: input `vae` must be the SD VAE"):
        run_v2(v2, vae=wide)
    (v2.weights / "cut.pkl").write_bytes((v2.weights / "pisa_sr.pkl").read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"cut.pkl: expected SR weights .*found a truncated or damaged zip archive"):
        run_v2(v2, "cut.pkl")
    fakes.INTERRUPT["flag"] = True
    with pytest.raises(fakes.InterruptProcessingException):
        run_v2(v2)


def _importing(name, globals_, fromlist, level) -> list[str]:
    """Absolute names an import statement asks for (`from ..pipelines import x` in swiftstep.nodes →
    swiftstep.pipelines, swiftstep.pipelines.x)."""
    if level:
        package = (globals_ or {}).get("__package__") or ""
        base = package.rsplit(".", level - 1)[0] if level > 1 else package
        name = f"{base}.{name}" if name else base
    return [name] + [f"{name}.{f}" for f in fromlist or ()]


def test_v2_runs_without_diffusers(v2, monkeypatch):
    """No swiftstep module imports diffusers or swiftstep.pipelines on the native path: with those imports refused to
    swiftstep code (the fakes' UNet/VAE are diffusers modules, which import their own package as they run), the node
    runs OSEDiff and adjustable, tiled PiSA-SR, and names DLoRAL weights."""
    import builtins

    importing = builtins.__import__
    refused = []

    def guarded(name, globals=None, locals=None, fromlist=(), level=0):
        if ((globals or {}).get("__name__") or "").startswith("swiftstep"):
            wanted = [n for n in _importing(name, globals, fromlist, level)
                      if n.partition(".")[0] == "diffusers" or n.startswith("swiftstep.pipelines")]
            if wanted:
                refused.append(wanted[0])
                raise ModuleNotFoundError(f"refused: {wanted[0]}", name=wanted[0])
        return importing(name, globals, locals, fromlist, level)

    for name in [m for m in sys.modules if m.startswith(("swiftstep.pipelines", "swiftstep.nodes"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(builtins, "__import__", guarded)
    from swiftstep.nodes import sr_nodes

    v2.nodes = sr_nodes
    assert run_v2(v2, "osediff.pkl", prompt="a cat").shape == (1, 64, 64, 3)
    assert run_v2(v2, "pisa_sr.pkl", lambda_pix=0.5, lambda_sem=1.5, tile_size=4, tile_overlap=2).shape == \
        (1, 64, 64, 3)
    with pytest.raises(ValueError, match="DLoRAL"):
        run_v2(v2, "model.pkl")
    assert not refused and not [m for m in sys.modules if m.startswith("swiftstep.pipelines")]
    with pytest.raises(ModuleNotFoundError, match="refused: swiftstep.pipelines"):  # the guard does refuse
        sr_nodes.SwiftStepSRLoader.execute("diffusers/sd21-base", "pisa_sr.pkl", "auto")


def test_v2_imports_and_checks_with_diffusers_missing(v2, monkeypatch):
    """As in a ComfyUI without this pack's requirements (tests/nodes/test_dependencies.py): the node module imports
    and reads SR weights files with `import diffusers` failing."""
    for name in [m for m in sys.modules if m == "diffusers" or m.startswith(("diffusers.", "swiftstep.pipelines",
                                                                              "swiftstep.nodes"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "diffusers", None)
    from swiftstep.nodes import sr_nodes

    v2.nodes = sr_nodes
    with pytest.raises(ValueError, match="model.pkl is a DLoRAL video SR checkpoint"):
        run_v2(v2, "model.pkl")
    with pytest.raises(ValueError, match="need PiSA-SR weights; osediff.pkl holds OSEDiff"):
        run_v2(v2, "osediff.pkl", lambda_pix=0.5)
    assert sys.modules["diffusers"] is None and "swiftstep.pipelines" not in sys.modules
