"""`OneStepPipeline.enable_fast_path()`: everything around a one-step UNet pass that decides its speed, each part
switchable and reversible.

* `cuda_graph`: the sampling loop and the VAE decode of a call captured once per (shapes, dtype, timesteps, sampler)
  and replayed (a one-step UNet is launch-bound: measured 26–43 ms eager vs 9.3 ms replayed for SD2.1 at 512² on an
  H100). Inputs live in static buffers: the initial noise, every re-noising draw (drawn on the host in the eager
  order, so seeds give the same images), the text embeddings and SDXL's conditioning. CUDA only.
* `compile`: `torch.compile` of the UNet's forward (`nn.Module.compile`, undone by `disable`).
* `channels_last`: UNet and VAE weights in channels-last memory format (NHWC convolutions on tensor cores).
* `fused_attention`: every standard attention processor through `swiftstep.attention_kernels` (Triton where dispatch measured
  a win, exact SDPA elsewhere).
* `cache_prompts`: text-encoder outputs cached per prompt list (LRU, 64 entries), cleared on LoRA loads.
* `tiny_vae`: decode with a TAESD-compatible tiny decoder (`load_tiny_decoder`: the public `taesd_decoder` /
  `taesdxl_decoder` weights, or a diffusers `AutoencoderTiny`) — an approximation for previews and real-time use.

Parts that cannot run here (no CUDA for graphs, no `torch.compile`) are skipped and the reason is logged once; the
pipeline then runs the plain path for them. `pipe.fast_path.active` lists what is on.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from pathlib import Path

import torch

from ..core import cuda_graphs
from ..core import weight_files

logger = logging.getLogger("swiftstep")

PROMPT_CACHE_SIZE = 64
_said: set[str] = set()


def _say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        logger.info("swiftstep fast path: %s", message)


# ---------------------------------------------------------------- tiny decoder (TAESD)
def taesd_to_diffusers(state: dict) -> dict:
    """The original TAESD decoder layout (`nn.Sequential(Clamp(), conv, ReLU, Block…)`: keys "1.weight",
    "3.conv.0.weight", …, optionally prefixed "decoder.") → diffusers `AutoencoderTiny` keys ("decoder.layers.0.weight",
    …): diffusers applies the clamp in `forward`, so every index moves down by one."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("decoder.")
        index, _, rest = key.partition(".")
        if not index.isdigit() or not rest:
            raise ValueError(f"not a TAESD decoder key: {key!r} (expected '<layer index>.<name>', e.g. '1.weight').")
        out[f"decoder.layers.{int(index) - 1}.{rest}"] = value
    return out


def load_tiny_decoder(source, dtype=None, device=None):
    """A diffusers `AutoencoderTiny` whose decoder decodes this pipeline's latents, from:
    an `AutoencoderTiny` instance; a diffusers folder (e.g. a download of madebyollin/taesd); or the original
    `taesd_decoder.safetensors` / `.pth` (also `taesdxl_decoder`, `taesd3_decoder` is 16-channel and refused for
    4-channel latents by the caller)."""
    from diffusers import AutoencoderTiny

    if isinstance(source, AutoencoderTiny):
        tiny = source
    else:
        path = Path(source)
        if path.is_dir():
            tiny = AutoencoderTiny.from_pretrained(path)
        elif path.is_file():
            what = "a TAESD decoder (taesd_decoder.safetensors / .pth: '<layer index>.<name>' tensors)"
            if path.suffix == ".safetensors":
                state = weight_files.read_safetensors(path, what)
            else:
                state = weight_files.read_torch_file(path, what)
            if not isinstance(state, dict):
                raise ValueError(f"{path.name}: expected {what}, a dict of tensors; found a {type(state).__name__}.")
            converted = taesd_to_diffusers(state)
            latent = converted.get("decoder.layers.0.weight")
            if latent is None:
                raise ValueError(f"{path.name}: no first decoder convolution ('1.weight'); is this a TAESD decoder "
                                 f"file (taesd_decoder.safetensors)?")
            tiny = AutoencoderTiny(latent_channels=latent.shape[1])
            missing, unexpected = tiny.load_state_dict(converted, strict=False)
            missing = [k for k in missing if k.startswith("decoder.")]
            if missing or unexpected:
                raise ValueError(f"{path.name}: does not fit the TAESD decoder: missing {missing[:2]}, unexpected "
                                 f"{unexpected[:2]}.")
        else:
            raise FileNotFoundError(f"No tiny VAE at {path.resolve()} (a taesd_decoder.safetensors file or an "
                                    f"AutoencoderTiny folder).")
    return tiny.to(device=device, dtype=dtype).eval()


# ---------------------------------------------------------------- CUDA-graph runner
class _Graph:
    """Static buffers and the captured call for one signature."""

    def __init__(self):
        self.inputs: dict[str, torch.Tensor | None] = {}
        self.noise: list[torch.Tensor] = []
        self.outputs: tuple | None = None
        self.graph = None


def weights_signature(*modules) -> tuple:
    """Where every parameter of `modules` lives: a graph replays kernels on fixed addresses, so weights that moved
    (offload, `.to()`, a LoRA patched in by replacement) make every captured graph stale."""
    return tuple(p.data_ptr() for m in modules if m is not None for p in m.parameters())


_REGION = "the graphed sampling call"  # how CaptureAudit names it


