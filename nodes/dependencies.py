"""The nodes that hold diffusers pipelines (SR, video SR, MAR, the fast path's graphs) need this pack's
requirements.txt; a ComfyUI that has not run it must say which package is missing and how to install it, not stop on
a bare `ModuleNotFoundError` deep inside an import."""

from __future__ import annotations

import contextlib
import os
import sys

REQUIREMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "requirements.txt")
# import name → PyPI name, for the packages of requirements.txt that nodes import through pipelines/
PACKAGES = {"diffusers": "diffusers", "transformers": "transformers", "peft": "peft", "accelerate": "accelerate",
            "safetensors": "safetensors", "av": "av", "huggingface_hub": "huggingface_hub", "tqdm": "tqdm",
            "PIL": "pillow", "numpy": "numpy"}


@contextlib.contextmanager
def required_by(node_id: str):
    """Turn a missing optional package, imported inside the block, into an error naming it and the install command."""
    try:
        yield
    except ModuleNotFoundError as error:
        top = (error.name or "").partition(".")[0]
        if top not in PACKAGES:
            raise
        raise ModuleNotFoundError(
            f"{node_id} needs the Python package `{PACKAGES[top]}`, which is not installed in ComfyUI's Python "
            f"({sys.executable}). Install this pack's requirements: `{sys.executable} -m pip install -r "
            f"{REQUIREMENTS}` (ComfyUI-Manager and `comfy node install` do this), then restart ComfyUI.",
            name=error.name) from error
