"""SANA-Sprint in ComfyUI: SwiftStepSanaSprintLoader (a diffusers folder in models/diffusers) →
SwiftStepSanaSprintSampler → IMAGE.

ComfyUI has no SANA-Sprint model type (Gemma-2 text encoder, DC-AE f32c32 VAE, TrigFlow/sCM sampling), so these
nodes hold the `DistilledDiTPipeline` that `pipelines.load_one_step` gives for the folder (the stock
SanaSprintPipeline run with the "sana-sprint" preset of core/presets.py), its modules under ComfyUI's model
management (`nodes/managed_pipeline.py`).
"""

from __future__ import annotations

import json
import os

import torch
from comfy_api.latest import io

from ..core.presets import FLOW_PRESETS
from .dependencies import required_by
from .managed_pipeline import ManagedPipeline
from .sr_nodes import diffusers_folders

SANA_SPRINT = io.Custom("SWIFTSTEP_SANA_SPRINT")
PIPELINE_CLASS = "SanaSprintPipeline"
REPOS = ("Efficient-Large-Model/Sana_Sprint_1.6B_1024px_diffusers",
         "Efficient-Large-Model/Sana_Sprint_0.6B_1024px_diffusers")
WHERE = (f"download {REPOS[0]} (or {REPOS[1]}) from huggingface.co as a folder into ComfyUI/models/diffusers/, "
         f"e.g. `hf download {REPOS[0]} --local-dir ComfyUI/models/diffusers/{REPOS[0].split('/')[1]}`")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PRESET = FLOW_PRESETS["sana-sprint"]
# SanaSprintPipeline.check_inputs: sizes divisible by 32 (the DC-AE f32c32 VAE maps 32 px to one latent)
SIZE_MULTIPLE = 32


def _model_index(path: str) -> dict:
    with open(os.path.join(path, "model_index.json"), encoding="utf-8") as f:
        return json.load(f)


def sana_sprint_folders() -> list[str]:
    """Folders under models/diffusers whose model_index.json names SanaSprintPipeline."""
    import folder_paths

    roots = folder_paths.get_folder_paths("diffusers")
    found = []
    for name in diffusers_folders():
        path = next(os.path.join(r, name) for r in roots if os.path.isfile(os.path.join(r, name, "model_index.json")))
        try:
            if _model_index(path).get("_class_name") == PIPELINE_CLASS:
                found.append(name)
        except (OSError, ValueError):  # unreadable: not offered (the loader says why if a prompt names it)
            continue
    return found


def find_folder(node: str, name: str) -> str:
    """The path of a SANA-Sprint diffusers folder `name` under models/diffusers; errors name what was found."""
    import folder_paths

    roots = folder_paths.get_folder_paths("diffusers")
    path = next((os.path.join(r, name) for r in roots if os.path.isfile(os.path.join(r, name, "model_index.json"))),
                None)
    if path is None:
        raise FileNotFoundError(f"{node}: input `model`: no diffusers folder {name!r} (with a model_index.json) in "
                                f"{', '.join(roots)}; {WHERE}.")
    try:
        class_name = _model_index(path).get("_class_name")
    except ValueError as e:
        raise ValueError(f"{node}: input `model`: {path}/model_index.json is not valid JSON ({e}).") from e
    if class_name != PIPELINE_CLASS:
        raise ValueError(f"{node}: input `model`: {name!r} is a {class_name} folder (model_index.json `_class_name`), "
                         f"expected a SANA-Sprint folder ({PIPELINE_CLASS}); {WHERE}.")
    return path


def resolve_dtype(dtype: str) -> torch.dtype:
    """auto: bfloat16 on a CUDA device that supports it (the released Sana_Sprint_*_diffusers weights are bf16),
    else float32 (the CPU: correctness over speed)."""
    import comfy.model_management

    if dtype != "auto":
        return DTYPES[dtype]
    device = comfy.model_management.get_torch_device()
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def size_problem(node: str, width, height) -> str | None:
    for name, value in (("width", width), ("height", height)):
        if value is not None and value % SIZE_MULTIPLE:
            return (f"{node}: input `{name}` must be a multiple of {SIZE_MULTIPLE} (SANA-Sprint's VAE factor), "
                    f"got {value}; nearest: {max(SIZE_MULTIPLE, round(value / SIZE_MULTIPLE) * SIZE_MULTIPLE)}.")
    return None


class SwiftStepSanaSprintLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        folders = sana_sprint_folders() or [REPOS[0].split("/")[1]]
        return io.Schema(
            node_id="SwiftStepSanaSprintLoader",
            display_name="SwiftStep SANA-Sprint Loader",
            category="swiftstep/sana-sprint",
            description="Loads SANA-Sprint (0.6B / 1.6B, 1024 px, 1–4 steps) from its diffusers folder: transformer, "
                        "Gemma-2 text encoder and DC-AE VAE, held under ComfyUI's model management (offloaded and "
                        "freed like its own models).",
            inputs=[
                io.Combo.Input("model", options=folders, default=folders[0],
                               tooltip=f"A SANA-Sprint diffusers folder in ComfyUI/models/diffusers/: {REPOS[0]} "
                                       f"or {REPOS[1]} from huggingface.co, downloaded as a whole folder."),
                io.Combo.Input("dtype", options=["auto", *DTYPES], default="auto",
                               tooltip="auto: bf16 on a CUDA GPU that supports it (the released weights are bf16), "
                                       "else fp32 (the CPU)."),
            ],
            outputs=[SANA_SPRINT.Output(display_name="SANA_SPRINT", tooltip="For SwiftStep SANA-Sprint Sampler.")],
        )

    @classmethod
    def execute(cls, model, dtype) -> io.NodeOutput:
        path = find_folder("SwiftStepSanaSprintLoader", model)
        torch_dtype = resolve_dtype(dtype)
        with required_by("SwiftStepSanaSprintLoader"):
            from ..pipelines import load_one_step

            pipe = load_one_step(path, dtype=torch_dtype)
        pipe.set_progress_bar_config(disable=True)
        return io.NodeOutput(ManagedPipeline(pipe))


class SwiftStepSanaSprintSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SwiftStepSanaSprintSampler",
            display_name="SwiftStep SANA-Sprint Sampler",
            category="swiftstep/sana-sprint",
            description="Text to image in 1–4 steps with SANA-Sprint's recipe (sCM angles π/2 → 1.3 → 0 at 2 "
                        "steps, guidance embedding 4.5), through the stock diffusers SanaSprintPipeline.",
            inputs=[
                SANA_SPRINT.Input("model", tooltip="From SwiftStep SANA-Sprint Loader."),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="What to draw (encoded by the folder's Gemma-2 text encoder)."),
                io.Int.Input("steps", default=PRESET.default_steps, min=min(PRESET.steps), max=max(PRESET.steps),
                             tooltip="Network evaluations (1–4; 2 is the model card's). The intermediate angle 1.3 "
                                     "applies only at 2 steps; other counts space the angles evenly from π/2 to 0."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seeds the initial noise (drawn on the CPU: the same seed gives the same image "
                                     "on any device)."),
                io.Int.Input("width", default=1024, min=SIZE_MULTIPLE, max=4096, step=SIZE_MULTIPLE,
                             tooltip="Output width, a multiple of 32. Generated at the nearest aspect ratio of "
                                     "SANA's 1024 px table and resized to this size, as the stock pipeline does."),
                io.Int.Input("height", default=1024, min=SIZE_MULTIPLE, max=4096, step=SIZE_MULTIPLE,
                             tooltip="Output height, a multiple of 32 (see width)."),
                io.Float.Input("guidance", default=PRESET.guidance_embed, min=0.0, max=20.0, step=0.1,
                               tooltip="SANA-Sprint's guidance embedding (an input the model was distilled with), "
                                       "not classifier-free guidance: no extra pass. 4.5 is the model card's."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Images from this prompt."),
            ],
            outputs=[io.Image.Output(tooltip="width × height images.")],
        )

    @classmethod
    def validate_inputs(cls, width=None, height=None):
        """Widget values are known before the run: refuse a size the pipeline would refuse, up front."""
        return size_problem("SwiftStepSanaSprintSampler", width, height) or True

    @classmethod
    def execute(cls, model, prompt, steps, seed, width, height, guidance, batch_size) -> io.NodeOutput:
        import comfy.model_management
        import comfy.utils

        problem = size_problem("SwiftStepSanaSprintSampler", width, height)
        if problem:
            raise ValueError(problem)
        progress = comfy.utils.ProgressBar(steps)

        def on_step_end(pipe, i, t, tensors):
            comfy.model_management.throw_exception_if_processing_interrupted()
            progress.update_absolute(i + 1, steps)
            return tensors

        pipe = model.loaded()
        # The noise is drawn on the CPU and moved to the device, as the pipeline's own tests and CLI draw it: the same
        # seed gives the same image on CPU and GPU (up to the device's arithmetic).
        images = pipe(prompt=prompt, num_inference_steps=steps, height=height, width=width,
                      guidance_scale=guidance, num_images_per_prompt=batch_size,
                      generator=torch.Generator("cpu").manual_seed(seed), output_type="pt",
                      callback_on_step_end=on_step_end).images
        return io.NodeOutput(images.permute(0, 2, 3, 1).float().to(comfy.model_management.intermediate_device()))


NODES = [SwiftStepSanaSprintLoader, SwiftStepSanaSprintSampler]
