"""OSEDiff / PiSA-SR on ComfyUI's own SD2.1-base MODEL, CLIP and VAE (the node SwiftStepUpscaleV2).

The SR weights become ComfyUI patches on clones, never edits of the weights: the UNet LoRAs (and OSEDiff's trained
conv_in, as "set" patches with its LoRA on top) on `model.clone()`, OSEDiff's VAE-encoder LoRA on a clone of the VAE's
patcher. So ComfyUI loads, offloads, frees and un-patches everything, and the inputs stay as they were. Layers are
named for ComfyUI by its own key maps — `comfy.lora.model_lora_keys_unet` (diffusers UNet names as
`lora_unet_<path>` → `diffusion_model.<ldm key>`) and `comfy.diffusers_convert.convert_vae_state_dict` (VAE names) —
and loaded by `comfy.lora.load_lora` from kohya-style tensors (lora_down = A, lora_up = B, alpha), so the patches are
in whatever format the running ComfyUI uses.

No diffusers here: the file layouts are `core.sr_weights`, the step around the networks `core.sr_step` (the same
functions `pipelines.OneStepSRPipeline` calls), the maths `core.lora_sr`.
"""

from __future__ import annotations

import torch

from ..core import lora_sr, sr_step, sr_weights

BASE = "SD2.1-base (512 px, ε-prediction; e.g. v2-1_512-ema-pruned.safetensors in Load Checkpoint)"


def check_base(node: str, model, clip, vae) -> None:
    """The MODEL/CLIP/VAE of an SD2.x ε checkpoint; errors name the input."""
    from .one_step_nodes import model_prediction_type

    config = type(model.model.model_config).__name__
    if config != "SD20":
        raise ValueError(f"{node}: input `model` must be {BASE}, the base of OSEDiff and PiSA-SR weights; this MODEL "
                         f"is {config}.")
    prediction = model_prediction_type(model.get_model_object("model_sampling"))
    if prediction != "epsilon":
        raise ValueError(f"{node}: input `model` must be {BASE}; this SD2 MODEL samples as {prediction} (SD2.x 768-v "
                         f"is not the base of these weights).")
    if clip is None:
        raise ValueError(f"{node}: input `clip` is empty (the checkpoint held no text encoder); connect the CLIP of "
                         f"the same SD2.1-base checkpoint.")
    first_stage = getattr(vae, "first_stage_model", None)
    if getattr(vae, "latent_channels", None) != 4 or getattr(vae, "downscale_ratio", None) != 8 \
            or not hasattr(first_stage, "encoder") or not hasattr(first_stage, "quant_conv"):
        raise ValueError(f"{node}: input `vae` must be the SD VAE (4 latent channels, 8× downscale) of the same "
                         f"SD2.1-base checkpoint.")


def encode_prompt(node: str, model, clip, prompt: str) -> torch.Tensor:
    """[1, L, 1024] cross-attention condition of the prompt (PiSA-SR: always "", as the pipeline)."""
    cond = clip.encode_from_tokens(clip.tokenize(prompt))
    width = model.model.model_config.unet_config.get("context_dim")
    if width is not None and cond.shape[-1] != width:
        raise ValueError(f"{node}: input `clip` gives {cond.shape[-1]}-wide text features; this SD2 MODEL needs "
                         f"{width} (OpenCLIP ViT-H: connect the CLIP of the same checkpoint).")
    return cond


def _kohya(module: str) -> str:
    """ComfyUI's kohya key for a diffusers UNet module: `lora_unet_` + the path with `_` for `.`."""
    return "lora_unet_" + module.replace(".", "_")


def _load_lora(layers, model_keys: dict[str, str]) -> dict:
    """ComfyUI patches of LoRA layers (module, A, B, rank) on the model keys `model_keys[module]`:
    ΔW = strength·(alpha/rank)·up·down with alpha = LORA_ALPHA, as peft applies the official files."""
    import comfy.lora

    lora, to_load = {}, {}
    for module, a, b, _ in layers:
        lora[f"{module}.lora_down.weight"] = a
        lora[f"{module}.lora_up.weight"] = b
        lora[f"{module}.alpha"] = torch.tensor(float(sr_weights.LORA_ALPHA))
        to_load[module] = model_keys[module]
    return comfy.lora.load_lora(lora, to_load)


def _add(node: str, patcher, patches: dict, what: str, source: str) -> None:
    added = patcher.add_patches(patches, 1.0)
    if len(added) != len(patches):
        missing = sorted(set(patches) - set(added), key=str)
        raise ValueError(f"{node}: {source}: {len(missing)} of {len(patches)} {what} patches match no weight of the "
                         f"input, e.g. {missing[:2]}; is it {BASE}?")


