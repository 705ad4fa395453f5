"""Small hand-written stand-ins for the parts of ComfyUI 0.3.64 our nodes touch, with the real names and signatures.

`install()` puts them in `sys.modules` as `comfy_api.latest`, `comfy.samplers`, `comfy.model_sampling` and
`comfy.model_management`. They follow ComfyUI's source (comfy/samplers.py KSAMPLER, comfy/model_sampling.py
ModelSamplingDiscrete + EPS/V_PREDICTION/X0, comfy_api/latest/_io.py) closely enough that a node that works here
calls ComfyUI the way ComfyUI expects; the live tests (tests/comfyui_live) check the real thing.
"""

from __future__ import annotations

import math
import sys
import types
from dataclasses import dataclass, field
from typing import Any

import torch

# ----------------------------------------------------------------------------- comfy_api.latest.io


@dataclass
class InputSpec:
    io_type: str
    id: str
    kwargs: dict


@dataclass
class OutputSpec:
    io_type: str
    kwargs: dict


def _socket(io_type: str):
    class Socket:
        @staticmethod
        def Input(id: str, display_name: str | None = None, optional: bool = False, tooltip: str | None = None,
                  lazy: bool | None = None, **kwargs):
            return InputSpec(io_type, id, dict(kwargs, display_name=display_name, optional=optional,
                                               tooltip=tooltip, lazy=lazy))

        @staticmethod
        def Output(id: str | None = None, display_name: str | None = None, tooltip: str | None = None,
                   is_output_list: bool = False):
            return OutputSpec(io_type, dict(id=id, display_name=display_name, tooltip=tooltip))

    Socket.io_type = io_type
    Socket.__name__ = io_type
    return Socket


@dataclass
class Schema:
    node_id: str
    display_name: str | None = None
    category: str = "sd"
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    hidden: list = field(default_factory=list)
    description: str = ""
    is_input_list: bool = False
    is_output_node: bool = False
    is_deprecated: bool = False
    is_experimental: bool = False
    is_api_node: bool = False
    not_idempotent: bool = False
    enable_expand: bool = False


class NodeOutput:
    def __init__(self, *args: Any, ui=None, expand=None, block_execution=None):
        self.args, self.ui = args, ui

    @property
    def result(self):
        return self.args or None


class ComfyNode:
    @classmethod
    def define_schema(cls) -> Schema:
        raise NotImplementedError

    @classmethod
    def execute(cls, **kwargs) -> NodeOutput:
        raise NotImplementedError


class ComfyExtension:
    async def on_load(self) -> None:
        pass

    async def get_node_list(self) -> list[type[ComfyNode]]:
        raise NotImplementedError


SOCKET_TYPES = {
    "Model": "MODEL", "Clip": "CLIP", "Vae": "VAE", "Conditioning": "CONDITIONING", "Latent": "LATENT",
    "Image": "IMAGE", "Mask": "MASK", "Sigmas": "SIGMAS", "Sampler": "SAMPLER", "Noise": "NOISE", "Guider": "GUIDER",
    "Int": "INT", "Float": "FLOAT", "String": "STRING", "Boolean": "BOOLEAN", "Combo": "COMBO",
}

# ----------------------------------------------------------------------------- comfy.model_sampling


class EPS:
    def calculate_input(self, sigma, noise):
        sigma = sigma.view(sigma.shape[:1] + (1,) * (noise.ndim - 1))
        return noise / (sigma**2 + self.sigma_data**2) ** 0.5

    def calculate_denoised(self, sigma, model_output, model_input):
        sigma = sigma.view(sigma.shape[:1] + (1,) * (model_output.ndim - 1))
        return model_input - model_output * sigma

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        if max_denoise:
            noise = noise * torch.sqrt(1.0 + sigma**2.0)
        else:
            noise = noise * sigma
        return noise + latent_image

    def inverse_noise_scaling(self, sigma, latent):
        return latent


class V_PREDICTION(EPS):
    def calculate_denoised(self, sigma, model_output, model_input):
        sigma = sigma.view(sigma.shape[:1] + (1,) * (model_output.ndim - 1))
        return (model_input * self.sigma_data**2 / (sigma**2 + self.sigma_data**2)
                - model_output * sigma * self.sigma_data / (sigma**2 + self.sigma_data**2) ** 0.5)


class X0(EPS):
    def calculate_denoised(self, sigma, model_output, model_input):
        return model_output


class CONST:
    pass


class ModelSamplingDiscrete(torch.nn.Module):
    """Scaled-linear ("linear" in ComfyUI's naming) DDPM schedule, as comfy/model_sampling.py builds it."""

    def __init__(self, model_config=None, zsnr=None):
        super().__init__()
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.register_buffer("sigmas", sigmas.float())
        self.register_buffer("log_sigmas", sigmas.log().float())
        self.sigma_data = 1.0

    @property
    def sigma_min(self):
        return self.sigmas[0]

    @property
    def sigma_max(self):
        return self.sigmas[-1]

    def timestep(self, sigma):
        dists = sigma.log() - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape)

    def sigma(self, timestep):
        t = torch.clamp(timestep.float(), min=0, max=len(self.sigmas) - 1)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()


