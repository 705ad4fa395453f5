"""Diffusers pipelines that ComfyUI has no model type for (one-step SR, DLoRAL video SR, MAR + its KL-16 VAE),
under ComfyUI's model management.

The pipeline's modules are wrapped in one `ModelPatcher`, as ComfyUI wraps its own VAE and text encoders: they wait on
ComfyUI's offload device, and every run asks `comfy.model_management.load_models_gpu` for them first, so ComfyUI
counts their memory, frees other models to fit them, unloads them under pressure or on "Free model and node cache",
and honours `--cpu` (load device = CPU). The modules are diffusers' own, not built from `comfy.ops`, so they cannot
run partially loaded: they are always loaded whole (ComfyUI still frees memory for them first under
`--lowvram`/`--novram`).
"""

from __future__ import annotations

import torch


class ManagedPipeline:
    """A pipeline plus the `ModelPatcher` of its modules; `loaded()` returns the pipeline ready to run."""

    def __init__(self, pipe):
        import comfy.model_management
        import comfy.model_patcher

        self.pipe = pipe
        modules = torch.nn.ModuleDict({name: module for name, module in pipe.components.items()
                                       if isinstance(module, torch.nn.Module)})
        self.patcher = comfy.model_patcher.ModelPatcher(modules, load_device=comfy.model_management.get_torch_device(),
                                                        offload_device=comfy.model_management.unet_offload_device())
        modules.to(self.patcher.offload_device)

    def loaded(self):
        """The pipeline, its modules on ComfyUI's load device (loaded now if ComfyUI had unloaded them)."""
        import comfy.model_management

        comfy.model_management.load_models_gpu([self.patcher], force_full_load=True)
        return self.pipe
