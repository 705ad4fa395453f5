"""MAR + DiSA in ComfyUI: SwiftStepMARLoader (official checkpoints from models/swiftstep) → SwiftStepMARSample → IMAGE.

ComfyUI has no MAR model type, so these nodes hold a `pipelines.MARPipeline`; the sampler is `core.disa`.
"""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..core import imagenet
from .dependencies import required_by
from .managed_pipeline import ManagedPipeline

MAR_MODEL = io.Custom("SWIFTSTEP_MAR_MODEL")
SCHEDULES = ("disa-linear", "disa-cosine", "disa-two-stage", "constant")


def _files(exts):
    import folder_paths

    from .sr_nodes import _register_folder

    _register_folder()
    return [f for f in folder_paths.get_filename_list("swiftstep") if f.endswith(exts)]


class SwiftStepMARLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        ckpts = _files((".pth", ".pt")) or ["checkpoint-last.pth"]
        vaes = _files((".ckpt",)) or ["kl16.ckpt"]
        return io.Schema(
            node_id="SwiftStepMARLoader",
            display_name="SwiftStep MAR Loader",
            category="swiftstep/mar",
            description="Loads MAR (ImageNet 256², class-conditional) and its KL-16 tokenizer from the official files.",
            inputs=[
                io.Combo.Input("mar_checkpoint", options=ckpts, default=ckpts[0],
                               tooltip="The official checkpoint-last.pth of MAR-B/L/H (its model_ema weights), in "
                                       "models/swiftstep."),
                io.Combo.Input("vae_checkpoint", options=vaes, default=vaes[0],
                               tooltip="The official kl16.ckpt tokenizer, in models/swiftstep."),
                io.Combo.Input("size", options=["base", "large", "huge"], default="base",
                               tooltip="Which MAR the checkpoint holds (MAR-B 208 M, MAR-L 479 M, MAR-H 943 M)."),
            ],
            outputs=[MAR_MODEL.Output(display_name="MAR_MODEL", tooltip="For SwiftStep MAR Sample.")],
        )

    @classmethod
    def execute(cls, mar_checkpoint, vae_checkpoint, size) -> io.NodeOutput:
        import folder_paths

        with required_by("SwiftStepMARLoader"):
            from ..pipelines import MARPipeline

        pipe = MARPipeline.from_official(folder_paths.get_full_path_or_raise("swiftstep", mar_checkpoint),
                                         folder_paths.get_full_path_or_raise("swiftstep", vae_checkpoint), size)
        pipe.set_progress_bar_config(disable=True)
        return io.NodeOutput(ManagedPipeline(pipe))


class SwiftStepMARSample(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SwiftStepMARSample",
            display_name="SwiftStep MAR Sample (DiSA)",
            category="swiftstep/mar",
            description="Masked autoregressive generation; DiSA anneals the diffusion head's steps as tokens "
                        "accumulate (≈5× faster than MAR's 256×100 at similar quality).",
            inputs=[
                MAR_MODEL.Input("mar_model", tooltip="From SwiftStep MAR Loader."),
                io.Combo.Input("class_name", options=imagenet.picker_options(), default="207 golden retriever",
                               tooltip="The ImageNet class to draw (type its id or name to search the list)."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Images of this class."),
                io.Int.Input("num_iter", default=64, min=1, max=256, tooltip="Autoregressive iterations (64 with "
                                                                             "DiSA; MAR's paper used 256)."),
                io.Combo.Input("step_schedule", options=list(SCHEDULES), default="disa-linear",
                               tooltip="Head diffusion steps per iteration: DiSA linear/cosine/two-stage from "
                                       "steps_start to steps_end, or constant (steps_end)."),
                io.Int.Input("steps_start", default=50, min=1, max=1000, tooltip="Head steps at the first iteration."),
                io.Int.Input("steps_end", default=5, min=1, max=1000, tooltip="Head steps at the last iteration."),
                io.Float.Input("cfg", default=2.9, min=1.0, max=10.0, step=0.1,
                               tooltip="Classifier-free guidance (DiSA: MAR-B 2.9, MAR-L 3.0, MAR-H 3.3)."),
                io.Combo.Input("cfg_schedule", options=["linear", "constant"], default="linear",
                               tooltip="linear: guidance grows with the share of generated tokens (MAR default)."),
                io.Float.Input("temperature", default=1.0, min=0.1, max=2.0, step=0.01,
                               tooltip="Scales the head's sampling noise."),
                io.Boolean.Input("official_compat", default=False,
                                 tooltip="Reproduce DiSA's released code (head timesteps clipped at 950)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seeds the generation order and every sampling draw."),
            ],
            outputs=[io.Image.Output(tooltip="256² images.")],
        )

    @classmethod
    def execute(cls, mar_model, class_name, batch_size, num_iter, step_schedule, steps_start, steps_end, cfg,
                cfg_schedule, temperature, official_compat, seed) -> io.NodeOutput:
        import comfy.model_management
        import comfy.utils

        if steps_start < steps_end:
            raise ValueError(f"SwiftStepMARSample: input `steps_start` ({steps_start}) must be ≥ `steps_end` "
                             f"({steps_end}).")
        progress = comfy.utils.ProgressBar(num_iter)

        def on_iteration(done, total):
            comfy.model_management.throw_exception_if_processing_interrupted()
            progress.update_absolute(done, total)

        pipe = mar_model.loaded()
        images = pipe([imagenet.from_picker(class_name)] * batch_size, num_iter=num_iter, step_schedule=step_schedule,
                      steps_start=steps_start, steps_end=steps_end, cfg=cfg, cfg_schedule=cfg_schedule,
                      temperature=temperature, generator=torch.Generator().manual_seed(seed),
                      official_compat=official_compat, output_type="pt", callback_on_iteration=on_iteration).images
        return io.NodeOutput(images.permute(0, 2, 3, 1).float().to(comfy.model_management.intermediate_device()))


NODES = [SwiftStepMARLoader, SwiftStepMARSample]
