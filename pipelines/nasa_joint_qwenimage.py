"""NASA / NAG on Qwen-Image (QwenImageTransformer2DModel, dual-stream MMDiT): one image stream, two text streams.

Qwen-Image-Lightning runs at true-CFG 1, so its stock negative prompt does nothing. Here the negative prompt gets its
own text stream through every block, the image stream stays single — the construction `nasa_joint.py` uses for FLUX.1
and `nasa_joint_sd3.py` for SD3 (the official NAG code's, ChenDarYen/Normalized-Attention-Guidance), and on Qwen-Image
it is exact, nothing approximated:

- the transformer sees the text embeddings of both prompts stacked on the batch [pos; neg] (2B rows), each padded to
  the longer of the two with its padding masked (`encoder_hidden_states_mask`), and the image latents once (B rows),
  so the output has B rows as it is;
- Qwen-Image's temb comes from the timestep alone (no pooled text embedding), so both text streams take the same
  modulation: each block's `txt_mod` output is repeated to the 2B rows (with `zero_cond_t` too, where the text takes
  the first temb chunk); `img_mod`, `modulate_index` and `norm_out` see the B image rows unchanged;
- text RoPE: diffusers gives text token j the position max_vid_index + j whatever the stream's length (the table has
  the padded length), so every token of either stream keeps the position of its own prompt's forward;
- in each block's attention (`QwenDoubleStreamAttnProcessor2_0` concatenates [text, image] and masks the text
  padding) the image q/k/v are projected once; the image queries give Z+ over [txt+, img] and Z− over [txt−, img]
  (`attention_kernels.prefix_dual_attention`, the image keys scored once, each text prefix with its own mask), and
  their output is `NegativeGuidance.combine(Z+, Z−)`; each text stream attends to its own [txt, img] with its mask.

ControlNet residuals add to the image stream only, so they keep working. Installed with hooks and attention
processors only (no subclass, no copied diffusers code); `remove()` restores both. Guidance that is off (NASA α = 0,
NAG scale 1) installs nothing, so it is bit-identical.

NAG: no official Qwen-Image setting is published; FLUX.1's (`NegativeGuidance.for_family("flux", "nag")`: scale 5,
τ 2.5, α 0.25, L2 per-token ratio as the official joint-attention code) is the closest dual-stream MMDiT with one.
NASA applies SNOOPI eq. 9 (Z+ − α·Z−) at the same place; SNOOPI publishes no Qwen-Image α.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core import finite, nasa
from .nasa_joint import JointGuidanceHandle, call_arguments, image_attention_pair, merge_heads, text_attention_rows
from .negative_context import negative_rows

try:  # the complex RoPE the stock Qwen-Image processor applies (use_real=False)
    from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen
except ImportError:  # pragma: no cover - diffusers without Qwen-Image
    apply_rotary_emb_qwen = None

SUPPORTED = ("QwenImageTransformer2DModel",)
STOCK_PROCESSOR = "QwenDoubleStreamAttnProcessor2_0"


class QwenJointGuidanceProcessor:
    """`QwenDoubleStreamAttnProcessor2_0` with the image tokens [B, N] once and the text streams [pos; neg] as 2B rows
    (`encoder_hidden_states_mask` [2B, T], True / 1 = attend, or None).

    Image q/k/v are projected once; the image queries give (Z+, Z−) against the two text prefixes with the image keys
    shared, and their output is `guidance.combine(Z+, Z−)` (NAG: heads merged before the norm, as the official code).
    Each text stream attends to its own [txt, img] and keeps its output."""

    def __init__(self, guidance: nasa.NegativeGuidance):
        self.guidance = guidance

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        if attention_mask is not None:
            raise ValueError("NASA/NAG joint attention takes no `attention_mask` (Qwen-Image masks the text with "
                             "`encoder_hidden_states_mask`).")
        b = hidden_states.shape[0]
        if encoder_hidden_states is None or encoder_hidden_states.shape[0] != 2 * b:
            rows = None if encoder_hidden_states is None else encoder_hidden_states.shape[0]
            raise ValueError(f"NASA/NAG joint attention expects 2·{b} text rows (positive and negative stream), got "
                             f"{rows}: run the transformer with the hooks of `apply_qwenimage_guidance` installed.")
        head_dim = attn.inner_dim // attn.heads
        q, k, v = (f(hidden_states).unflatten(-1, (-1, head_dim))
                   for f in (attn.to_q, attn.to_k, attn.to_v))  # [B, N, H, D]
        eq, ek, ev = (f(encoder_hidden_states).unflatten(-1, (-1, head_dim))
                      for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))  # [2B, T, H, D]
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if attn.norm_added_q is not None:
            eq = attn.norm_added_q(eq)
        if attn.norm_added_k is not None:
            ek = attn.norm_added_k(ek)
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb  # txt_freqs [T, D/2]: positions by index, shared by both streams
            q, k = (apply_rotary_emb_qwen(x, img_freqs, use_real=False) for x in (q, k))
            eq, ek = (apply_rotary_emb_qwen(x, txt_freqs, use_real=False) for x in (eq, ek))
        q, k, v, eq, ek, ev = (x.transpose(1, 2) for x in (q, k, v, eq, ek, ev))
        mask = None if encoder_hidden_states_mask is None else encoder_hidden_states_mask.bool()
        m_pos, m_neg = (None, None) if mask is None else (mask[:b], mask[b:])
        z_pos, z_neg = image_attention_pair(q, k, v, ek[:b], ev[:b], ek[b:], ev[b:], mask_pos=m_pos,
                                            mask_neg=m_neg)
        image = self.guidance.combine(merge_heads(z_pos, q.dtype), merge_heads(z_neg, q.dtype))
        image = attn.to_out[0](image.contiguous())
        if len(attn.to_out) > 1:  # dropout
            image = attn.to_out[1](image)
        text = merge_heads(text_attention_rows(eq, ek, ev, k, v, mask), q.dtype)
        return image, attn.to_add_out(text.contiguous())


def _key_mask(mask, rows: int, length: int, padded: int, device) -> torch.Tensor:
    """A stream's text mask [rows, padded] bool: `mask` (or all True over `length`), False over the padding."""
    keep = torch.ones(rows, length, dtype=torch.bool, device=device) if mask is None else mask.to(device).bool()
    return F.pad(keep, (0, padded - length), value=False)


