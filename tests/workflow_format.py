"""ComfyUI workflow files: check a UI-format workflow against node specs, and convert it to API format.

Node specs have the `/object_info` shape. Core nodes come from `tests/data/comfyui_<version>_core_nodes.json`
(`GET /object_info` of a real ComfyUI of that version, started with `--cpu --disable-all-custom-nodes`, reduced to the
core nodes the workflows use, file-name combos as `["<files>"]`): 0.3.64 by default, or the release a workflow names
as its minimum in `extra.swiftstep.requires_comfyui` (e.g. "0.33.0" for Z-Image and FLUX.2). Ours are derived from
our `define_schema()` (see `spec_from_schema`). `extra.swiftstep.live_test` = "skip: <reason>" marks a workflow the
live server test cannot run (see `live_test_skip`).

Widget values in a UI workflow are positional, in `input_order`, with one extra value after every input that has
`control_after_generate` (the frontend's "fixed/randomize" widget) or an upload button (`image_upload`,
`video_upload`); a widget whose input is linked still holds its slot (the link wins) — the rules the frontend
itself applies.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


DATA = ROOT / "tests/data"
DEFAULT_COMFYUI = "0.3.64"  # the oldest ComfyUI the pack supports: a workflow that names no minimum must load in it


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def comfyui_versions() -> list[str]:
    """The ComfyUI releases whose core node specs are captured in tests/data, oldest first."""
    names = (p.name[len("comfyui_"):-len("_core_nodes.json")] for p in DATA.glob("comfyui_*_core_nodes.json"))
    return sorted(names, key=version_key)


def core_specs(version: str = DEFAULT_COMFYUI) -> dict:
    """Core node specs of ComfyUI `version` (one of `comfyui_versions()`)."""
    path = DATA / f"comfyui_{version}_core_nodes.json"
    if not path.exists():
        raise ValueError(f"no core node specs captured for ComfyUI {version}; have {comfyui_versions()}")
    data = json.loads(path.read_text())
    assert data["comfyui_version"] == version, path
    return data["nodes"]


def swiftstep_extra(workflow: dict) -> dict:
    """The workflow's `extra.swiftstep` dict (what the pack's tests read: requires_comfyui, live_test)."""
    return workflow.get("extra", {}).get("swiftstep", {})


def required_comfyui(workflow: dict) -> str:
    """The oldest ComfyUI the workflow runs in: `extra.swiftstep.requires_comfyui`, else DEFAULT_COMFYUI."""
    return swiftstep_extra(workflow).get("requires_comfyui", DEFAULT_COMFYUI)


def supported_comfyui(workflow: dict) -> list[str]:
    """The captured ComfyUI releases the workflow must load in: its minimum and every newer one."""
    minimum = version_key(required_comfyui(workflow))
    return [v for v in comfyui_versions() if version_key(v) >= minimum]


def live_test_skip(workflow: dict) -> str | None:
    """Why the live server test skips this workflow (`extra.swiftstep.live_test` = "skip: <reason>"), else None."""
    flag = swiftstep_extra(workflow).get("live_test")
    if isinstance(flag, str) and flag.startswith("skip:"):
        return flag[len("skip:"):].strip()
    return None


def spec_from_schema(schema) -> dict:
    """/object_info shape of a V3 schema (fake `comfy_api` specs from tests.comfy_fakes)."""
    required, optional, order_r, order_o = {}, {}, [], []
    for inp in schema.inputs:
        opts = {k: v for k, v in inp.kwargs.items() if v is not None and k not in ("optional", "display_name", "lazy")}
        (optional if inp.kwargs.get("optional") else required)[inp.id] = [inp.io_type, opts]
        (order_o if inp.kwargs.get("optional") else order_r).append(inp.id)
    return {"input": {"required": required, "optional": optional},
            "input_order": {"required": order_r, "optional": order_o},
            "output": [o.io_type for o in schema.outputs],
            "output_name": [o.kwargs.get("display_name") or o.io_type for o in schema.outputs],
            "category": schema.category}


def _linked_inputs(node: dict) -> set[str]:
    return {i["name"] for i in node.get("inputs", []) if i.get("link") is not None}


DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"  # newer ComfyUI (0.33: SaveVideo `format`): a combo whose option adds widgets


def _entries(inputs: dict, order: dict | None = None) -> list[tuple[str, str, dict, bool]]:
    """(name, type, options, optional) of a spec's inputs in order; a COMBO given as a list has its options inline."""
    out = []
    for section in ("required", "optional"):
        names = order.get(section, []) if order is not None else list(inputs.get(section, {}))
        for name in names:
            kind, *rest = inputs[section][name]
            opts = dict(rest[0]) if rest else {}
            if isinstance(kind, list):
                kind, opts = "COMBO", {**opts, "options": kind}
            out.append((name, kind, opts, section == "optional"))
    return out


