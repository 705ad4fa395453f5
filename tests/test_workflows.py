"""Every example workflow matches the node schemas it uses, so a renamed or re-ordered input fails CI."""

import asyncio
import copy
import json

import pytest

from . import comfy_fakes as fakes
from .workflow_format import (DEFAULT_COMFYUI, WORKFLOWS, comfyui_versions, core_specs, layout_problems,
                              live_test_skip, node_box, required_comfyui, spec_from_schema, supported_comfyui, to_api,
                              validate)

# One example per distilled DiT family: SwiftStepPresetSigmas' σ grid sampled by ComfyUI's own euler at cfg 1.
DIT_WORKFLOWS = {"flux1_schnell_4step": "flux-schnell", "sd35_large_turbo_4step": "sd35-large-turbo",
                 "zimage_turbo_8step": "zimage-turbo", "qwen_image_lightning_4step": "qwen-image-lightning-4step",
                 "flux2_klein_4step": "flux2-klein"}


@pytest.fixture
def ours(monkeypatch):
    fakes.install(monkeypatch)
    import swiftstep

    nodes = asyncio.run(asyncio.run(swiftstep.comfy_entrypoint()).get_node_list())
    return {n.define_schema().node_id: spec_from_schema(n.define_schema()) for n in nodes}


@pytest.fixture
def specs(ours):
    return {**core_specs(), **ours}


def test_there_are_workflows_for_each_family():
    names = {w.stem for w in WORKFLOWS}
    assert {"sd_turbo_one_step", "sdxl_dmd2_4step", "sd_turbo_negative_prompt_nasa", "pisa_sr_upscale",
            "mar_disa_imagenet", "dloral_video_upscale", "sd_turbo_fast_path", "sana_sprint", *DIT_WORKFLOWS} <= names


@pytest.mark.parametrize("path", WORKFLOWS, ids=[w.stem for w in WORKFLOWS])
def test_workflow_matches_node_schemas(ours, path):
    """Against the core nodes of the oldest ComfyUI the workflow claims (extra.swiftstep.requires_comfyui, default
    0.3.64)."""
    workflow = json.loads(path.read_text())
    assert workflow["version"] == 0.4
    specs = {**core_specs(required_comfyui(workflow)), **ours}
    assert validate(workflow, specs) == []
    prompt = to_api(workflow, specs)
    assert any(n["class_type"] in ("SaveImage", "SaveVideo") for n in prompt.values())
    notes = [n for n in workflow["nodes"] if n["type"] == "Note"]
    assert notes and "huggingface.co/" in notes[0]["widgets_values"][0]  # says where to get the model files


@pytest.mark.parametrize("path", WORKFLOWS, ids=[w.stem for w in WORKFLOWS])
def test_workflow_loads_in_every_newer_comfyui(ours, path):
    """A workflow keeps loading in every captured ComfyUI from its minimum on (inputs renamed, combos changed, …)."""
    workflow = json.loads(path.read_text())
    versions = supported_comfyui(workflow)
    assert required_comfyui(workflow) in comfyui_versions() and versions  # the minimum has captured specs
    for version in versions:
        assert validate(workflow, {**core_specs(version), **ours}) == [], f"ComfyUI {version}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=[w.stem for w in WORKFLOWS])
def test_swiftstep_extra_is_well_formed(path):
    """extra.swiftstep holds only known keys; a live-test flag is "skip: <reason>"."""
    extra = json.loads(path.read_text()).get("extra", {}).get("swiftstep", {})
    assert set(extra) <= {"requires_comfyui", "live_test"}
    if "live_test" in extra:
        assert extra["live_test"].startswith("skip: ") and len(extra["live_test"]) > len("skip: ") + 10