def _check_mask(prompt_embeds, mask) -> torch.Tensor | None:
    """The negative mask as bool [B, T−] (None stays None); ValueError naming `prompt_embeds_mask` otherwise."""
    if mask is None:
        return None
    shape = tuple(prompt_embeds.shape[:2])
    if not torch.is_tensor(mask) or tuple(mask.shape) != shape:
        raise ValueError(f"negative `prompt_embeds_mask` must be [B, T] = {list(shape)} like `prompt_embeds`, got "
                         f"{tuple(getattr(mask, 'shape', ())) or type(mask).__name__}.")
    if mask.is_meta:  # meta tensors (counting multiply-adds) hold no values
        return mask.bool()
    if mask.dtype != torch.bool:
        odd = mask[(mask != 0) & (mask != 1)]
        if odd.numel():
            raise ValueError(f"negative `prompt_embeds_mask` must hold 1 (attend) and 0 (padding), as "
                             f"`QwenImagePipeline.encode_prompt` returns it; got the value {odd.flatten()[0].item()} "
                             f"(an additive mask?).")
        mask = mask != 0
    empty = (~mask.any(dim=1)).nonzero().flatten()
    if empty.numel():
        raise ValueError(f"negative `prompt_embeds_mask` masks every token of row {empty[0].item()}: a negative prompt "
                         f"needs at least one token (1 = attend, 0 = padding).")
    return mask