def _assign(node: dict, spec: dict) -> list[tuple[str, str, dict, object]]:
    """(input name, type, options, value) for a UI node's widgets_values, in the frontend's order: a dynamic combo's
    selected option's widgets follow it, named `parent.child`; an optional widget with no value left (added to the
    node after the workflow was saved) takes its default, as in the frontend. Raises ValueError on a count mismatch."""
    values = list(node.get("widgets_values") or [])
    out, pos = [], 0

    def walk(entries, prefix):
        nonlocal pos
        for name, kind, opts, optional in entries:
            if kind not in WIDGET_TYPES and kind != DYNAMIC_COMBO:
                continue
            full = prefix + name
            if pos >= len(values):
                if optional:
                    continue
                raise ValueError(f"node {node['id']} ({node['type']}): no value for widget `{full}`")
            value = values[pos]
            out.append((full, kind, opts, value))
            # the frontend adds one widget after a seed ("fixed/randomize…") and after a file picker ("upload")
            pos += 2 if opts.get("control_after_generate") or opts.get("image_upload") or opts.get("video_upload") else 1
            if kind == DYNAMIC_COMBO:
                option = next((o for o in opts.get("options", []) if o["key"] == value), None)
                if option is not None:
                    walk(_entries(option["inputs"]), full + ".")

    walk(_entries(spec["input"], spec["input_order"]), "")
    if pos != len(values):
        raise ValueError(f"node {node['id']} ({node['type']}): {len(values)} widget values, expected {pos}")
    return out


def assign_widgets(node: dict, spec: dict) -> dict:
    """{input name: value} for a UI node's widgets_values (linked widgets keep their slot; their value is not used);
    raises ValueError on a count mismatch."""
    linked = _linked_inputs(node)
    return {name: value for name, _, _, value in _assign(node, spec) if name not in linked}


def _check_value(node, name, kind, opts, value) -> str | None:
    where = f"node {node['id']} ({node['type']}) widget `{name}`"
    if kind == "BOOLEAN" and not isinstance(value, bool):
        return f"{where}: expected a boolean, got {value!r}"
    if kind in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind == "INT" and not float(value).is_integer()):
            return f"{where}: expected {kind}, got {value!r}"
        if not opts.get("min", -float("inf")) <= value <= opts.get("max", float("inf")):
            return f"{where}: {value} outside [{opts.get('min')}, {opts.get('max')}]"
    if kind == "STRING" and not isinstance(value, str):
        return f"{where}: expected a string, got {value!r}"
    if kind == DYNAMIC_COMBO and value not in [o["key"] for o in opts.get("options", [])]:
        return f"{where}: {value!r} is not one of {[o['key'] for o in opts.get('options', [])]}"
    if kind == "COMBO" and opts.get("options") != ["<files>"] and value not in opts.get("options", []):
        return f"{where}: {value!r} is not one of {opts.get('options')}"
    return None


def validate(workflow: dict, specs: dict) -> list[str]:
    """Every problem a user would hit loading this workflow: unknown nodes, widget drift, mistyped links."""
    errors = []
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        spec = specs.get(node["type"])
        if spec is None:
            errors.append(f"node {node['id']}: unknown node type {node['type']!r}")
            continue
        try:
            assigned = _assign(node, spec)
        except ValueError as e:
            errors.append(str(e))
            continue
        for name, kind, opts, value in assigned:
            if name not in _linked_inputs(node):
                err = _check_value(node, name, kind, opts, value)
                if err:
                    errors.append(err)
        all_inputs = {**spec["input"].get("required", {}), **spec["input"].get("optional", {})}
        for name in spec["input"].get("required", {}):
            kind = all_inputs[name][0]
            if not isinstance(kind, list) and kind not in WIDGET_TYPES and kind != DYNAMIC_COMBO and \
                    name not in _linked_inputs(node):
                errors.append(f"node {node['id']} ({node['type']}): required input `{name}` is not connected")
        for inp in node.get("inputs", []):
            if inp["name"] not in all_inputs:
                errors.append(f"node {node['id']} ({node['type']}): no input named `{inp['name']}`")
    for link_id, src, src_slot, dst, dst_slot, kind in workflow["links"]:
        src_spec, dst_node = specs.get(nodes[src]["type"]), nodes[dst]
        dst_spec = specs.get(dst_node["type"])
        if src_spec is None or dst_spec is None:
            continue
        out_type = src_spec["output"][src_slot] if src_slot < len(src_spec["output"]) else None
        name = dst_node["inputs"][dst_slot]["name"]
        spec_in = {**dst_spec["input"].get("required", {}), **dst_spec["input"].get("optional", {})}.get(name)
        in_type = spec_in[0] if spec_in else None
        if not (out_type == in_type == kind):
            errors.append(f"link {link_id}: {nodes[src]['type']} output {src_slot} is {out_type}, "
                          f"{dst_node['type']}.{name} takes {in_type}, link says {kind}")
    return errors


