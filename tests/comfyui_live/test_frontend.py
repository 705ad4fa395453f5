"""The real ComfyUI frontend (the comfyui-frontend-package the server serves), in headless Chromium: every example
workflow loads with no missing node type and with its widget values intact."""

from __future__ import annotations

import json
import shutil

import pytest

from ..workflow_format import FRONTEND_ONLY, WORKFLOWS

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

LOAD_AND_INSPECT = """async (workflow) => {
    const app = window.app;
    const registered = new Set(Object.keys(window.LiteGraph.registered_node_types));
    const missing = [...new Set(workflow.nodes.map(n => n.type))].filter(t => !registered.has(t));
    await app.loadGraphData(workflow, true, true, "swiftstep-test");
    const nodes = app.graph._nodes.map(n => ({id: n.id, type: n.type, has_errors: !!n.has_errors,
                                             widgets: (n.widgets || []).map(w => w.value)}));
    return {missing, nodes};
}"""


@pytest.fixture(scope="module")
def page(server):
    if CHROMIUM is None:
        pytest.skip("needs Chromium (Debian package `chromium`)")
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page()
        page.goto(server)
        page.wait_for_function("window.app && window.app.graph && window.LiteGraph && "
                               "'SwiftStepPresetSigmas' in window.LiteGraph.registered_node_types", timeout=180_000)
        yield page
        browser.close()


@pytest.mark.parametrize("path", WORKFLOWS, ids=[w.stem for w in WORKFLOWS])
def test_workflow_loads_in_the_frontend_without_missing_nodes(page, path):
    workflow = json.loads(path.read_text())
    result = page.evaluate(LOAD_AND_INSPECT, workflow)
    assert result["missing"] == []
    loaded = {n["id"]: n for n in result["nodes"]}
    assert set(loaded) == {n["id"] for n in workflow["nodes"]}
    for node in workflow["nodes"]:
        got = loaded[node["id"]]
        assert got["type"] == node["type"] and not got["has_errors"], got
        if node["type"] not in FRONTEND_ONLY:
            assert got["widgets"] == node["widgets_values"], (node["type"], got["widgets"])
