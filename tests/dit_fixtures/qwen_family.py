"""Random-weight Z-Image-Turbo, FLUX.2-klein-4B and Qwen-Image pipelines: the DiT families whose text encoder is a Qwen
LLM. Shaped as the real ones (component classes, tokenizer and chat template, VAE latent layout and scaling, scheduler
configs, `is_distilled`) but tiny, built without any download.

Transformer sizes keep what ComfyUI's model detection does not read from the weights but assumes: head dim 128 and
the real rope axes everywhere, two refiner layers for Z-Image. FLUX.2-klein at this size is detected as `flux2` with the
same weights meaning the same net (ComfyUI 0.33 takes FLUX.2 weights only in the BFL key layout). ComfyUI recognises
Z-Image only at width 3840 and Qwen-Image only at width 3072 (24 heads) with 3584-wide text features; it reads both in
the diffusers key layout. `size="comfy"` gives those widths (one main layer; ~0.9B and ~0.4B parameters, too big for
CPU CI) for live ComfyUI checks; below width 1024 ComfyUI's NextDiT cannot even hold Z-Image's timestep embedder.

Every parameter the default init leaves constant (norm weights, pad tokens, zero biases) is perturbed, so a converter
that swaps or drops such a tensor changes the output instead of going unnoticed."""

from __future__ import annotations

import torch
from diffusers import (AutoencoderKL, AutoencoderKLFlux2, AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler,
                       Flux2KleinPipeline, Flux2Transformer2DModel, QwenImagePipeline, QwenImageTransformer2DModel,
                       ZImagePipeline, ZImageTransformer2DModel)
from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer, Qwen3Config,
                          Qwen3ForCausalLM, Qwen3Model)

SIZES = ("tiny", "comfy")

# Tongyi-MAI/Z-Image-Turbo scheduler/scheduler_config.json
ZIMAGE_TURBO_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
# black-forest-labs/FLUX.2-klein-4B scheduler/scheduler_config.json (the FLUX.2 one; the klein pipeline derives mu
# from the sequence length and step count itself, the exponential time shift is what it takes from here)
FLUX2_KLEIN_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, invert_sigmas=False, max_image_seq_len=4096,
                             max_shift=1.15, num_train_timesteps=1000, shift=3.0, shift_terminal=None,
                             stochastic_sampling=False, time_shift_type="exponential", use_beta_sigmas=False,
                             use_dynamic_shifting=True, use_exponential_sigmas=False, use_karras_sigmas=False)
# Qwen/Qwen-Image scheduler/scheduler_config.json
QWENIMAGE_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, invert_sigmas=False, max_image_seq_len=8192,
                           max_shift=0.9, num_train_timesteps=1000, shift=1.0, shift_terminal=0.02,
                           stochastic_sampling=False, time_shift_type="exponential", use_beta_sigmas=False,
                           use_dynamic_shifting=True, use_exponential_sigmas=False, use_karras_sigmas=False)

# Qwen3's template reduced to what the pipelines render: plain messages, the generation prompt, and the empty think
# block that `enable_thinking=False` appends (FLUX.2-klein asks for it, Z-Image does not).
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)
# Words that become single tokens, as in the real vocabulary: QwenImagePipeline drops the first 34 tokens of its
# prompt template (`prompt_template_encode_start_idx`), which is exactly its system part with these words whole.
_WHOLE_WORDS = ("system", "user", "assistant", "Describe", " the", " image", " by", " detailing", " color", " shape",
                " size", " texture", " quantity", " text", " spatial", " relationships", " of", " objects", " and",
                " background")
_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
            "<|image_pad|>", "<|video_pad|>")