class QwenImageGuidanceHandle(JointGuidanceHandle):
    """NASA/NAG installed on a QwenImageTransformer2DModel: `set_negative(prompt_embeds, prompt_embeds_mask)` before
    running it, `remove()` afterwards (restores the processors, removes every hook). Also a context manager; the
    interface of `nasa_joint.JointGuidanceHandle` (Qwen-Image has dual-stream blocks only, so there is no
    `construction` to choose: the image stream is single throughout).

    `installed` is False for guidance that is off (nothing was installed) and after `remove()`. The processors run
    SDPA / the shared-key kernel, not a backend chosen with diffusers' `set_attention_backend`."""

    def __init__(self, model, guidance: nasa.NegativeGuidance):
        super().__init__(model, guidance, "official")  # dual-stream only: one construction

    def _check(self, model, construction: str) -> None:
        cls = type(model).__name__
        if cls not in SUPPORTED:
            raise ValueError(f"NASA/NAG for Qwen-Image supports {', '.join(SUPPORTED)}; got {cls}.")
        if apply_rotary_emb_qwen is None:  # pragma: no cover
            raise ValueError("NASA/NAG for Qwen-Image needs diffusers with QwenImageTransformer2DModel.")

    def _install(self):
        model = self.model
        original = dict(model.attn_processors)
        for name, proc in original.items():
            if type(proc).__name__ != STOCK_PROCESSOR:
                raise ValueError(f"NASA/NAG joint attention replaces {STOCK_PROCESSOR}; {name} has "
                                 f"{type(proc).__name__} (remove other attention patches first).")
        self.original = original
        model.set_attn_processor({name: QwenJointGuidanceProcessor(self.guidance) for name in original})
        hooks = [model.register_forward_pre_hook(self._two_text_streams, with_kwargs=True)]
        hooks += [block.txt_mod.register_forward_hook(self._text_modulation_rows)
                  for block in model.transformer_blocks]
        self._hooks = hooks

    def set_negative(self, prompt_embeds: torch.Tensor, prompt_embeds_mask: torch.Tensor | None = None):
        """The negative prompt's encoder outputs as `QwenImagePipeline.encode_prompt` returns them: `prompt_embeds`
        [1 or B, T−, C] (any T−: each stream keeps its own length) and `prompt_embeds_mask` [same batch, T−]
        (1 = token, 0 = padding; None = no padding, what encode_prompt returns for one prompt).

        Rejected embeddings remove the handle before the ValueError, so
        `apply_qwenimage_guidance(...).set_negative(...)` never leaves a patch behind that the caller holds no
        handle to."""
        try:
            if not torch.is_tensor(prompt_embeds) or prompt_embeds.ndim != 3 or not prompt_embeds.shape[1]:
                raise ValueError(f"negative `prompt_embeds` must be a [B, T ≥ 1, C] tensor, got "
                                 f"{tuple(getattr(prompt_embeds, 'shape', ())) or type(prompt_embeds).__name__}.")
            if not prompt_embeds.is_meta:
                finite.check_finite_tensor("prompt_embeds", prompt_embeds, "finite (negative prompt embeddings)")
            mask = _check_mask(prompt_embeds, prompt_embeds_mask)
        except ValueError:
            self.remove()
            raise
        self.context.set_negative(prompt_embeds, mask)
        return self

    # ---------------------------------------------------------------- hooks
    def _two_text_streams(self, module, args, kwargs):
        """Transformer pre-hook: text embeddings [pos; neg] (2B rows) padded to the longer stream, their masks
        likewise (None when neither stream is padded); timestep and image latents unchanged (B rows)."""
        neg, neg_mask = self.context.encoder_hidden_states, self.context.attention_mask
        if neg is None:
            raise ValueError("NASA/NAG joint attention: call `set_negative(prompt_embeds, prompt_embeds_mask)` before "
                             "running the transformer.")
        kw = call_arguments(module, args, kwargs)
        pos, pos_mask, b = kw.get("encoder_hidden_states"), kw.get("encoder_hidden_states_mask"), \
            kw["hidden_states"].shape[0]
        if pos is None or pos.shape[0] != b:
            raise ValueError(f"`encoder_hidden_states` has batch {None if pos is None else pos.shape[0]}, "
                             f"`hidden_states` {b}.")
        t_pos, t_neg = pos.shape[1], neg.shape[1]
        if pos_mask is not None and tuple(pos_mask.shape) != (b, t_pos):
            raise ValueError(f"`encoder_hidden_states_mask` must be [{b}, {t_pos}] like `encoder_hidden_states`, got "
                             f"{tuple(pos_mask.shape)}.")
        if neg.shape[2] != pos.shape[2]:
            raise ValueError(f"negative `prompt_embeds` has width {neg.shape[2]}, the positive {pos.shape[2]} (the "
                             f"text encoder's hidden size).")
        neg = negative_rows(neg, b, "prompt_embeds").to(pos)
        neg_mask = None if neg_mask is None else negative_rows(neg_mask, b, "prompt_embeds_mask")
        t = max(t_pos, t_neg)
        mask = None
        if pos_mask is not None or neg_mask is not None or t_pos != t_neg:
            mask = torch.cat([_key_mask(pos_mask, b, t_pos, t, pos.device), _key_mask(neg_mask, b, t_neg, t,
                                                                                       pos.device)])
        kw["encoder_hidden_states"] = torch.cat([F.pad(pos, (0, 0, 0, t - t_pos)), F.pad(neg, (0, 0, 0, t - t_neg))])
        kw["encoder_hidden_states_mask"] = mask
        self.state["batch"] = b
        return (), kw

    def _text_modulation_rows(self, module, args, output):
        """`txt_mod` post-hook: its [B, 6·dim] (temb from t alone) repeated for the 2B text rows [pos; neg]."""
        return torch.cat([output, output]) if output.shape[0] == self.state["batch"] else output


def apply_qwenimage_guidance(transformer, guidance: nasa.NegativeGuidance) -> QwenImageGuidanceHandle:
    """Install NASA/NAG on a QwenImageTransformer2DModel; returns the handle to feed
    (`set_negative(prompt_embeds, prompt_embeds_mask)`) and remove. Guidance that is off (NASA α = 0, NAG scale 1)
    installs nothing."""
    return QwenImageGuidanceHandle(transformer, guidance)
