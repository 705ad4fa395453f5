"""The real ComfyUI frontend (the comfyui-frontend-package the server serves, or the build in $COMFYUI_FRONTEND_ROOT),
in headless Chromium: every example workflow loads with no missing node type, with its widget values intact, with
nodes large enough for their widgets and none on top of another; a screenshot of each is saved for review."""

from __future__ import annotations

import json
import shutil
import urllib.request

import pytest

from ..workflow_format import FRONTEND_ONLY, WORKFLOWS, assign_widgets, boxes_overlap, core_specs, required_comfyui
from .test_server_workflows import skip_if_unsupported

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
VIEWPORT = {"width": 1920, "height": 1080}
# nodes whose preview follows the loaded file (LoadVideo grows to the video's aspect ratio once it has loaded, and
# its computeSize() then reports more than the node's own width), so their size is not checked against computeSize()
MEDIA_PREVIEW = {"LoadVideo"}

LOAD = """async ([workflow, name]) => {
    const registered = new Set(Object.keys(window.LiteGraph.registered_node_types));
    const missing = [...new Set(workflow.nodes.map(n => n.type))].filter(t => !registered.has(t));
    await window.app.loadGraphData(workflow, true, true, name);
    return missing;
}"""

# Node ids as strings: newer frontends report '1' where the workflow file has 1. Widgets the frontend adds to show a
# loaded file ('$$canvas-image-preview', 'video-preview') are not in widgets_values and are left out. A node's box is
# its body (pos, size) plus the title bar LiteGraph draws above pos; getBounding() is only refreshed when the canvas
# draws, so it is not used.
INSPECT = """() => {
    const title = window.LiteGraph.NODE_TITLE_HEIGHT;
    const isPreview = w => String(w.name).startsWith("$$") || String(w.name).endsWith("-preview");
    return window.app.graph._nodes.map(n => ({
        id: String(n.id), type: n.type, has_errors: !!n.has_errors,
        widgets: (n.widgets || []).filter(w => !isPreview(w)).map(w => w.value),
        widget_names: (n.widgets || []).filter(w => !isPreview(w)).map(w => w.name),
        box: [n.pos[0], n.pos[1] - title, n.pos[0] + n.size[0], n.pos[1] + n.size[1]],
        size: [n.size[0], n.size[1]], min_size: Array.from(n.computeSize()),
    }));
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
        page = browser.new_page(viewport=VIEWPORT)
        # a user who has seen the tour: newer frontends open the template browser over the canvas for a new one
        urllib.request.urlopen(urllib.request.Request(f"{server}/settings/Comfy.TutorialCompleted", data=b"true",
                                                      method="POST"), timeout=30)
        page.goto(server)
        page.wait_for_function("window.app && window.app.graph && window.LiteGraph && "
                               "'SwiftStepPresetSigmas' in window.LiteGraph.registered_node_types", timeout=180_000)
        _close_dialogs(page)
        print(f"\nComfyUI frontend {page.evaluate('window.__COMFYUI_FRONTEND_VERSION__ || null')}")
        yield page
        browser.close()


def _close_dialogs(page) -> None:
    """Close what a frontend may pop up over the canvas (the template browser, release notes)."""
    for _ in range(3):
        if not page.locator(".p-dialog-mask").count():
            return
        page.keyboard.press("Escape")
        page.wait_for_timeout(300)


def _load(page, workflow: dict, name: str):
    """Load a workflow; return (missing node types, the nodes as the frontend shows them once previews have loaded
    and no node changes size any more)."""
    missing = page.evaluate(LOAD, [workflow, name])
    nodes = page.evaluate(INSPECT)
    for _ in range(20):  # up to ~5 s for media previews (LoadVideo) to load and resize their node
        page.wait_for_timeout(250)
        again = page.evaluate(INSPECT)
        if again == nodes:
            break
        nodes = again
    _close_dialogs(page)
    return missing, {n["id"]: n for n in nodes}


def _check_widgets(node: dict, got: dict, stem: str, version: str) -> None:
    values = node["widgets_values"]
    if len(got["widgets"]) == len(values) or node["type"].startswith("SwiftStep"):
        assert got["widgets"] == values, (node["type"], got["widgets"])
        return
    # A core node whose widget list changed after ComfyUI 0.3.64 (e.g. CreateVideo gains `bit_depth`, SaveVideo a
    # `format.codec` sub-widget): every value the file holds must still sit on the widget of the same name.
    by_name = dict(zip(got["widget_names"], got["widgets"]))
    expected = assign_widgets({**node, "inputs": []}, core_specs(version)[node["type"]])  # linked widgets too
    assert {k: by_name.get(k, "<missing>") for k in expected} == expected, (node["type"], by_name)
    print(f"{stem}: {node['type']} (node {node['id']}) shows widgets {got['widget_names']}; the file (ComfyUI "
          f"{version}) has {list(expected)}, values intact")


@pytest.mark.parametrize("path", WORKFLOWS, ids=[w.stem for w in WORKFLOWS])
def test_workflow_loads_in_the_frontend_without_missing_nodes(server, page, path, tmp_path, record_property):
    workflow = json.loads(path.read_text())
    skip_if_unsupported(server, workflow, runs=False)  # loading the graph needs no models
    missing, loaded = _load(page, workflow, path.stem)
    shot = tmp_path / f"{path.stem}.png"
    page.screenshot(path=str(shot))
    record_property("screenshot", str(shot))
    print(f"{path.stem}: screenshot {shot}")

    assert missing == []
    assert set(loaded) == {str(n["id"]) for n in workflow["nodes"]}
    for node in workflow["nodes"]:
        got = loaded[str(node["id"])]
        assert got["type"] == node["type"] and not got["has_errors"], got
        if node["type"] not in FRONTEND_ONLY:
            _check_widgets(node, got, path.stem, required_comfyui(workflow))

    # the file's sizes show every widget: the frontend would otherwise enlarge the node (towards its neighbours)
    too_small = {f"{n['id']} {n['type']}": (node["size"], [round(v) for v in n["min_size"]])
                 for node in workflow["nodes"] for n in [loaded[str(node["id"])]]
                 if n["type"] not in MEDIA_PREVIEW
                 and (n["min_size"][0] > node["size"][0] + 1 or n["min_size"][1] > node["size"][1] + 1)}
    assert too_small == {}, "node size in the file (w, h) smaller than the frontend's computeSize()"

    ids = list(loaded)
    overlapping = [(f"{a} {loaded[a]['type']}", f"{b} {loaded[b]['type']}", loaded[a]["box"], loaded[b]["box"])
                   for i, a in enumerate(ids) for b in ids[i + 1:] if boxes_overlap(loaded[a]["box"], loaded[b]["box"])]
    assert overlapping == [], "nodes on top of each other as the frontend lays them out"