def to_api(workflow: dict, specs: dict) -> dict:
    """The API-format prompt (`POST /prompt`) the frontend would send for this UI workflow."""
    links = {row[0]: row for row in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        inputs = assign_widgets(node, specs[node["type"]])
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                _, src, src_slot, *_ = links[inp["link"]]
                inputs[inp["name"]] = [str(src), src_slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


# --------------------------------------------------------------------------- layout
# A node's box as LiteGraph draws it: `pos` is the top-left of the body, the title bar (NODE_TITLE_HEIGHT, 30 px)
# sits above it. The left sidebar of the current frontends covers the first ~50 px of the canvas at the default view.
TITLE_HEIGHT = 30
MIN_GAP = 30  # px between any two node boxes
MIN_X = 50


def node_box(node: dict, title_height: float = TITLE_HEIGHT) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of a UI node, title bar included."""
    (x, y), (w, h) = node["pos"], node["size"]
    return x, y - title_height, x + w, y + h


def boxes_overlap(a, b, gap: float = 0) -> bool:
    """Whether boxes (left, top, right, bottom) come closer than `gap` px (0: whether they overlap)."""
    return a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap


def layout_problems(workflow: dict, gap: float = MIN_GAP) -> list[str]:
    """What makes a workflow look hand-placed: nodes on top of (or closer than `gap` to) each other, nodes off the
    canvas or under the sidebar, links that run right to left (a wire's source must end left of its target), groups
    that cut through a node or overlap each other."""
    errors = []
    nodes = {n["id"]: n for n in workflow["nodes"]}
    name = {i: f"node {i} ({n.get('title') or n['type']})" for i, n in nodes.items()}
    boxes = {i: node_box(n) for i, n in nodes.items()}
    for i, (left, top, right, bottom) in boxes.items():
        if left < MIN_X or top < 0:
            errors.append(f"{name[i]}: box starts at ({left}, {top}); keep x >= {MIN_X} and the title bar at y >= 0")
    ids = list(boxes)
    for k, i in enumerate(ids):
        for j in ids[k + 1:]:
            if boxes_overlap(boxes[i], boxes[j], gap):
                how = "overlap" if boxes_overlap(boxes[i], boxes[j]) else f"are closer than {gap} px"
                errors.append(f"{name[i]} and {name[j]} {how}: {boxes[i]} / {boxes[j]}")
    for link_id, src, _, dst, _, _ in workflow["links"]:
        if "Note" in (nodes[src]["type"], nodes[dst]["type"]):
            continue
        if not (nodes[src]["pos"][0] < nodes[dst]["pos"][0] and boxes[src][2] < boxes[dst][0]):
            errors.append(f"link {link_id} runs right to left: {name[src]} at x {boxes[src][0]}..{boxes[src][2]} "
                          f"feeds {name[dst]} at x {boxes[dst][0]}")
    groups = workflow.get("groups", [])
    for g in groups:
        gx, gy, gw, gh = g["bounding"]
        gbox = (gx, gy, gx + gw, gy + gh)
        if gx < 0 or gy < 0:
            errors.append(f"group {g['title']!r} starts at negative coordinates")
        for i, b in boxes.items():
            inside = gbox[0] <= b[0] and gbox[1] <= b[1] and b[2] <= gbox[2] and b[3] <= gbox[3]
            if boxes_overlap(gbox, b) and not inside:
                errors.append(f"group {g['title']!r} cuts through {name[i]}")
    for k, g in enumerate(groups):
        for h in groups[k + 1:]:
            a, b = ([x, y, x + w, y + hh] for x, y, w, hh in (g["bounding"], h["bounding"]))
            if boxes_overlap(a, b):
                errors.append(f"groups {g['title']!r} and {h['title']!r} overlap")
    return errors
