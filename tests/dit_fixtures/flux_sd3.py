"""Random-weight FLUX.1-schnell and SD3.5-Large-Turbo pipelines, shaped as the real ones (component classes, VAE
latent layout and scaling, scheduler configs) but tiny, built without any download.

Transformer sizes are the smallest that ComfyUI's model detection loads as the same net: Flux with head dim 128 and
rope axes (16, 56, 56), SD3 (MMDiT) with head dim 64 and as many heads as layers (ComfyUI derives both from the width
/ 64). ComfyUI 0.3.64 also hard-codes Flux's width 3072 and context width 4096 (0.33 reads them from the weights):
`build_flux(size="comfy")` is that one, ~530 M parameters, too slow for CI."""

from __future__ import annotations

import string

import torch
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                       SD3Transformer2DModel, StableDiffusion3Pipeline)
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel,
                          T5TokenizerFast)

from swiftstep.tiny_models import clip_tokenizer

# black-forest-labs/FLUX.1-schnell scheduler/scheduler_config.json
FLUX_SCHNELL_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                              num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
# stabilityai/stable-diffusion-3.5-large scheduler/scheduler_config.json (the SD3/SD3.5 folders ship this one)
SD35_LARGE_TURBO_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
FLUX_SIZES = {"tiny": dict(num_attention_heads=2, joint_attention_dim=32),
              "comfy": dict(num_attention_heads=24, joint_attention_dim=4096)}


def t5_tokenizer(max_length: int = 512):
    """A T5 tokenizer (Unigram, `</s>` appended, `<pad>` 0, `</s>` 1, `<unk>` 2) whose pieces are single printable
    characters, so every prompt maps to its own ids without a SentencePiece model file."""
    chars = [c for c in string.printable if not c.isspace()]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)] + [(c, -3.0) for c in chars]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=max_length)


def _clip(cls, hidden: int):
    tokenizer = clip_tokenizer()
    config = CLIPTextConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                            num_attention_heads=2, vocab_size=len(tokenizer), max_position_embeddings=77,
                            bos_token_id=512, eos_token_id=513, pad_token_id=513, projection_dim=hidden)
    return cls(config).eval(), tokenizer


def _t5(d_model: int):
    """T5 v1.1 layout (gated GELU); only d_model matters to the transformer, so attention and MLP stay narrow."""
    tokenizer = t5_tokenizer()
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                      relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                      tie_word_embeddings=False)
    return T5EncoderModel(config).eval(), tokenizer


def _vae(scaling_factor: float, shift_factor: float) -> AutoencoderKL:
    """8× downsampling and 16 latent channels without quant convs, as the Flux and SD3 VAEs, at minimal width."""
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(4, 4, 8, 8),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=1, norm_num_groups=4, sample_size=64, force_upcast=True,
                         scaling_factor=scaling_factor, shift_factor=shift_factor, use_quant_conv=False,
                         use_post_quant_conv=False).eval()


def _perturb_constants(module: torch.nn.Module) -> None:
    """Norm scales start as all ones: make them random so that a converter that swaps or drops one shows."""
    with torch.no_grad():
        for param in module.parameters():
            if bool((param == param.flatten()[0]).all()):
                param.add_(0.1 * torch.randn_like(param))


def build_flux(seed: int = 0, size: str = "tiny") -> FluxPipeline:
    """FLUX.1-schnell-shaped pipeline: CLIP-L pooled + T5 sequence conditioning, no guidance embedding. `size`:
    "tiny" (width 256, loads in ComfyUI ≥ 0.33) or "comfy" (width 3072, context 4096: loads in 0.3.64 too)."""
    if size not in FLUX_SIZES:
        raise ValueError(f"`size` must be one of {tuple(FLUX_SIZES)}, got {size!r}.")
    dims = FLUX_SIZES[size]
    torch.manual_seed(seed)
    text_encoder, tokenizer = _clip(CLIPTextModel, 32)
    text_encoder_2, tokenizer_2 = _t5(dims["joint_attention_dim"])
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=128, pooled_projection_dim=32, guidance_embeds=False,
                                         axes_dims_rope=(16, 56, 56), **dims).eval()
    _perturb_constants(transformer)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHNELL_SCHEDULER),
                        vae=_vae(0.3611, 0.1159), text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)


def build_sd3(seed: int = 0) -> StableDiffusion3Pipeline:
    """SD3.5-Large-Turbo-shaped pipeline: CLIP-L and a wider CLIP-G (their token embeddings are concatenated and
    zero-padded to the T5 width), T5, and an MMDiT with RMS QK-norm and no dual-attention layers."""
    torch.manual_seed(seed)
    text_encoder, tokenizer = _clip(CLIPTextModelWithProjection, 16)
    text_encoder_2, tokenizer_2 = _clip(CLIPTextModelWithProjection, 32)
    text_encoder_3, tokenizer_3 = _t5(64)
    heads = 2
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, num_layers=heads,
                                        attention_head_dim=64, num_attention_heads=heads, joint_attention_dim=64,
                                        caption_projection_dim=64 * heads, pooled_projection_dim=16 + 32,
                                        out_channels=16, pos_embed_max_size=16, qk_norm="rms_norm").eval()
    _perturb_constants(transformer)
    return StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SD35_LARGE_TURBO_SCHEDULER),
                                    vae=_vae(1.5305, 0.0609), text_encoder=text_encoder, tokenizer=tokenizer,
                                    text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                                    text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3, transformer=transformer)
