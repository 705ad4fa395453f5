"""A random-weight SANA-Sprint pipeline, shaped as Efficient-Large-Model/Sana_Sprint_{0.6B,1.6B}_1024px_diffusers
(component classes, the Sprint-only transformer options, the DC-AE f32c32 stage layout, the SCM scheduler config,
a Gemma tokenizer with Gemma's special ids) but tiny, built without any download.

What is kept from the real checkpoints, and why:
- transformer: `guidance_embeds=True` (the embedded guidance branch the pipeline feeds `guidance_scale` into),
  `guidance_embeds_scale=0.1` (the pipeline multiplies `guidance_scale` by it), `qk_norm="rms_norm_across_heads"`,
  `sample_size=32` (the stock pipeline's resolution binning raises for any other value), 32 latent channels, no
  positional embedding (`interpolation_scale=None`);
- VAE: six DC-AE stages (3 ResBlock, 3 EfficientViT), so the pipeline's `vae_scale_factor` is 32 as in the real
  f32c32 model, and 32 latent channels; widths are the real ones / 32;
- scheduler: the real scheduler_config.json values (trigflow, sigma_data 0.5, 1000 train steps);
- tokenizer: `<bos>` prepended (the pipeline keeps token 0 through `select_index`), right padding, pad/eos/bos/unk
  ids 0/1/2/3 as in gemma-2-2b-it.

Smallest size: the pipeline requires multiples of 32 px and the f32 VAE maps 32 px to a 1×1 latent, so 32 px works.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderDC, SanaSprintPipeline, SanaTransformer2DModel, SCMScheduler
from transformers import Gemma2Config, Gemma2Model, GemmaTokenizer

# Smallest height/width the stock pipeline accepts (multiples of 32; 32 px is a 1×1 latent in the f32 VAE).
SMALLEST_SIZE = 32

# Efficient-Large-Model/Sana_Sprint_*_1024px_diffusers scheduler/scheduler_config.json (the keys diffusers'
# scripts/convert_sana_to_diffusers.py sets for SanaSprint_* model types; the rest are the class defaults).
SPRINT_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, prediction_type="trigflow", sigma_data=0.5)

# transformer/config.json options that do not depend on model size, shared by the 0.6B and 1.6B Sprint checkpoints
# (convert_sana_to_diffusers.py: qk_norm and guidance_embeds for SanaSprint_*, the rest fixed or left default).
SPRINT_TRANSFORMER_OPTIONS = dict(
    in_channels=32, out_channels=32, patch_size=1, sample_size=32, interpolation_scale=None, attention_bias=False,
    mlp_ratio=2.5, dropout=0.0, norm_elementwise_affine=False, norm_eps=1e-6, guidance_embeds=True,
    guidance_embeds_scale=0.1, qk_norm="rms_norm_across_heads", timestep_scale=1.0)

# Size-dependent transformer options of the real checkpoints, for reference (SanaSprint_600M_P1_D28 and
# SanaSprint_1600M_P1_D20 in convert_sana_to_diffusers.py; caption_channels is Gemma-2-2B's hidden size).
SPRINT_0_6B_SIZES = dict(num_layers=28, num_attention_heads=36, attention_head_dim=32, num_cross_attention_heads=16,
                         cross_attention_head_dim=72, cross_attention_dim=1152, caption_channels=2304)
SPRINT_1_6B_SIZES = dict(num_layers=20, num_attention_heads=70, attention_head_dim=32, num_cross_attention_heads=20,
                         cross_attention_head_dim=112, cross_attention_dim=2240, caption_channels=2304)

# mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers, the VAE the Sprint conversion ships, without its widths and depths.
DCAE_F32C32_LAYOUT = dict(
    in_channels=3, latent_channels=32,
    encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)), decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
    downsample_block_type="conv", upsample_block_type="interpolate", decoder_norm_types="rms_norm",
    decoder_act_fns="silu", decoder_conv_act_fn="relu", encoder_out_shortcut=True, decoder_in_shortcut=True,
    scaling_factor=0.41407)

_TEXT_HIDDEN = 16  # tiny Gemma-2 width = the transformer's caption_channels


def gemma_tokenizer() -> GemmaTokenizer:
    """A Gemma tokenizer (transformers' byte-fallback BPE with the `▁` space normalizer) whose vocabulary is the
    Gemma specials, the 256 `<0xNN>` byte pieces and `▁`: every string encodes (as its UTF-8 bytes), so different
    prompts give different ids, and it round-trips through tokenizer.json without a SentencePiece file.

    `<bos>` is prepended as gemma-2-2b-it does (SanaSprintPipeline keeps position 0 of the text embedding as the
    first of its `max_sequence_length` tokens); padding is on the right, as the pipeline sets it before encoding and
    the diffusers conversion saves it. In transformers 5, GemmaTokenizer is also GemmaTokenizerFast."""
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    vocab.update({f"<0x{b:02X}>": len(vocab) + b for b in range(256)})
    vocab["▁"] = len(vocab)
    return GemmaTokenizer(vocab=vocab, merges=[], add_bos_token=True, add_eos_token=False, padding_side="right")


def _text_encoder(vocab_size: int) -> Gemma2Model:
    """Gemma-2 decoder (what `AutoModelForCausalLM(...).get_decoder()` gives in the conversion) with the
    gemma-2-2b defaults left in place (soft-capping, sliding window, GeLU-tanh); two layers so both the sliding and
    the global attention layer kinds run."""
    config = Gemma2Config(vocab_size=vocab_size, hidden_size=_TEXT_HIDDEN, intermediate_size=2 * _TEXT_HIDDEN,
                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                          query_pre_attn_scalar=8, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return Gemma2Model(config).eval()


def _transformer() -> SanaTransformer2DModel:
    """Sprint transformer options with two heads of 8 (self and cross attention) and two blocks."""
    return SanaTransformer2DModel(**SPRINT_TRANSFORMER_OPTIONS, num_layers=2, num_attention_heads=2,
                                  attention_head_dim=8, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                  cross_attention_dim=16, caption_channels=_TEXT_HIDDEN).eval()


def _vae() -> AutoencoderDC:
    """DC-AE f32c32 layout at 1/32 of the real widths (4, 8, 16, 16, 32, 32): the last width must be a multiple of
    the 32 latent channels for the encoder/decoder shortcuts; one layer per stage, attention heads of 8."""
    return AutoencoderDC(**DCAE_F32C32_LAYOUT, attention_head_dim=8,
                         encoder_block_out_channels=(4, 8, 16, 16, 32, 32),
                         decoder_block_out_channels=(4, 8, 16, 16, 32, 32),
                         encoder_layers_per_block=(1,) * 6, decoder_layers_per_block=(1,) * 6).eval()


def build_sana_sprint(seed: int = 0) -> SanaSprintPipeline:
    """The stock SanaSprintPipeline over tiny random components. Each model is seeded with `seed` on its own, so two
    builds with the same seed are identical and a change to one component's size leaves the others' weights alone."""
    tokenizer = gemma_tokenizer()
    torch.manual_seed(seed)
    text_encoder = _text_encoder(len(tokenizer))
    torch.manual_seed(seed)
    transformer = _transformer()
    torch.manual_seed(seed)
    vae = _vae()
    pipe = SanaSprintPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                              scheduler=SCMScheduler(**SPRINT_SCHEDULER_CONFIG))
    pipe.set_progress_bar_config(disable=True)
    return pipe