class ModelSamplingDiscreteEDM(ModelSamplingDiscrete):
    pass


def model_sampling(kind=EPS):
    return type("ModelSampling", (ModelSamplingDiscrete, kind), {})()


class ModelSamplingDiscreteFlow(torch.nn.Module):
    """comfy.model_sampling.ModelSamplingDiscreteFlow: t = σ·multiplier; `sigma(t)` applies the static shift."""

    def __init__(self, shift=1.0, multiplier=1000):
        super().__init__()
        self.shift, self.multiplier = shift, multiplier

    def timestep(self, sigma):
        return sigma * self.multiplier

    def sigma(self, timestep):
        t = timestep / self.multiplier
        return self.shift * t / (1 + (self.shift - 1) * t)


def flow_model_sampling(shift=1.0, multiplier=1000):
    """What comfy.model_base.model_sampling builds for ModelType.FLOW (SD3: multiplier 1000; Flux-schnell, Z-Image:
    1.0)."""
    return type("ModelSampling", (ModelSamplingDiscreteFlow, CONST), {})(shift, multiplier)


# ----------------------------------------------------------------------------- comfy.ldm.modules.attention


def optimized_attention(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False,
                        **kwargs):
    """attention_pytorch: (B, L, H·D) in and out."""
    b, _, inner = q.shape
    d = inner // heads
    q, k, v = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, -1, heads * d)


class CrossAttention(torch.nn.Module):
    def __init__(self, query_dim, context_dim, heads, dim_head):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = torch.nn.Linear(query_dim, inner, bias=False)
        self.to_k = torch.nn.Linear(context_dim, inner, bias=False)
        self.to_v = torch.nn.Linear(context_dim, inner, bias=False)
        self.to_out = torch.nn.Sequential(torch.nn.Linear(inner, query_dim))


class BasicTransformerBlock(torch.nn.Module):
    def __init__(self, dim, context_dim, heads, dim_head):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, dim_head)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)


