"""Every example workflow matches the node schemas it uses, so a renamed or re-ordered input fails CI."""

import asyncio
import copy
import json

import pytest

from . import comfy_fakes as fakes
from .workflow_format import (WORKFLOWS, core_specs, layout_problems, node_box, spec_from_schema, to_api,
                              validate)


@pytest.fixture
def specs(monkeypatch):
    fakes.install(monkeypatch)
    import swiftstep

    nodes = asyncio.run(asyncio.run(swiftstep.comfy_entrypoint()).get_node_list())
    ours = {n.define_schema().node_id: spec_from_schema(n.define_schema()) for n in nodes}
    return {**core_specs(), **ours}


def test_there_are_workflows_for_each_family():
    names = {w.stem for w in WORKFLOWS}
    assert {"sd_turbo_one_step", "sdxl_dmd2_4step", "sd_turbo_negative_prompt_nasa", "pisa_sr_upscale",
            "mar_disa_imagenet", "dloral_video_upscale", "sd_turbo_fast_path"} <= names


@pytest.mark.parametrize("path", WORKFLOWS, ids=[w.stem for w in WORKFLOWS])
def test_workflow_matches_node_schemas(specs, path):
    workflow = json.loads(path.read_text())
    assert workflow["version"] == 0.4
    assert validate(workflow, specs) == []
    prompt = to_api(workflow, specs)
    assert any(n["class_type"] in ("SaveImage", "SaveVideo") for n in prompt.values())
    notes = [n for n in workflow["nodes"] if n["type"] == "Note"]
    assert notes and "huggingface.co/" in notes[0]["widgets_values"][0]  # says where to get the model files


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
