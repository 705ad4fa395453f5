"""swiftstep: one-step diffusion, negative-prompt attention, step annealing and one-step SR for diffusers and ComfyUI.

Importing the package imports neither diffusers nor ComfyUI; ``swiftstep.pipelines`` pulls in diffusers on use.
As a ComfyUI custom-node folder it exports only the V3 entry point (a module exporting V1 mappings too loads as V1).
"""

__version__ = "0.1.0"


async def comfy_entrypoint():
    """ComfyUI V3 entry point: the node modules (and `comfy_api`) are imported only here."""
    from .nodes import SwiftStepExtension

    return SwiftStepExtension()