class SpatialTransformer(torch.nn.Module):
    def __init__(self, dim, context_dim, heads, depth):
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList(
            BasicTransformerBlock(dim, context_dim, heads, dim // heads) for _ in range(depth))


class MultiHeadCrossAttention(torch.nn.Module):
    """comfy.ldm.pixart.blocks.MultiHeadCrossAttention (its forward, verbatim in behaviour)."""

    def __init__(self, d_model, num_heads):
        super().__init__()
        self.d_model, self.num_heads, self.head_dim = d_model, num_heads, d_model // num_heads
        self.q_linear = torch.nn.Linear(d_model, d_model)
        self.kv_linear = torch.nn.Linear(d_model, d_model * 2)
        self.proj = torch.nn.Linear(d_model, d_model)
        self.proj_drop = torch.nn.Dropout(0.0)

    def forward(self, x, cond, mask=None):
        B, N, C = x.shape
        q = self.q_linear(x).view(1, -1, self.num_heads, self.head_dim)
        k, v = self.kv_linear(cond).view(1, -1, 2, self.num_heads, self.head_dim).unbind(2)
        x = optimized_attention(q.view(B, -1, C), k.view(B, -1, C), v.view(B, -1, C), self.num_heads, mask=None)
        return self.proj_drop(self.proj(x))


class PixArtMS(torch.nn.Module):
    def __init__(self, d=32, caption_channels=40, heads=2, depth=2):
        super().__init__()
        self.y_embedder = torch.nn.Module()
        self.y_embedder.y_proj = torch.nn.Sequential(torch.nn.Linear(caption_channels, d), torch.nn.GELU(),
                                                     torch.nn.Linear(d, d))
        self.blocks = torch.nn.ModuleList()
        for _ in range(depth):
            block = torch.nn.Module()
            block.cross_attn = MultiHeadCrossAttention(d, heads)
            self.blocks.append(block)


class UNetModel(torch.nn.Module):
    """comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel's block layout (attention parts only)."""

    def __init__(self, context_dim=32, heads=2):
        super().__init__()
        st = lambda dim, depth=1: torch.nn.Sequential(torch.nn.Identity(), SpatialTransformer(dim, context_dim, heads, depth))  # noqa: E731
        self.input_blocks = torch.nn.ModuleList([torch.nn.Identity(), st(32), torch.nn.Identity(), st(64, 2)])
        self.middle_block = torch.nn.Sequential(torch.nn.Identity(), st(64), torch.nn.Identity())
        self.output_blocks = torch.nn.ModuleList([torch.nn.Identity(), st(64), st(32)])


# ----------------------------------------------------------------------------- comfy.model_management

INTERRUPT = {"flag": False}


class InterruptProcessingException(Exception):
    pass


def throw_exception_if_processing_interrupted():
    if INTERRUPT["flag"]:
        INTERRUPT["flag"] = False
        raise InterruptProcessingException()


LOADED = []  # comfy.model_management.current_loaded_models: the patchers on their load device


class ModulePatcher:
    """comfy.model_patcher.ModelPatcher for a plain nn.Module (as ComfyUI wraps its VAE): load/offload devices."""

    def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
        self.model, self.load_device, self.offload_device = model, load_device, offload_device
        self.loads = 0


def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                    force_full_load=False):
    for patcher in models:
        if patcher not in LOADED:
            patcher.model.to(patcher.load_device)
            patcher.loads += 1
            LOADED.append(patcher)


def unload_all_models():
    for patcher in LOADED:
        patcher.model.to(patcher.offload_device)
    LOADED.clear()


# ----------------------------------------------------------------------------- comfy.samplers


class KSamplerX0Inpaint:
    def __init__(self, model, sigmas):
        self.inner_model = model
        self.sigmas = sigmas

    def __call__(self, x, sigma, denoise_mask=None, model_options={}, seed=None):
        return self.inner_model(x, sigma, model_options=model_options, seed=seed)


class Sampler:
    def max_denoise(self, model_wrap, sigmas):
        max_sigma = float(model_wrap.inner_model.model_sampling.sigma_max)
        sigma = float(sigmas[0])
        return math.isclose(max_sigma, sigma, rel_tol=1e-05) or sigma > max_sigma


class KSAMPLER(Sampler):
    def __init__(self, sampler_function, extra_options={}, inpaint_options={}):
        self.sampler_function = sampler_function
        self.extra_options = extra_options
        self.inpaint_options = inpaint_options

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        extra_args["denoise_mask"] = denoise_mask
        model_k = KSamplerX0Inpaint(model_wrap, sigmas)
        model_k.latent_image = latent_image
        model_k.noise = noise
        noise = model_wrap.inner_model.model_sampling.noise_scaling(sigmas[0], noise, latent_image,
                                                                     self.max_denoise(model_wrap, sigmas))
        k_callback = None
        total_steps = len(sigmas) - 1
        if callback is not None:
            k_callback = lambda x: callback(x["i"], x["denoised"], x["x"], total_steps)  # noqa: E731
        samples = self.sampler_function(model_k, noise, sigmas, extra_args=extra_args, callback=k_callback,
                                        disable=disable_pbar, **self.extra_options)
        return model_wrap.inner_model.model_sampling.inverse_noise_scaling(sigmas[-1], samples)


# ----------------------------------------------------------------------------- models


class FakeBaseModel:
    """comfy.model_base.BaseModel's sampling surface around a diffusers UNet: apply_model(x, σ) → x0."""

    def __init__(self, unet, model_sampling, config_name="SD15", added_cond_kwargs=None):
        self.diffusion_model = unet
        self.model_sampling = model_sampling
        self.model_config = type(config_name, (), {})()
        self.added_cond_kwargs = added_cond_kwargs

    def apply_model(self, x, t, c_crossattn=None, **kwargs):
        sigma = t
        xc = self.model_sampling.calculate_input(sigma, x)
        timestep = self.model_sampling.timestep(sigma).float()
        out = self.diffusion_model(xc, timestep, encoder_hidden_states=c_crossattn,
                                   added_cond_kwargs=self.added_cond_kwargs).sample
        return self.model_sampling.calculate_denoised(sigma, out, x)


class FakeModelPatcher:
    """The ModelPatcher methods our nodes use (comfy/model_patcher.py names and signatures)."""

    def __init__(self, model: FakeBaseModel):
        self.model = model
        self.model_options = {"transformer_options": {}}
        self.clones = 0

    def clone(self):
        n = FakeModelPatcher(self.model)
        n.model_options = {**self.model_options,
                           "transformer_options": dict(self.model_options["transformer_options"])}
        self.clones += 1
        return n

    def get_model_object(self, name: str):
        if name == "model_sampling":
            return self.model.model_sampling
        return getattr(self.model, name)

    def set_model_patch_replace(self, patch, name, block_name, number, transformer_index=None):
        # comfy.model_patcher.set_model_options_patch_replace: copies the dicts it changes
        to = dict(self.model_options["transformer_options"])
        patches_replace = dict(to.get("patches_replace", {}))
        per_name = dict(patches_replace.get(name, {}))
        block = (block_name, number) if transformer_index is None else (block_name, number, transformer_index)
        per_name[block] = patch
        patches_replace[name] = per_name
        to["patches_replace"] = patches_replace
        self.model_options = {**self.model_options, "transformer_options": to}

    def set_model_attn2_replace(self, patch, block_name, number, transformer_index=None):
        self.set_model_patch_replace(patch, "attn2", block_name, number, transformer_index)

    def add_object_patch(self, name, obj):
        self.object_patches = {**getattr(self, "object_patches", {}), name: obj}


class FakeGuider:
    """What KSAMPLER receives as `model_wrap` (a CFGGuider at cfg 1): `inner_model` is the BaseModel."""

    def __init__(self, patcher: FakeModelPatcher, cond: torch.Tensor):
        self.inner_model = patcher.model
        self.cond = cond

    def __call__(self, x, sigma, model_options={}, seed=None):
        return self.inner_model.apply_model(x, sigma, c_crossattn=self.cond)


def sample_custom(patcher, sampler, sigmas, cond, latent, seed, callback=None):
    """comfy.sample.sample_custom at cfg 1: prepare_noise(seed), then sampler.sample(...)."""
    noise = torch.randn(latent.size(), dtype=latent.dtype, generator=torch.manual_seed(seed), device="cpu")
    return sampler.sample(FakeGuider(patcher, cond), sigmas, {"seed": seed}, callback, noise, latent)


# ----------------------------------------------------------------------------- an SD2 checkpoint's MODEL/CLIP/VAE
# What Load Checkpoint gives, around diffusers parts: the UNet and VAE keep diffusers' parameter names, so the fake
# key maps (comfy.lora, comfy.diffusers_convert) are identities where ComfyUI's rename diffusers → LDM.


class LatentFormatSD15:
    scale_factor = 0.18215

    def process_in(self, latent):
        return latent * self.scale_factor

    def process_out(self, latent):
        return latent / self.scale_factor


class FakeSD2Model(FakeBaseModel):
    """comfy.model_base.BaseModel of an SD2.x checkpoint: `_apply_model` casts x to the UNet's dtype (x may be
    float64) and its output to float32; state_dict keys `diffusion_model.*`; latent_format, unet_config."""

    def __init__(self, unet, model_sampling, config_name="SD20"):
        super().__init__(unet, model_sampling, config_name)
        self.model_config.unet_config = {"context_dim": unet.config.cross_attention_dim}
        self.latent_format = LatentFormatSD15()

    def apply_model(self, x, t, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        sigma = t
        xc = self.model_sampling.calculate_input(sigma, x).to(self.diffusion_model.dtype)
        timestep = self.model_sampling.timestep(sigma).float()
        out = self.diffusion_model(xc, timestep, encoder_hidden_states=c_crossattn.to(xc.dtype)).sample.float()
        return self.model_sampling.calculate_denoised(sigma, out, x)

    def memory_required(self, input_shape, cond_shapes={}):
        return 0

    def state_dict(self):
        return {f"diffusion_model.{k}": v for k, v in self.diffusion_model.state_dict().items()}


class WeightPatcher:
    """comfy.model_patcher.ModelPatcher's weight patches: `add_patches` on clones that share the model, applied in
    `patch()` (ComfyUI: when loaded) from a backup and undone by `unpatch()`. Patch values as `load_lora` below
    and ComfyUI's "set" make them; a LoRA is ΔW = strength·(alpha/rank)·up·down reshaped to W (comfy/weight_adapter)."""

    def __init__(self, model, load_device=torch.device("cpu")):
        self.model, self.load_device, self.offload_device = model, load_device, load_device
        self.patches: dict = {}
        self.model_options = {"transformer_options": {}}
        self.backup: dict = {}

    def clone(self):
        n = WeightPatcher(self.model, self.load_device)
        n.patches = {k: list(v) for k, v in self.patches.items()}
        n.model_options = {**self.model_options, "transformer_options": dict(self.model_options["transformer_options"])}
        return n

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        keys = self.model.state_dict()
        added = [k for k in patches if k in keys]
        for k in added:
            self.patches.setdefault(k, []).append((strength_patch, patches[k]))
        return added

    def get_model_object(self, name: str):
        obj = self.model
        for part in name.split("."):
            obj = getattr(obj, part)
        return obj

    def patch(self):
        weights = self.model.state_dict()
        with torch.no_grad():
            for key, patches in self.patches.items():
                w = weights[key]
                self.backup[key] = w.clone()
                new = w.clone()
                for strength, (kind, value) in patches:
                    if kind == "set":
                        new = value[0].to(new)
                    else:
                        up, down, alpha = value
                        delta = (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
                        new = new + strength * (alpha / down.shape[0]) * delta
                w.copy_(new)

    def unpatch(self):
        weights = self.model.state_dict()
        with torch.no_grad():
            for key, w in self.backup.items():
                weights[key].copy_(w)
        self.backup = {}


def load_models_gpu_patching(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                             force_full_load=False):
    """load_models_gpu for WeightPatchers: a clone of a loaded model replaces it (un-patch, patch), as ComfyUI's
    loader does for clones sharing one model."""
    for patcher in models:
        if patcher in LOADED:
            continue
        for other in [p for p in LOADED if getattr(p, "model", None) is patcher.model]:
            other.unpatch()
            LOADED.remove(other)
        patcher.patch()
        LOADED.append(patcher)


def model_lora_keys_unet(model, key_map={}):
    """comfy.lora.model_lora_keys_unet's kohya form `lora_unet_<path with _>` → `diffusion_model.<path>.weight`."""
    for k in model.state_dict():
        if k.startswith("diffusion_model.") and k.endswith(".weight"):
            key_map["lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_")] = k
    return key_map


def load_lora(lora, to_load, log_missing=True):
    """comfy.lora.load_lora for kohya tensors (`.lora_up.weight`, `.lora_down.weight`, `.alpha`)."""
    patches = {}
    for x, key in to_load.items():
        if f"{x}.lora_up.weight" in lora:
            patches[key] = ("lora", (lora[f"{x}.lora_up.weight"], lora[f"{x}.lora_down.weight"],
                                     float(lora[f"{x}.alpha"])))
    return patches


class FirstStage(torch.nn.Module):
    """comfy.ldm.models.autoencoder.AutoencoderKL's parts and `decode` (post_quant_conv + decoder), from a diffusers
    AutoencoderKL."""

    def __init__(self, vae):
        super().__init__()
        self.encoder, self.quant_conv = vae.encoder, vae.quant_conv
        self.post_quant_conv, self.decoder = vae.post_quant_conv, vae.decoder

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))