def unet_clones(node: str, model, sd: dict, method: str, adjustable: bool, source: str):
    """(main, pix): clones of `model` with the SR patches. OSEDiff: main = trained conv_in + LoRA. PiSA-SR: main =
    pixel + semantic LoRA; pix = pixel LoRA only, for the adjustable mode (None otherwise)."""
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(model.model, {})

    def patches(group):
        layers = sr_weights.lora_layers(sd, method, group, source)
        missing = [m for m, *_ in layers if _kohya(m) not in key_map]
        if missing:
            raise ValueError(f"{node}: {source}: {len(missing)} of {len(layers)} LoRA layers match no layer of "
                             f"input `model`, e.g. {missing[:2]}; is it {BASE}?")
        return _load_lora(layers, {m: key_map[_kohya(m)] for m, *_ in layers})

    main = model.clone()
    if method == "osediff":
        # the trained conv_in is stored in full (conv_in.base_layer.*): "set" patches, then its LoRA on top
        weight_key = key_map[_kohya("conv_in")]
        state = sd["state_dict_unet"]
        conv_in = {weight_key: state["conv_in.base_layer.weight"],
                   weight_key.removesuffix(".weight") + ".bias": state["conv_in.base_layer.bias"]}
        for key, value in conv_in.items():
            have = tuple(model.get_model_object(key).shape)
            if have != tuple(value.shape):
                raise ValueError(f"{node}: {source}: conv_in has shape {tuple(value.shape)}, input `model` "
                                 f"{have}; is it {BASE}?")
        _add(node, main, {k: ("set", (v,)) for k, v in conv_in.items()}, "conv_in", source)
        _add(node, main, patches("unet"), "UNet LoRA", source)
        return main, None
    pix = patches("pix")
    _add(node, main, pix, "pixel LoRA", source)
    _add(node, main, patches("sem"), "semantic LoRA", source)
    if not adjustable:
        return main, None
    pix_only = model.clone()
    _add(node, pix_only, pix, "pixel LoRA", source)
    return main, pix_only


def vae_encoder_patcher(node: str, vae, sd: dict, source: str):
    """A clone of the VAE's patcher with OSEDiff's encoder LoRA (the decoder is untouched)."""
    import comfy.diffusers_convert

    layers = sr_weights.lora_layers(sd, "osediff", "vae", source)
    names = [f"{m}.weight" for m, *_ in layers]
    # ComfyUI's diffusers → LDM VAE renaming, applied to index tensors to read off the key mapping
    renamed = comfy.diffusers_convert.convert_vae_state_dict({k: torch.tensor([float(i)]) for i, k in enumerate(names)})
    ldm = {names[int(v.flatten()[0])]: k for k, v in renamed.items()}
    weights = set(vae.first_stage_model.state_dict())
    missing = [m for m, *_ in layers if ldm[f"{m}.weight"] not in weights]
    if missing:
        raise ValueError(f"{node}: {source}: {len(missing)} of {len(layers)} VAE-encoder LoRA layers match no layer "
                         f"of input `vae`, e.g. {missing[:2]}; is it the SD VAE?")
    patcher = vae.patcher.clone()
    _add(node, patcher, _load_lora(layers, {m: ldm[f"{m}.weight"] for m, *_ in layers}), "VAE-encoder LoRA", source)
    return patcher


def _group_norms(module) -> list:
    return [m for m in module.modules() if isinstance(m, torch.nn.GroupNorm)]


def encode_moments(vae, patcher, x: torch.Tensor, vae_tile: int | None) -> torch.Tensor:
    """The VAE posterior's moments [1, 8, h, w] of x [1, 3, H, W] in [-1, 1] (encoder + quant_conv, with the
    patches of `patcher`), on the VAE's device."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher], memory_required=vae.memory_used_encode(x.shape, vae.vae_dtype),
                                           force_full_load=getattr(vae, "disable_offload", False))
    model = vae.first_stage_model

    def moments(t):
        return model.quant_conv(model.encoder(t))

    x = x.to(vae.device, vae.vae_dtype)
    if vae_tile is None:
        return moments(x)
    return sr_step.encode_tiled(moments, _group_norms(model.encoder), x, vae_tile, vae.downscale_ratio)


def decode(vae, patcher, latent: torch.Tensor, vae_tile: int | None) -> torch.Tensor:
    """VAE decode (post_quant_conv + decoder) of an unscaled latent: [1, 3, H, W] in about [-1, 1]."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher],
                                           memory_required=vae.memory_used_decode(latent.shape, vae.vae_dtype),
                                           force_full_load=getattr(vae, "disable_offload", False))
    model = vae.first_stage_model
    z = latent.to(vae.device, vae.vae_dtype)
    if vae_tile is None:
        return model.decode(z)
    return sr_step.decode_tiled(model.decode, _group_norms(model.decoder), z, vae_tile, vae.upscale_ratio)