@pytest.mark.parametrize("stem", DIT_WORKFLOWS)
def test_distilled_dit_workflow_samples_the_preset_grid_with_euler_at_cfg_1(ours, stem):
    """loader → SwiftStepPresetSigmas (the family's preset, default steps) → SamplerCustomAdvanced with KSamplerSelect
    euler and BasicGuider (cfg 1: no negative) on the same MODEL as the sigmas, the empty latent's size given to the
    σ node too (only flux2-klein reads it, from the same Width/Height nodes as the latent)."""
    workflow = json.loads(next(w for w in WORKFLOWS if w.stem == stem).read_text())
    specs = {**core_specs(required_comfyui(workflow)), **ours}
    prompt = to_api(workflow, specs)
    by_type = {}
    for node_id, node in prompt.items():
        by_type.setdefault(node["class_type"], []).append(node_id)
    (sca,) = by_type["SamplerCustomAdvanced"]
    inputs = prompt[sca]["inputs"]
    source = {name: prompt[inputs[name][0]] for name in ("noise", "guider", "sampler", "sigmas", "latent_image")}
    assert source["noise"]["class_type"] == "RandomNoise"
    assert source["guider"]["class_type"] == "BasicGuider"
    assert source["sampler"] == {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    sigmas = source["sigmas"]
    assert sigmas["class_type"] == "SwiftStepPresetSigmas"
    assert sigmas["inputs"]["preset"] == DIT_WORKFLOWS[stem] and sigmas["inputs"]["steps"] == 0
    assert sigmas["inputs"]["model"] == source["guider"]["inputs"]["model"]  # the σ and the sampling see one MODEL
    assert "CFGGuider" not in by_type and "KSampler" not in by_type
    latent = source["latent_image"]
    for side in ("width", "height"):
        assert sigmas["inputs"][side] == latent["inputs"][side]  # both linked to one node, or the same number
        if stem == "flux2_klein_4step":
            assert isinstance(latent["inputs"][side], list)  # linked: one place to change the size
            assert prompt[latent["inputs"][side][0]]["class_type"] == "PrimitiveInt"
    assert live_test_skip(workflow)  # the live server test cannot build these families' real-size encoders
    note = next(n for n in workflow["nodes"] if n["type"] == "Note")["widgets_values"][0]
    assert "models/diffusion_models/" in note or "models/checkpoints/" in note
    assert "models/text_encoders/" in note and DIT_WORKFLOWS[stem] in note


def test_comfyui_minimum_selects_the_specs():
    """A workflow that names no minimum is checked against 0.3.64; one that needs a newer node (FLUX.2's latent) fails
    there and names the release whose specs it loads in; an uncaptured release is an error, not a silent pass."""
    assert DEFAULT_COMFYUI == comfyui_versions()[0] == "0.3.64" and "0.33.0" in comfyui_versions()
    flux2 = json.loads(next(w for w in WORKFLOWS if w.stem == "flux2_klein_4step").read_text())
    assert required_comfyui(flux2) == "0.33.0" and "EmptyFlux2LatentImage" not in core_specs()
    unnamed = copy.deepcopy(flux2)
    del unnamed["extra"]["swiftstep"]["requires_comfyui"]
    assert required_comfyui(unnamed) == "0.3.64" and supported_comfyui(unnamed) == comfyui_versions()
    unnamed["extra"]["swiftstep"]["requires_comfyui"] = "9.9.9"
    assert supported_comfyui(unnamed) == []
    with pytest.raises(ValueError, match="no core node specs"):
        core_specs(required_comfyui(unnamed))


def test_validation_catches_drift_against_the_required_comfyui(ours):
    flux2 = json.loads(next(w for w in WORKFLOWS if w.stem == "flux2_klein_4step").read_text())
    assert any("unknown node type 'EmptyFlux2LatentImage'" in e for e in validate(flux2, {**core_specs(), **ours}))
    zimage = json.loads(next(w for w in WORKFLOWS if w.stem == "zimage_turbo_8step").read_text())
    w = copy.deepcopy(zimage)
    next(n for n in w["nodes"] if n["type"] == "CLIPLoader")["widgets_values"][1] = "flux2"
    assert validate(w, {**core_specs("0.33.0"), **ours}) == []  # 0.33 has FLUX.2's text encoder type …
    assert any("'flux2' is not one of" in e for e in validate(w, {**core_specs("0.3.64"), **ours}))  # … 0.3.64 not


def test_validation_catches_drift(specs):
    base = json.loads(next(w for w in WORKFLOWS if w.stem == "sd_turbo_one_step").read_text())
    by_type = {n["type"]: i for i, n in enumerate(base["nodes"])}

    w = copy.deepcopy(base)
    w["nodes"][by_type["SwiftStepPresetSigmas"]]["widgets_values"] = ["sd-turbo"]  # a widget went missing
    assert any("widget values, expected" in e or "no value for widget" in e for e in validate(w, specs))

    w = copy.deepcopy(base)
    w["nodes"][by_type["SwiftStepOneStepSampler"]]["widgets_values"] = ["sd-turbo", 3.0]  # out of range
    assert any("outside" in e for e in validate(w, specs))

    w = copy.deepcopy(base)
    w["nodes"][by_type["SwiftStepOneStepSampler"]]["type"] = "SwiftStepSampler"  # renamed node id
    assert any("unknown node type" in e for e in validate(w, specs))

    w = copy.deepcopy(base)
    w["nodes"][by_type["SwiftStepPresetSigmas"]]["widgets_values"] = ["dmd3", 0]  # unknown preset
    assert any("is not one of" in e for e in validate(w, specs))

    w = copy.deepcopy(base)
    sigmas_link = next(r for r in w["links"] if r[5] == "SIGMAS")
    sigmas_link[2], sigmas_link[5] = 0, "MODEL"  # wire a MODEL into `sigmas`
    assert any("takes SIGMAS" in e for e in validate(w, specs))


@pytest.mark.parametrize("path", WORKFLOWS, ids=[w.stem for w in WORKFLOWS])
def test_workflow_is_laid_out_left_to_right_without_overlaps(path):
    """Nodes from `pos`/`size` (title bar above `pos`): none on top of or within 30 px of another, none under the
    sidebar or above the canvas, every link running from a node to one right of it (Notes aside), groups around
    whole nodes."""
    assert layout_problems(json.loads(path.read_text())) == []


def test_layout_check_catches_hand_placed_layouts():
    base = json.loads(next(w for w in WORKFLOWS if w.stem == "sd_turbo_fast_path").read_text())
    by_type = {n["type"]: i for i, n in enumerate(base["nodes"])}
    assert layout_problems(base) == []

    w = copy.deepcopy(base)  # the Fast Path node under the Prompt node, as the first version of this file had it
    fast, prompt = w["nodes"][by_type["SwiftStepFastPath"]], next(n for n in w["nodes"] if n.get("title") == "Prompt")
    fast["pos"] = [prompt["pos"][0], prompt["pos"][1] - 40]
    assert any("overlap" in e and "SwiftStepFastPath" in e for e in layout_problems(w))

    w = copy.deepcopy(base)  # Save Image 20 px right of VAE Decode: no overlap, but closer than the 30 px gap
    decode, save = w["nodes"][by_type["VAEDecode"]], w["nodes"][by_type["SaveImage"]]
    save["pos"] = [node_box(decode)[2] + 20, decode["pos"][1]]
    assert any("closer than" in e for e in layout_problems(w))

    w = copy.deepcopy(base)  # a link running right to left: Save Image moved below the loader
    w["nodes"][by_type["SaveImage"]]["pos"] = [60, 2000]
    assert any("right to left" in e for e in layout_problems(w))

    w = copy.deepcopy(base)  # under the sidebar / above the canvas
    w["nodes"][by_type["Note"]]["pos"] = [10, 10]
    assert any("keep x >= 50" in e for e in layout_problems(w))