class FakeVAE:
    """comfy.sd.VAE's attributes the SR node reads."""

    def __init__(self, vae):
        self.first_stage_model = FirstStage(vae)
        self.patcher = WeightPatcher(self.first_stage_model)
        self.device, self.vae_dtype = torch.device("cpu"), torch.float32
        self.latent_channels = vae.config.latent_channels
        self.downscale_ratio = self.upscale_ratio = 2 ** (len(vae.config.block_out_channels) - 1)
        self.memory_used_encode = self.memory_used_decode = lambda shape, dtype: 0


class FakeCLIP:
    """comfy.sd.CLIP's tokenize / encode_from_tokens over a tokenizer and text encoder (77 tokens, truncated)."""

    def __init__(self, tokenizer, text_encoder):
        self.tokenizer, self.text_encoder = tokenizer, text_encoder

    def tokenize(self, text):
        return self.tokenizer([text], padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids

    def encode_from_tokens(self, tokens):
        with torch.no_grad():
            return self.text_encoder(tokens)[0]


def install_checkpoint_parts(monkeypatch) -> None:
    """comfy.lora, comfy.diffusers_convert (VAE names kept) and a patching load_models_gpu, after install()."""
    comfy = sys.modules["comfy"]
    lora = types.ModuleType("comfy.lora")
    lora.model_lora_keys_unet, lora.load_lora = model_lora_keys_unet, load_lora
    convert = types.ModuleType("comfy.diffusers_convert")
    convert.convert_vae_state_dict = lambda sd: dict(sd)
    monkeypatch.setattr(comfy, "lora", lora, raising=False)
    monkeypatch.setattr(comfy, "diffusers_convert", convert, raising=False)
    monkeypatch.setitem(sys.modules, "comfy.lora", lora)
    monkeypatch.setitem(sys.modules, "comfy.diffusers_convert", convert)
    monkeypatch.setattr(sys.modules["comfy.model_management"], "load_models_gpu", load_models_gpu_patching)


# ----------------------------------------------------------------------------- install


class ProgressBar:
    """comfy.utils.ProgressBar: records what the node reports."""

    last = None

    def __init__(self, total):
        self.total, self.current = total, 0
        ProgressBar.last = self

    def update_absolute(self, value, total=None, preview=None):
        self.current = value

    def update(self, value):
        self.current += value


class FolderPaths(types.ModuleType):
    """folder_paths over a temporary models/ directory (ComfyUI's names: models_dir, folder_names_and_paths, …)."""

    def __init__(self, root):
        super().__init__("folder_paths")
        import os

        self.models_dir = str(root)
        self.folder_names_and_paths = {name: ([os.path.join(self.models_dir, name)], set())
                                       for name in ("checkpoints", "diffusers", "loras")}

    def add_model_folder_path(self, name, path, is_default=False):
        self.folder_names_and_paths.setdefault(name, ([], set()))[0].append(path)

    def get_folder_paths(self, name):
        return list(self.folder_names_and_paths[name][0])

    def get_filename_list(self, name):
        import os

        out = []
        for root in self.get_folder_paths(name):
            for path, _, files in os.walk(root):
                out += [os.path.relpath(os.path.join(path, f), root) for f in files]
        return sorted(out)

    def get_full_path_or_raise(self, name, filename):
        import os

        for root in self.get_folder_paths(name):
            if os.path.isfile(os.path.join(root, filename)):
                return os.path.join(root, filename)
        raise FileNotFoundError(f"Model in folder '{name}' with filename '{filename}' not found.")


def install(monkeypatch, models_root=None) -> types.SimpleNamespace:
    import tempfile

    models_root = models_root or tempfile.mkdtemp(prefix="comfy-models-")
    io = types.ModuleType("comfy_api.latest.io")
    for name, io_type in SOCKET_TYPES.items():
        setattr(io, name, _socket(io_type))
    io.Schema, io.NodeOutput, io.ComfyNode = Schema, NodeOutput, ComfyNode
    io.Custom = _socket
    latest = types.ModuleType("comfy_api.latest")
    latest.io, latest.ComfyExtension = io, ComfyExtension
    comfy_api = types.ModuleType("comfy_api")
    comfy_api.latest = latest

    comfy = types.ModuleType("comfy")
    samplers = types.ModuleType("comfy.samplers")
    samplers.KSAMPLER, samplers.Sampler, samplers.KSamplerX0Inpaint = KSAMPLER, Sampler, KSamplerX0Inpaint
    ms = types.ModuleType("comfy.model_sampling")
    for cls in (EPS, V_PREDICTION, X0, CONST, ModelSamplingDiscrete, ModelSamplingDiscreteEDM):
        setattr(ms, cls.__name__, cls)
    ldm = types.ModuleType("comfy.ldm")
    ldm_modules = types.ModuleType("comfy.ldm.modules")
    attention = types.ModuleType("comfy.ldm.modules.attention")
    attention.optimized_attention = optimized_attention
    ldm.modules, ldm_modules.attention = ldm_modules, attention
    mm = types.ModuleType("comfy.model_management")
    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    mm.get_torch_device = lambda: torch.device("cpu")
    mm.unet_offload_device = lambda: torch.device("cpu")
    mm.load_models_gpu, mm.unload_all_models, mm.current_loaded_models = load_models_gpu, unload_all_models, LOADED
    LOADED.clear()
    model_patcher = types.ModuleType("comfy.model_patcher")
    model_patcher.ModelPatcher = ModulePatcher
    mm.intermediate_device = lambda: torch.device("cpu")
    utils = types.ModuleType("comfy.utils")
    utils.ProgressBar = ProgressBar
    comfy.utils = utils
    mm.InterruptProcessingException = InterruptProcessingException
    comfy.samplers, comfy.model_sampling, comfy.model_management, comfy.ldm = samplers, ms, mm, ldm
    comfy.model_patcher = model_patcher

    for name, module in {"comfy_api": comfy_api, "comfy_api.latest": latest, "comfy": comfy,
                         "comfy.samplers": samplers, "comfy.model_sampling": ms, "comfy.model_management": mm,
                         "comfy.ldm": ldm, "comfy.ldm.modules": ldm_modules, "comfy.utils": utils,
                         "comfy.model_patcher": model_patcher,
                         "folder_paths": FolderPaths(models_root),
                         "comfy.ldm.modules.attention": attention}.items():
        monkeypatch.setitem(sys.modules, name, module)
    for name in [m for m in sys.modules if m.startswith("swiftstep.nodes")]:
        monkeypatch.delitem(sys.modules, name)
    return types.SimpleNamespace(io=io, samplers=samplers, model_sampling=ms, model_management=mm)


# ----------------------------------------------------------------------------- joint-attention DiTs (FLUX.1, Z-Image)
# comfy.ldm.modules.attention.wrap_attn: a `transformer_options["optimized_attention_override"]` receives the raw
# function first; `_inside_attn_wrapper` keeps the override's own call from being overridden again.


def wrap_attn(func):
    def wrapper(*args, **kwargs):
        options = kwargs.get("transformer_options")
        if "_inside_attn_wrapper" not in kwargs and options is not None and "optimized_attention_override" in options:
            kwargs["_inside_attn_wrapper"] = True
            return options["optimized_attention_override"](func, *args, **kwargs)
        return func(*args, **kwargs)

    return wrapper


@wrap_attn
def attention_pytorch(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False,
                      **kwargs):
    """comfy.ldm.modules.attention.attention_pytorch: (B, L, H·D) or, with skip_reshape, (B, H, L, D) in; (B, L, H·D)
    out, or (B, H, L, D) with skip_output_reshape."""
    if skip_reshape:
        b, _, _, d = q.shape
    else:
        b, _, inner = q.shape
        d = inner // heads
        q, k, v = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    if mask is not None and mask.ndim == 3:  # [B, Lq or 1, Lk] → [B, 1, Lq or 1, Lk]
        mask = mask.unsqueeze(1)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out if skip_output_reshape else out.transpose(1, 2).reshape(b, -1, heads * d)


def split_heads(x, heads):  # [B, L, H·D] → [B, H, L, D]
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


class JointStreamBlock(torch.nn.Module):
    """One token stream of a joint-attention block: AdaLN scale/shift from `vec` (none when `modulated` is False, as
    Z-Image's context refiner), q/k/v [B, H, L, D], an output projection and a gated MLP."""

    def __init__(self, d, heads, modulated=True):
        super().__init__()
        self.heads = heads
        self.mod = torch.nn.Linear(d, 2 * d) if modulated else None
        self.norm = torch.nn.LayerNorm(d, elementwise_affine=False)
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.proj = torch.nn.Linear(d, d)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d, 2 * d), torch.nn.GELU(), torch.nn.Linear(2 * d, d))

    def qkv_of(self, x, vec=None):
        h = self.norm(x)
        if self.mod is not None:
            scale, shift = self.mod(torch.nn.functional.silu(vec))[:, None].chunk(2, dim=-1)
            h = h * (1 + scale) + shift
        return tuple(split_heads(t, self.heads) for t in self.qkv(h).chunk(3, dim=-1))

    def finish(self, x, attn):  # attn [B, L, H·D]
        x = x + self.proj(attn)
        return x + self.mlp(self.norm(x))


