"""A real ComfyUI server on 127.0.0.1 with the pack in custom_nodes: every node listed, every example workflow runs.

The server and its models come from conftest.py (`server`, `base_dir`).
"""

from __future__ import annotations

import json
import time
import urllib.request

import pytest

from ..workflow_format import WORKFLOWS, live_test_skip, required_comfyui, to_api, validate, version_key
from .conftest import TEST_SIZE, get_json as _get


def test_pack_loads_and_lists_every_node(server, base_dir):
    info = _get(server + "/object_info")
    ours = sorted(k for k in info if k.startswith("SwiftStep"))
    assert ours == ["SwiftStepFastPath", "SwiftStepMARLoader", "SwiftStepMARSample", "SwiftStepNASA", "SwiftStepOneStepSampler",
                    "SwiftStepPresetSigmas", "SwiftStepSRLoader", "SwiftStepSanaSprintLoader",
                    "SwiftStepSanaSprintSampler", "SwiftStepTritonAttention", "SwiftStepUpscale",
                    "SwiftStepUpscaleV2", "SwiftStepVideoUpscale"]
    for name in ours:
        assert info[name]["category"].startswith("swiftstep/")
    log = (base_dir / "comfyui.log").read_text()
    assert "IMPORT FAILED" not in log and "Traceback" not in log, log[-3000:]
    templates = _get(server + "/api/workflow_templates")
    assert sorted(templates.get("swiftstep", [])) == sorted(w.stem for w in WORKFLOWS)  # the template browser
    version = _get(server + "/system_stats")["system"]["comfyui_version"]
    print(f"ComfyUI {version}")


def skip_if_unsupported(server, workflow, runs: bool = True) -> None:
    """Skip a workflow that needs a newer ComfyUI than the server, or (to run it) models the live test cannot build."""
    version = _get(server + "/system_stats")["system"]["comfyui_version"]
    if version_key(required_comfyui(workflow)) > version_key(version):
        pytest.skip(f"needs ComfyUI ≥ {required_comfyui(workflow)}, the server is {version}")
    if runs and live_test_skip(workflow):
        pytest.skip(live_test_skip(workflow))


@pytest.mark.parametrize("path", WORKFLOWS, ids=[w.stem for w in WORKFLOWS])
def test_workflow_runs_to_a_saved_image(server, base_dir, path):
    workflow = json.loads(path.read_text())
    skip_if_unsupported(server, workflow)
    specs = _get(server + "/object_info")
    assert validate(workflow, specs) == []  # against the live server's own node specs
    prompt = to_api(workflow, specs)
    for node in prompt.values():
        if node["class_type"] in ("EmptyLatentImage", "SwiftStepSanaSprintSampler"):
            node["inputs"].update(width=TEST_SIZE, height=TEST_SIZE)
        if node["class_type"] in ("SwiftStepUpscale", "SwiftStepUpscaleV2"):
            node["inputs"].update(min_side=TEST_SIZE)  # tiny random SD2: keep the CPU run short
        if node["class_type"] == "SwiftStepMARSample":
            node["inputs"].update(num_iter=4, steps_start=4, steps_end=2)  # MAR-B on the CPU: a short run
    body = json.dumps({"prompt": prompt, "client_id": "swiftstep-live-test"}).encode()
    request = urllib.request.Request(server + "/prompt", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            answer = json.loads(r.read())
    except urllib.error.HTTPError as e:
        pytest.fail(f"/prompt refused {path.name}: {e.read().decode()[:2000]}")
    assert answer["node_errors"] == {}
    prompt_id = answer["prompt_id"]
    deadline = time.time() + 900
    while time.time() < deadline:
        history = _get(f"{server}/history/{prompt_id}")
        if history:
            break
        time.sleep(1)
    else:
        pytest.fail(f"{path.name} did not finish in 15 minutes")
    status = history[prompt_id]["status"]
    assert status["status_str"] == "success", json.dumps(status)[:3000]
    images = [img for out in history[prompt_id]["outputs"].values() for img in out.get("images", [])]
    assert images, history[prompt_id]["outputs"]
    for img in images:
        assert (base_dir / "output" / img["subfolder"] / img["filename"]).is_file()


def test_bad_steps_is_a_validation_error_naming_node_input_and_allowed_values(server):
    specs = _get(server + "/object_info")
    workflow = json.loads(next(w for w in WORKFLOWS if w.stem == "sd_turbo_one_step").read_text())
    prompt = to_api(workflow, specs)
    sigmas_node = next(k for k, n in prompt.items() if n["class_type"] == "SwiftStepPresetSigmas")
    prompt[sigmas_node]["inputs"]["steps"] = 7  # sd-turbo has 1–4 steps
    body = json.dumps({"prompt": prompt}).encode()
    request = urllib.request.Request(server + "/prompt", data=body, headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=60)
    assert e.value.code == 400
    errors = json.loads(e.value.read())["node_errors"][sigmas_node]["errors"]
    assert any("input `steps` = 7 does not fit preset 'sd-turbo'; allowed: 0" in json.dumps(err) for err in errors)


def test_sana_sprint_size_not_a_multiple_of_32_is_a_validation_error(server):
    specs = _get(server + "/object_info")
    prompt = to_api(json.loads(next(w for w in WORKFLOWS if w.stem == "sana_sprint").read_text()), specs)
    sampler = next(k for k, n in prompt.items() if n["class_type"] == "SwiftStepSanaSprintSampler")
    prompt[sampler]["inputs"]["width"] = 1000
    request = urllib.request.Request(server + "/prompt", data=json.dumps({"prompt": prompt}).encode(),
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=60)
    assert e.value.code == 400
    errors = json.loads(e.value.read())["node_errors"][sampler]["errors"]
    expected = "SwiftStepSanaSprintSampler: input `width` must be a multiple of 32"
    assert any(expected in json.dumps(err) for err in errors)
