"""SwiftStepFastPath: the fast path on a ComfyUI MODEL — channels-last, the attention kernels and CUDA-graph replay of
each model call — on a clone, through ComfyUI's `model_function_wrapper` and attention-override hooks.

The tiny decoder needs no node of ours: ComfyUI's own VAELoader loads TAESD/TAESDXL from models/vae_approx. The
graph machinery is `pipelines.fast_path.GraphedCall`, shared with `OneStepPipeline.enable_fast_path`.
"""

from __future__ import annotations

import logging

import torch
from comfy_api.latest import io

from .attention_nodes import BACKENDS, TritonAttentionOverride
from .dependencies import required_by

logger = logging.getLogger("swiftstep")


class FastPathWrapper:
    """`model_function_wrapper(apply_model, args)`: the input in channels-last, and on CUDA the whole model call
    replayed from a CUDA graph per signature (input/conditioning shapes and dtypes). Calls that carry patches,
    ControlNets or another wrapper's work run eagerly: a graph would bake values that change between steps."""

    def __init__(self, channels_last: bool, cuda_graph: bool, previous=None, graphs=None):
        self.channels_last = channels_last
        self.cuda_graph = cuda_graph
        self.previous = previous
        self.graphs = graphs  # a GraphedCall, made on first CUDA use (tests pass one that runs eagerly)
        self._said: set[str] = set()

    def release(self, *_args) -> None:
        """Drop every graph and its memory (ComfyUI calls this when it unloads the model: ON_DETACH)."""
        if self.graphs is not None:
            self.graphs.clear()

    def _say(self, why: str) -> None:
        if why not in self._said:
            self._said.add(why)
            logger.info("swiftstep fast path (ComfyUI): model calls run eagerly: %s", why)

    def _why_eager(self, x, c, model) -> str:
        if self.previous is not None:
            return "the model already has a model_function_wrapper"
        if self.graphs is None and not x.is_cuda:
            return f"CUDA graphs need CUDA (the model runs on {x.device.type})"
        if getattr(model, "model_lowvram", False):
            return "the model is partially loaded (lowvram): its weights move during each call"
        options = c.get("transformer_options", {}) or {}
        if options.get("patches") or options.get("patches_replace"):
            return "attention/block patches are installed (their inputs change per step)"
        if c.get("control") is not None:
            return "a ControlNet is attached"
        if any(not torch.is_tensor(v) for k, v in c.items() if k not in ("transformer_options",) and v is not None):
            return "non-tensor conditioning"
        return ""

    def __call__(self, apply_model, args):
        x, t, c = args["input"], args["timestep"], dict(args["c"])
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        model = getattr(apply_model, "__self__", None)
        why = self._why_eager(x, c, model) if self.cuda_graph else "cuda_graph is off"
        if why:
            if self.cuda_graph:
                self._say(why)
            if self.previous is not None:
                return self.previous(apply_model, {**args, "input": x, "c": c})
            return apply_model(x, t, **c)
        with required_by("SwiftStepFastPath"):
            from ..pipelines.fast_path import GraphedCall, weights_signature

        if self.graphs is None:
            self.graphs = GraphedCall(capture=True)
        if isinstance(model, torch.nn.Module):  # loads, offloads and LoRA patches move weights: capture again
            self.graphs.validate(weights_signature(model))
        options = dict(c.pop("transformer_options", {}) or {})
        tensors = {k: v for k, v in c.items() if v is not None}
        inputs = {"x": x, "t": t, **{f"c.{k}": v for k, v in tensors.items()}}
        sigmas = options.get("sigmas")
        if torch.is_tensor(sigmas):
            inputs["sigmas"] = sigmas
        # the device too: ComfyUI ≥ 0.33 may call one model's wrapper once per GPU (multi-GPU sampling)
        key = tuple((k, tuple(v.shape), v.dtype, v.device) for k, v in inputs.items()) + \
            (tuple(options.get("cond_or_uncond", ())),)

        def run(buf, _noise):
            opts = dict(options, sigmas=buf["sigmas"]) if "sigmas" in buf else options
            cond = {k[2:]: v for k, v in buf.items() if k.startswith("c.")}
            return (apply_model(buf["x"], buf["t"], transformer_options=opts, **cond),)

        try:
            return self.graphs(key, run, inputs, [])[0]
        except RuntimeError as e:  # a capture the model does not allow: eager from now on, said once
            self.cuda_graph = False
            self._say(f"CUDA-graph capture failed ({str(e)[:120]})")
            return apply_model(x, t, transformer_options=options, **c)


class SwiftStepFastPath(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SwiftStepFastPath",
            display_name="SwiftStep Fast Path",
            category="swiftstep/speed",
            description="Speeds up a model's calls on CUDA: channels-last memory format, swiftstep's attention "
                        "kernels and CUDA-graph replay per shape (one-step models are launch-bound). Returns a "
                        "patched clone; the input model is untouched. For a tiny preview decoder load TAESD with "
                        "ComfyUI's own Load VAE node (models/vae_approx).",
            inputs=[
                io.Model.Input("model", tooltip="Any diffusion model. Not modified: the node returns a patched clone."),
                io.Boolean.Input("cuda_graph", default=True,
                                 tooltip="Capture each model call per input shape and replay it (CUDA only; calls "
                                         "with patches or ControlNets stay eager). Disable if another node changes "
                                         "the model between steps."),
                io.Boolean.Input("channels_last", default=True,
                                 tooltip="NHWC memory format for the latents and the model's convolutions (the "
                                         "weights' layout changes for every user of this model; values do not)."),
                io.Combo.Input("attention", options=["off", *BACKENDS], default="auto",
                               tooltip="auto: swiftstep's Triton kernels where measured faster, else ComfyUI's "
                                       "attention; triton: always where they can run; off: unchanged."),
            ],
            outputs=[io.Model.Output(tooltip="The patched clone.")],
        )

    @classmethod
    def execute(cls, model, cuda_graph, channels_last, attention) -> io.NodeOutput:
        if attention not in ("off", *BACKENDS):
            raise ValueError(f"SwiftStepFastPath: input `attention` must be off or one of {BACKENDS}, got "
                             f"{attention!r}.")
        m = model.clone()
        options = dict(m.model_options)
        wrapper = FastPathWrapper(channels_last, cuda_graph, previous=options.get("model_function_wrapper"))
        options["model_function_wrapper"] = wrapper
        try:  # graphs hold GPU memory: free it when ComfyUI unloads this model
            from comfy.patcher_extension import CallbacksMP

            m.add_callback_with_key(CallbacksMP.ON_DETACH, "swiftstep_fast_path", wrapper.release)
        except (ImportError, AttributeError):  # ComfyUI without patcher callbacks: freed with the MODEL object
            pass
        if attention != "off":
            transformer = dict(options.get("transformer_options", {}))
            transformer["optimized_attention_override"] = TritonAttentionOverride(attention)
            options["transformer_options"] = transformer
        m.model_options = options
        if channels_last:
            diffusion_model = getattr(m.model, "diffusion_model", None)
            if diffusion_model is not None:
                diffusion_model.to(memory_format=torch.channels_last)
        return io.NodeOutput(m)


NODES = [SwiftStepFastPath]