class JointDoubleBlock(torch.nn.Module):
    """comfy.ldm.flux.layers.DoubleStreamBlock in miniature: own weights per stream, attention over [txt, img]."""

    def __init__(self, d, heads):
        super().__init__()
        self.img, self.txt = JointStreamBlock(d, heads), JointStreamBlock(d, heads)

    def forward(self, img, txt, vec, transformer_options):
        qi, ki, vi = self.img.qkv_of(img, vec)
        qt, kt, vt = self.txt.qkv_of(txt, vec)
        attn = attention_pytorch(torch.cat([qt, qi], 2), torch.cat([kt, ki], 2), torch.cat([vt, vi], 2),
                                 self.img.heads, skip_reshape=True, transformer_options=transformer_options)
        t = txt.shape[1]
        return self.img.finish(img, attn[:, t:]), self.txt.finish(txt, attn[:, :t])


class JointSingleBlock(JointStreamBlock):
    """comfy.ldm.flux.layers.SingleStreamBlock / lumina JointTransformerBlock in miniature: one set of weights over
    the whole sequence; `skip_output_reshape` as some ComfyUI models call attention."""

    def forward(self, x, vec, transformer_options, skip_output_reshape=False):
        q, k, v = self.qkv_of(x, vec)
        attn = attention_pytorch(q, k, v, self.heads, skip_reshape=True, skip_output_reshape=skip_output_reshape,
                                 transformer_options=transformer_options)
        if skip_output_reshape:
            attn = attn.transpose(1, 2).flatten(2)
        return self.finish(x, attn)