class GraphedCall:
    """Runs `fn(inputs, noise) -> tuple of tensors (or None)` from static buffers: captured in a CUDA graph once per
    key and replayed on CUDA; executed eagerly from the same buffers when `capture` is False (that is what the CPU
    tests compare with the plain path). `validate(signature)` drops every graph when the weights moved.

    `audit`: the capture's warm-up runs under `core.cuda_graphs.CaptureAudit` (a region that cannot be captured
    runs eagerly for that key, said once, before any capture starts); with `capture=False` and `audit=True` every
    eager run is audited (the CPU tests). Off for torch.compile'd models (the audit is an eager dispatch mode)."""

    def __init__(self, capture: bool, audit: bool = True):
        self.capture = capture
        self.audit = audit
        self._graphs: dict = {}
        self._pool = None
        self._signature = None
        self.replays = 0

    def validate(self, signature: tuple) -> None:
        if signature != self._signature:
            if self._graphs:
                _say_once("the weights moved since the graphs were captured; capturing again")
            self._graphs.clear()
            self._signature = signature

    def __call__(self, key, fn, inputs: dict, noise: list[torch.Tensor]) -> tuple:
        g = self._graphs.get(key)
        if g is None:
            g = _Graph()
            g.inputs = {k: None if v is None else v.clone() for k, v in inputs.items()}
            g.noise = [n.clone() for n in noise]
            if self.capture:
                self._capture(g, fn)
            self._graphs[key] = g
        else:
            for k, v in inputs.items():
                if v is not None:
                    g.inputs[k].copy_(v)
            for buf, n in zip(g.noise, noise):
                buf.copy_(n)
        if g.graph is None:
            with cuda_graphs.CaptureAudit(_REGION) if self.audit and not self.capture else contextlib.nullcontext():
                return fn(g.inputs, g.noise)
        g.graph.replay()
        self.replays += 1
        return tuple(None if t is None else t.clone() for t in g.outputs)

    def _capture(self, g: _Graph, fn) -> None:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        try:
            g.graph, g.outputs = cuda_graphs.capture(lambda: fn(g.inputs, g.noise), self._pool,
                                                     audit=_REGION if self.audit else None)
        except cuda_graphs.CaptureHazard as e:  # found in the warm-up, before any capture: eager is correct
            _say_once(f"{e} Running this shape eagerly.")
            g.graph = g.outputs = None

    def clear(self) -> None:
        self._graphs.clear()


# ---------------------------------------------------------------- the switchboard
class FastPath:
    """What `enable_fast_path` turned on, and how to undo it (`disable`)."""

    def __init__(self, pipe, cuda_graph: bool = True, compile: bool = False, channels_last: bool = True,
                 fused_attention: bool = True, cache_prompts: bool = True, tiny_vae=None):
        self.pipe = pipe
        self.active: list[str] = []
        self._undo: list = []
        self._prompts: OrderedDict = OrderedDict()
        self.tiny_decoder = None
        self.graphs: GraphedCall | None = None
        device = pipe._execution_device
        try:
            if channels_last:
                for module in (pipe.unet, pipe.vae):
                    module.to(memory_format=torch.channels_last)
                self._undo.append(lambda: [m.to(memory_format=torch.contiguous_format) for m in (pipe.unet, pipe.vae)])
                self.active.append("channels_last")
            if fused_attention:
                from .attention_processor import apply_swiftstep_attention

                try:
                    handle = apply_swiftstep_attention(pipe.unet)
                except ValueError as e:  # custom processors (e.g. NASA installed permanently): leave them
                    _say_once(f"fused attention skipped: {e}")
                else:
                    self._undo.append(handle.remove)
                    self.active.append("fused_attention")
            if cache_prompts:
                self.active.append("cache_prompts")
            if tiny_vae is not None:
                self.tiny_decoder = load_tiny_decoder(tiny_vae, dtype=pipe.vae.dtype, device=device)
                channels = self.tiny_decoder.config.latent_channels
                if channels != pipe.unet.config.out_channels:
                    raise ValueError(f"the tiny VAE decodes {channels}-channel latents; this UNet makes "
                                     f"{pipe.unet.config.out_channels}.")
                factor = self.tiny_decoder.config.upsampling_scaling_factor ** (
                    len(self.tiny_decoder.config.decoder_block_out_channels) - 1)
                if factor != pipe.vae_scale_factor:
                    raise ValueError(f"the tiny VAE upsamples ×{factor}; this pipeline's VAE ×{pipe.vae_scale_factor}.")
                self.active.append("tiny_vae")
            if compile:
                if not hasattr(torch, "compile"):
                    _say_once("torch.compile is not available in this PyTorch; the UNet runs eagerly")
                else:
                    pipe.unet.compile()
                    self._undo.append(lambda: setattr(pipe.unet, "_compiled_call_impl", None))
                    self.active.append("compile")
            if cuda_graph:
                if device.type != "cuda":
                    _say_once(f"CUDA graphs need CUDA (the pipeline is on {device.type}); sampling runs eagerly")
                else:
                    self.graphs = GraphedCall(capture=True, audit="compile" not in self.active)
                    self.active.append("cuda_graph")
        except Exception:
            self.disable()
            raise
        _say_once(f"on: {', '.join(self.active) or 'nothing'}")

    # prompts
    def cached_prompt(self, key, encode):
        if "cache_prompts" not in self.active:
            return encode()
        if key in self._prompts:
            self._prompts.move_to_end(key)
            return self._prompts[key]
        value = encode()
        self._prompts[key] = value
        if len(self._prompts) > PROMPT_CACHE_SIZE:
            self._prompts.popitem(last=False)
        return value

    def clear_prompts(self) -> None:
        self._prompts.clear()

    def disable(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        self._prompts.clear()
        if self.graphs is not None:
            self.graphs.clear()
        self.graphs = self.tiny_decoder = None
        self.active = []
