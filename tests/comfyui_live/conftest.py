"""Live ComfyUI tests: run only with COMFYUI_PATH pointing at a ComfyUI checkout (0.3.64 or newer), in a Python
environment that can run that ComfyUI (see README, "Live ComfyUI tests")."""

import os
import sys
from pathlib import Path

import pytest

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "comfyui_live" in str(item.fspath):
            item.add_marker(pytest.mark.comfyui)
            if not COMFYUI_PATH:
                item.add_marker(pytest.mark.skip(reason="set COMFYUI_PATH to a ComfyUI checkout to run live tests"))


@pytest.fixture(scope="session")
def comfy_path() -> Path:
    path = Path(COMFYUI_PATH)
    if not (path / "comfy" / "samplers.py").is_file():
        pytest.fail(f"COMFYUI_PATH={path} is not a ComfyUI checkout (no comfy/samplers.py)")
    return path


@pytest.fixture(scope="session")
def comfy_inprocess(comfy_path):
    """Import ComfyUI's `comfy` package in this process, on the CPU."""
    sys.path.insert(0, str(comfy_path))
    argv, sys.argv = sys.argv, [sys.argv[0], "--cpu"]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.model_management  # noqa: F401  (parses --cpu)
        import comfy.sample
        import comfy.samplers
    finally:
        sys.argv = argv
    return comfy