def _byte_symbols() -> dict[int, str]:
    """GPT-2 byte-level alphabet: printable Latin-1 bytes stand for themselves, the others for U+0100 onwards."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = iter(range(0x100, 0x200))
    return {b: chr(b) if b in printable else chr(next(shifted)) for b in range(256)}


def qwen_tokenizer() -> Qwen2Tokenizer:
    """Qwen2 byte-level BPE over the 256 byte symbols plus prefix merges for the template words, with Qwen's special
    tokens (`<|endoftext|>` pads, `<|im_end|>` ends), `<think>`/`</think>` and a Qwen3-style chat template."""
    from tokenizers import AddedToken

    symbols = _byte_symbols()
    vocab = {symbols[b]: b for b in range(256)}
    merges = []
    for word in _WHOLE_WORDS:
        encoded = "".join(symbols[b] for b in word.encode())
        for end in range(2, len(encoded) + 1):
            if encoded[:end] not in vocab:
                vocab[encoded[:end]] = len(vocab)
                merges.append((encoded[:end - 1], encoded[end - 1]))
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>", additional_special_tokens=list(_SPECIAL[1:]),
                               chat_template=QWEN3_CHAT_TEMPLATE, model_max_length=131072)
    tokenizer.add_tokens([AddedToken(t, special=False) for t in ("<think>", "</think>")])
    return tokenizer


def _perturb_constants(*modules: torch.nn.Module) -> None:
    with torch.no_grad():
        for module in modules:
            for param in module.parameters():
                if param.is_floating_point() and bool((param == param.flatten()[0]).all()):
                    param.add_(0.1 * torch.randn_like(param))


def _qwen3_config(tokenizer, hidden: int, layers: int) -> Qwen3Config:
    return Qwen3Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2,
                       max_position_embeddings=2048, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                       tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id, bos_token_id=None)


def _check_size(size: str) -> None:
    if size not in SIZES:
        raise ValueError(f"`size` must be one of {SIZES}, got {size!r}.")


def build_zimage(seed: int = 0, size: str = "tiny") -> ZImagePipeline:
    """Z-Image-Turbo-shaped pipeline: a Qwen3 base model (its second-to-last hidden states condition), the single-stream
    DiT with head dim 128, rope axes (32, 48, 48) over (1536, 512, 512) positions and two refiner layers of each kind,
    and the FLUX.1 VAE layout (16 channels, 8x, scaling 0.3611, shift 0.1159, no quant convs)."""
    _check_size(size)
    torch.manual_seed(seed)
    tokenizer = qwen_tokenizer()
    text_encoder = Qwen3Model(_qwen3_config(tokenizer, hidden=32, layers=2)).eval()
    width, heads, layers = (3840, 30, 1) if size == "comfy" else (128, 1, 2)
    transformer = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=width,
                                           n_layers=layers, n_refiner_layers=2, n_heads=heads, n_kv_heads=heads,
                                           norm_eps=1e-5, qk_norm=True, cap_feat_dim=32, rope_theta=256.0,
                                           t_scale=1000.0, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512]).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(4, 4, 8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=4, sample_size=64, force_upcast=True,
                        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                        use_post_quant_conv=False).eval()
    _perturb_constants(text_encoder, transformer, vae)
    return ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**ZIMAGE_TURBO_SCHEDULER), vae=vae,
                          text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)


def build_flux2_klein(seed: int = 0) -> Flux2KleinPipeline:
    """FLUX.2-klein-4B-shaped pipeline (step-distilled, `is_distilled` in model_index): a Qwen3 causal LM deep enough
    for the pipeline's default text layers (9, 18, 27), whose three hidden states are concatenated into the context;
    the FLUX.2 DiT with one head of 128, rope axes (32, 32, 32, 32), no guidance embedding; the FLUX.2 VAE layout
    (32 channels, 8x, quant convs, batch-norm statistics over the 2x2-patchified 128 channels)."""
    torch.manual_seed(seed)
    tokenizer = qwen_tokenizer()
    text_hidden = 16
    text_encoder = Qwen3ForCausalLM(_qwen3_config(tokenizer, hidden=text_hidden, layers=28)).eval()
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=128, num_layers=1, num_single_layers=1,
                                          attention_head_dim=128, num_attention_heads=1,
                                          joint_attention_dim=3 * text_hidden, timestep_guidance_channels=256,
                                          mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000,
                                          eps=1e-6, guidance_embeds=False).eval()
    vae = AutoencoderKLFlux2(in_channels=3, out_channels=3, latent_channels=32, block_out_channels=(4, 4, 8, 8),
                             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                             layers_per_block=1, norm_num_groups=4, sample_size=64, use_quant_conv=True,
                             use_post_quant_conv=True, patch_size=(2, 2)).eval()
    _perturb_constants(text_encoder, transformer, vae)
    with torch.no_grad():
        vae.bn.running_mean.copy_(0.1 * torch.randn_like(vae.bn.running_mean))
        vae.bn.running_var.copy_(1 + 0.2 * torch.rand_like(vae.bn.running_var))
    return Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX2_KLEIN_SCHEDULER), vae=vae,
                              text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
                              is_distilled=True)


def build_qwenimage(seed: int = 0, size: str = "tiny") -> QwenImagePipeline:
    """Qwen-Image-shaped pipeline: Qwen2.5-VL (tiny vision tower included) whose last hidden states after the
    34 template tokens condition; the MMDiT with head dim 128 and rope axes (16, 56, 56); the Wan-style causal 3D VAE
    (16 channels, 8x, Qwen-Image's latent mean/std)."""
    _check_size(size)
    torch.manual_seed(seed)
    tokenizer = qwen_tokenizer()
    if size == "comfy":
        text_hidden, text_head, rope_section, heads = 3584, 128, [16, 24, 24], 24
    else:
        text_hidden, text_head, rope_section, heads = 32, 16, [2, 3, 3], 1
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=text_hidden // text_head, num_key_value_heads=1,
                         max_position_embeddings=2048, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": rope_section}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=1, out_hidden_size=text_hidden,
                           fullatt_block_indexes=[0]),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=1,
                                              attention_head_dim=128, num_attention_heads=heads,
                                              joint_attention_dim=text_hidden, guidance_embeds=False,
                                              axes_dims_rope=(16, 56, 56)).eval()
    vae = AutoencoderKLQwenImage(base_dim=4, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True, True]).eval()
    _perturb_constants(text_encoder, transformer, vae)
    return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**QWENIMAGE_SCHEDULER), vae=vae,
                             text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
