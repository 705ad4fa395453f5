"""Random-weight Stable Diffusion pipelines (SD1.x, SD2.x, SDXL shapes) built without any download.

Used by the tests, ``swiftstep selftest`` and ``bench/``. Sizes: ``tiny`` runs on a CPU in milliseconds; ``full`` has
the real SD2.1 / SDXL architectures (random weights) for GPU benchmarks; ``comfy`` has the real text encoders and
VAE but the smallest UNet ComfyUI's model detection still recognises (SD1/SD2 at 320/640 channels, SDXL shaped like
Segmind-Vega), for live ComfyUI tests. The tokenizer is a byte-level CLIP BPE with no merges, written from scratch,
so text still changes the embeddings.
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("sd1", "sd2", "sd2-v", "sdxl")
SIZES = ("tiny", "full", "comfy")


def clip_tokenizer(max_length: int = 77):
    """A CLIP tokenizer whose vocabulary is the 256 byte symbols (+ end-of-word forms) and the two specials."""
    from transformers import CLIPTokenizer

    # GPT-2/CLIP byte-to-unicode table: printable bytes map to themselves, the rest to U+0100 onwards.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    symbols, extra = [], 0
    for b in range(256):
        if b in printable:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    vocab = {}
    for s in symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]:
        vocab[s] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def _scheduler_config(family: str) -> dict:
    # The scheduler configs the official SD folders ship (scaled_linear 0.00085 → 0.012, 1000 steps).
    return dict(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        prediction_type="v_prediction" if family == "sd2-v" else "epsilon",
        timestep_spacing="trailing", steps_offset=1, clip_sample=False, set_alpha_to_one=False,
        interpolation_type="linear", use_karras_sigmas=False,
    )


def build_components(family: str, size: str = "tiny", seed: int = 0) -> dict:
    """Components dict for ``OneStepPipeline(**components)`` (or a stock SD/SDXL pipeline) with seeded weights."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if family not in FAMILIES:
        raise ValueError(f"`family` must be one of {FAMILIES}, got {family!r}.")
    if size not in SIZES:
        raise ValueError(f"`size` must be one of {SIZES}, got {size!r}.")
    torch.manual_seed(seed)
    tokenizer = clip_tokenizer()
    xl = family == "sdxl"
    sd2 = family.startswith("sd2")

    if size == "tiny":
        te_dim = 32
        te_cfg = dict(hidden_size=te_dim, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                      vocab_size=1000, max_position_embeddings=77, bos_token_id=512, eos_token_id=513,
                      pad_token_id=513, hidden_act="gelu" if sd2 else "quick_gelu")
        # 32 GroupNorm groups (the default): ComfyUI's UNet hard-codes 32, so the same weights mean the same net
        unet_cfg = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=16,
                        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(2, 4))
        vae_cfg = dict(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                       up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8,
                       sample_size=32)
    else:  # "full" and "comfy": the real text encoders and VAE
        te_dim = 1024 if sd2 else 768
        te_cfg = dict(hidden_size=te_dim, intermediate_size=te_dim * 4, num_hidden_layers=23 if sd2 else 12,
                      num_attention_heads=16 if sd2 else 12, vocab_size=49408, max_position_embeddings=77,
                      bos_token_id=512, eos_token_id=513, pad_token_id=513,
                      hidden_act="gelu" if sd2 else "quick_gelu")
        unet_cfg = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, sample_size=64,
                        attention_head_dim=(5, 10, 20, 20) if sd2 else 8)
        if size == "comfy":  # ComfyUI recognises SD1/SD2 by width 320, context width and projection type
            unet_cfg = dict(block_out_channels=(320, 640), layers_per_block=1, sample_size=64,
                            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                            attention_head_dim=(5, 10) if sd2 else 8)
        vae_cfg = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512,
                       down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)

    if xl:
        # The two encoders must differ in width (as CLIP-L 768 / bigG 1280 do): converters tell them apart by it.
        te2_cfg = dict(te_cfg, hidden_size=48, intermediate_size=64, hidden_act="gelu", projection_dim=te_dim)
        if size != "tiny":
            te_cfg = dict(te_cfg, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          hidden_act="quick_gelu")
            te2_cfg = dict(te2_cfg, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                           num_attention_heads=20, projection_dim=1280)
            unet_cfg = dict(block_out_channels=(320, 640, 1280), layers_per_block=2, sample_size=128,
                            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                            # "comfy": Segmind-Vega's depths [0, 0, 1, 1, 2, 2], which ComfyUI detects as SDXL-family
                            transformer_layers_per_block=(1, 2, 10) if size == "full" else (1, 1, 2),
                            attention_head_dim=(5, 10, 20))
            vae_cfg = dict(vae_cfg, force_upcast=True, scaling_factor=0.13025)
        else:
            unet_cfg = dict(unet_cfg, transformer_layers_per_block=(1, 2))
            vae_cfg = dict(vae_cfg, scaling_factor=0.13025)
        time_dim = 8 if size == "tiny" else 256
        unet_cfg.update(addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                        projection_class_embeddings_input_dim=6 * time_dim + te2_cfg["projection_dim"],
                        cross_attention_dim=te_cfg["hidden_size"] + te2_cfg["hidden_size"], use_linear_projection=True)
    else:
        unet_cfg.update(cross_attention_dim=te_dim, use_linear_projection=sd2)

    components = {
        "unet": UNet2DConditionModel(**unet_cfg),
        "vae": AutoencoderKL(latent_channels=4, **vae_cfg),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**te_cfg)),
        "tokenizer": tokenizer,
        "scheduler": EulerDiscreteScheduler.from_config(_scheduler_config(family)),
        "text_encoder_2": None,
        "tokenizer_2": None,
    }
    if xl:
        components["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**te2_cfg))
        components["tokenizer_2"] = clip_tokenizer()
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if components[name] is not None:
            components[name].eval()
    return components


def save_folder(family: str, path: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a diffusers folder (model_index.json + safetensors) for ``family`` with the real writers."""
    from .pipelines.pipeline_one_step import OneStepPipeline

    path = Path(path)
    OneStepPipeline(**build_components(family, size, seed)).save_pretrained(path)
    return path
