"""Every example workflow matches the node schemas it uses, so a renamed or re-ordered input fails CI."""

import asyncio
import copy
import json

import pytest

from . import comfy_fakes as fakes
from .workflow_format import WORKFLOWS, core_specs, spec_from_schema, to_api, validate


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