def patchify(x, p=2):  # [B, C, H, W] → [B, (H/p)(W/p), C·p·p]
    b, c, h, w = x.shape
    return x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).flatten(3).flatten(1, 2)


def unpatchify(tokens, shape, p=2):
    b, c, h, w = shape
    return tokens.view(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(shape)


class FluxDiT(torch.nn.Module):
    """comfy.ldm.flux.model.Flux's data flow in miniature: txt_in(context), img_in(patches), vec from t and the pooled
    `y`, one double block over [txt, img], one single block over [txt, img], the image tokens out."""

    patch_size = 2

    def __init__(self, channels=3, context_dim=12, pooled_dim=6, d=16, heads=2):
        super().__init__()
        self.img_in = torch.nn.Linear(channels * 4, d)
        self.txt_in = torch.nn.Linear(context_dim, d)
        self.time_in, self.vector_in = torch.nn.Linear(1, d), torch.nn.Linear(pooled_dim, d)
        self.double_block = JointDoubleBlock(d, heads)
        self.single_block = JointSingleBlock(d, heads)
        self.final = torch.nn.Linear(d, channels * 4)

    def vec(self, timestep, y):
        return self.time_in(timestep[:, None].to(y)) + self.vector_in(y)

    def forward(self, x, timestep, context, y=None, guidance=None, transformer_options={}, **kwargs):
        img, txt, vec = self.img_in(patchify(x)), self.txt_in(context), self.vec(timestep, y)
        img, txt = self.double_block(img, txt, vec, transformer_options)
        t = txt.shape[1]
        out = self.single_block(torch.cat([txt, img], 1), vec, transformer_options)
        return unpatchify(self.final(out[:, t:]), x.shape)


class ZImageDiT(torch.nn.Module):
    """comfy.ldm.lumina.model.NextDiT's Z-Image data flow in miniature: captions embedded and padded to
    `pad_tokens_multiple` with a pad token, refined alone (unmodulated); image patches embedded, padded, refined alone
    (t-modulated); main layer over [cap, img]; the image tokens out."""

    patch_size = 2

    def __init__(self, channels=3, context_dim=12, d=16, heads=2, pad_tokens_multiple=4):
        super().__init__()
        self.pad_tokens_multiple = pad_tokens_multiple
        self.cap_embedder = torch.nn.Linear(context_dim, d)
        self.x_embedder = torch.nn.Linear(channels * 4, d)
        self.t_embedder = torch.nn.Linear(1, d)
        self.cap_pad_token = torch.nn.Parameter(torch.randn(1, d))
        self.x_pad_token = torch.nn.Parameter(torch.randn(1, d))
        self.context_refiner = torch.nn.ModuleList([JointSingleBlock(d, heads, modulated=False)])
        self.noise_refiner = JointSingleBlock(d, heads)
        self.layer = JointSingleBlock(d, heads)
        self.final = torch.nn.Linear(d, channels * 4)

    def pad(self, x, token):
        extra = (-x.shape[1]) % self.pad_tokens_multiple
        return torch.cat([x, token.to(x).expand(x.shape[0], extra, -1)], 1)

    def forward(self, x, timesteps, context, num_tokens=None, attention_mask=None, transformer_options={}, **kwargs):
        t = self.t_embedder((1.0 - timesteps)[:, None].to(x))
        cap = self.pad(self.cap_embedder(context), self.cap_pad_token)
        for layer in self.context_refiner:
            cap = layer(cap, None, transformer_options, skip_output_reshape=True)
        n = x.shape[-2] * x.shape[-1] // 4
        img = self.noise_refiner(self.pad(self.x_embedder(patchify(x)), self.x_pad_token), t, transformer_options)
        out = self.layer(torch.cat([cap, img], 1), t, transformer_options)
        return unpatchify(self.final(out[:, cap.shape[1]:cap.shape[1] + n]), x.shape)


class FakeDiTModel(FakeBaseModel):
    """comfy.model_base.Flux / Lumina2 at the model-call surface: apply_model(x, t, c_crossattn, transformer_options,
    **extra conds) → the diffusion model's output (flow: the x0 arithmetic is left out, the wrapper does not see it)."""

    def apply_model(self, x, t, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        return self.diffusion_model(x, t, context=c_crossattn, transformer_options=dict(transformer_options), **kwargs)


def dit_patcher(family: str, seed: int = 0) -> FakeModelPatcher:
    """A MODEL whose model_base / model_config class names are ComfyUI's: Flux + FluxSchnell, Lumina2 + ZImage; or any
    other pair ("SD3" → MMDiT-named base) for refusals."""
    torch.manual_seed(seed)
    net, base, config = {"flux": (FluxDiT, "Flux", "FluxSchnell"), "zimage": (ZImageDiT, "Lumina2", "ZImage"),
                         "lumina2": (ZImageDiT, "Lumina2", "Lumina2"), "flux2": (FluxDiT, "Flux2", "Flux2"),
                         "sd3": (FluxDiT, "SD3", "SD3")}[family]
    model = type(base, (FakeDiTModel,), {})(net().double(), flow_model_sampling(), config)
    return FakeModelPatcher(model)


def set_attr(obj, attr: str, value):
    """comfy.utils.set_attr: set a dotted attribute, return the previous value."""
    *path, last = attr.split(".")
    for name in path:
        obj = getattr(obj, name)
    previous = getattr(obj, last)
    setattr(obj, last, value)
    return previous


def calc_cond_batch(patcher, x, timestep, c: dict, cond_or_uncond: list):
    """The end of comfy.samplers._calc_cond_batch with the patcher's object patches applied (ModelPatcher.patch_model
    before sampling, restored after): the model's transformer_options with cond_or_uncond and uuids added, then
    `model_function_wrapper(apply_model, {...})` where one is set, else apply_model."""
    options = dict(patcher.model_options["transformer_options"])
    options.update(cond_or_uncond=list(cond_or_uncond), uuids=[f"uuid-{i}" for i in range(len(cond_or_uncond))])
    c = {**c, "transformer_options": options}
    wrapper = patcher.model_options.get("model_function_wrapper")
    backup = {name: set_attr(patcher.model, name, obj) for name, obj in getattr(patcher, "object_patches", {}).items()}
    try:
        if wrapper is not None:
            return wrapper(patcher.model.apply_model, {"input": x, "timestep": timestep, "c": c,
                                                       "cond_or_uncond": list(cond_or_uncond)})
        return patcher.model.apply_model(x, timestep, **c)
    finally:
        for name, previous in backup.items():
            set_attr(patcher.model, name, previous)