def unet_eps(patcher, cond: torch.Tensor, t: int):
    """fn(z) → ε of the patched UNet at timestep t for VP latents z [N, 4, h, w], through ComfyUI's `apply_model`
    (which takes x = z·√(σ²+1) at σ(t) and returns x0: `core.sr_step.eps_from_sigma_space`)."""
    model_sampling = patcher.get_model_object("model_sampling")
    sigma = float(model_sampling.sigma(torch.tensor(float(t))))
    options = patcher.model_options.get("transformer_options", {})

    def eps(z):
        n = z.shape[0]
        sigmas = torch.full((n,), sigma, dtype=torch.float32, device=z.device)
        context = cond.expand(n, -1, -1)
        transformer_options = {**options, "sigmas": sigmas, "cond_or_uncond": [0]}

        def denoise(x):
            return patcher.model.apply_model(x, sigmas, c_crossattn=context, transformer_options=transformer_options)

        return sr_step.eps_from_sigma_space(denoise, z, sigma)

    return eps


def load_unet(patcher, shape) -> None:
    """Load (and patch) a UNet clone, with the memory of one call on `shape` (4 tiles of the latent per call)."""
    import comfy.model_management

    memory = patcher.model.memory_required(list(shape))
    comfy.model_management.load_models_gpu([patcher], memory_required=memory)


def combine(eps_main: torch.Tensor, eps_pix: torch.Tensor | None, lambda_pix: float,
            lambda_sem: float) -> torch.Tensor:
    """ε of the step: the single pass, or PiSA-SR's λ_pix·ε_pix + λ_sem·(ε_pix+sem − ε_pix)."""
    if eps_pix is None:
        return eps_main
    return lora_sr.pisa_adjustable_eps(eps_pix, eps_main, lambda_pix, lambda_sem)


def super_resolve(node: str, model, clip, vae, sd: dict, method: str, source: str, frames: torch.Tensor,
                  prompt: str, upscale: int, lambda_pix: float, lambda_sem: float, color_fix: str, tile_size: int,
                  tile_overlap: int, min_side: int, generator: torch.Generator) -> torch.Tensor:
    """`OneStepSRPipeline.__call__` on ComfyUI's models: frames [B, 3, H, W] in [0, 1] → [B, 3, upscale·H,
    upscale·W]. One posterior draw per image from `generator`, in order; progress per UNet tile."""
    import comfy.model_management
    import comfy.utils

    from .one_step_nodes import vp_schedule

    # 2. The SR weights as patches on clones; the condition (PiSA-SR: the empty prompt, as the pipeline)
    main, pix = unet_clones(node, model, sd, method, lora_sr.pisa_two_pass(method, lambda_pix, lambda_sem), source)
    passes = [main] if pix is None else [main, pix]
    vae_patcher = vae_encoder_patcher(node, vae, sd, source) if method == "osediff" else vae.patcher
    cond = encode_prompt(node, model, clip, prompt if method == "osediff" else "")
    t = lora_sr.OSEDIFF_T if method == "osediff" else lora_sr.PISA_T
    schedule = vp_schedule(model.get_model_object("model_sampling"))
    latent_format = model.get_model_object("latent_format")

    count, _, h0, w0 = frames.shape
    _, (height, width) = sr_step.preprocess_sizes(h0, w0, upscale, min_side)
    f = vae.downscale_ratio
    tiles = sr_step.tile_count(height // f, width // f, tile_size, tile_overlap)
    progress = comfy.utils.ProgressBar(count * len(passes) * tiles)
    done, outs = 0, []
    with torch.no_grad():
        for frame in frames:
            comfy.model_management.throw_exception_if_processing_interrupted()
            # 3. Pre-process and encode; the posterior sample is the only randomness
            x = sr_step.preprocess(frame, upscale, min_side).to(vae.device, vae.vae_dtype)
            vae_tile = sr_step.auto_vae_tile(vae.device, x.shape[-2:])
            moments = encode_moments(vae, vae_patcher, x, vae_tile)
            z = latent_format.process_in(sr_step.posterior_sample(moments, generator)).float()
            # 4. One UNet step per clone, tiled over the latent as the pipeline tiles
            h, w = z.shape[-2:]
            call = z.shape if tiles == 1 else (min(4, tiles), z.shape[1], min(tile_size, h), min(tile_size, w))
            eps = []
            for patcher in passes:
                load_unet(patcher, call)

                def on_tile(k, total, base=done):
                    comfy.model_management.throw_exception_if_processing_interrupted()
                    progress.update_absolute(base + k)

                z = z.to(patcher.load_device)
                eps.append(sr_step.latent_eps(unet_eps(patcher, cond, t), z, tile_size, tile_overlap, on_tile))
                done += tiles
            eps = combine(eps[0], eps[1] if len(eps) > 1 else None, lambda_pix, lambda_sem)
            x0 = sr_step.sr_x0(method, eps.float(), z.float(), schedule)
            # 5. Decode, colour fix against the upscaled input, back to exactly upscale × the input size
            decoded = decode(vae, vae_patcher, latent_format.process_out(x0), vae_tile)
            outs.append(sr_step.finish(decoded, x, color_fix, (h0 * upscale, w0 * upscale)))
    return torch.stack(outs)
