"""NASA / NAG on SD3 / SD3.5 joint attention (MMDiT): one image stream, two text streams.

The FLUX.1 construction of `nasa_joint.py` on `SD3Transformer2DModel`, whose blocks are all dual-stream
(`JointTransformerBlock`, the last one `context_pre_only`: it updates no text):

- the transformer sees the text embeddings and the pooled embeddings of both prompts stacked on the batch [pos; neg]
  (2B rows) with the timestep doubled, so `time_text_embed` gives the negative text stream its own temb; the image
  latents run once (B rows), so the output has B rows as it is;
- every block's image AdaLN (`norm1`: `AdaLayerNormZero`, or `SD35AdaLayerNormZeroX` in SD3.5 dual-attention blocks)
  and `norm_out` take the first B rows of temb (the positive ones, as the official `Trunc*` norms); the context AdaLN
  takes all 2B;
- in the joint attention the image q/k/v are projected once; the image queries give (Z+, Z−) over [img, txt+] and
  [img, txt−] with the image keys scored once (`nasa_joint.image_attention_pair`: softmax over the union of keys, so
  SD3's [image, text] order and the kernel's [text, image] give the same result), and their output is
  `NegativeGuidance.combine(Z+, Z−)`; each text stream attends to its own [img, txt] and keeps its output — except
  in the `context_pre_only` block, whose text output the block discards, so it is not computed;
- SD3.5's second image attention (`attn2`, image tokens only, `use_dual_attention`) never sees the text: it keeps its
  processor and runs on the single image stream.

The official NAG code has two SD3.5 routes, both with the L1 per-token norm (`NegativeGuidance(nag_norm=1)`; its FLUX
code uses L2): ComfyUI-NAG's MMDiT patch (`sd3/mmdit.py`) gives the negative text stream its own pooled embedding
(`set_negative(embeds, pooled)`, as on FLUX), while the diffusers `NAGStableDiffusion3Pipeline` stacks the positive
pooled embedding twice (`set_negative(embeds)`, i.e. `pooled_embeds=None`). With CFG on as well (a 2B image batch)
each CFG row gets the NAG negative, where the official pipeline guides only the conditional row; the distilled SD3.5
presets run without CFG.
"""

from __future__ import annotations

import torch

from ..core import nasa
from .nasa_joint import (JointGuidanceHandle, image_attention_pair, merge_heads,
                         text_attention_rows)

SUPPORTED = ("SD3Transformer2DModel",)
# the image AdaLN of a JointTransformerBlock → the name of its input argument
IMAGE_NORMS = {"AdaLayerNormZero": "x", "SD35AdaLayerNormZeroX": "hidden_states"}


def _heads(attn, x):  # [R, L, H·D] → [R, H, L, D]
    return x.unflatten(-1, (attn.heads, -1)).transpose(1, 2)


class SD3JointGuidanceProcessor:
    """`JointAttnProcessor2_0` with the image tokens [B, N] once and the text streams [pos; neg] as 2B rows.

    Image q/k/v are projected once; the image queries give (Z+, Z−) against the two text streams with the image keys
    shared, and their output is `guidance.combine(Z+, Z−)` (NAG: heads merged before the norm, as the official
    code). Each text stream attends to its own [img, txt]; a `context_pre_only` layer returns no text output."""

    def __init__(self, guidance: nasa.NegativeGuidance):
        self.guidance = guidance

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        if attention_mask is not None:
            raise ValueError("NASA/NAG joint attention takes no `attention_mask` (SD3 uses none).")
        b = hidden_states.shape[0]
        if encoder_hidden_states is None or encoder_hidden_states.shape[0] != 2 * b:
            rows = None if encoder_hidden_states is None else encoder_hidden_states.shape[0]
            raise ValueError(f"NASA/NAG joint attention expects 2·{b} text rows (positive and negative stream), got "
                             f"{rows}: run the transformer with the hooks of `apply_sd3_guidance` installed.")
        q, k, v = (_heads(attn, f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v))  # [B, H, N, D]
        eq, ek, ev = (_heads(attn, f(encoder_hidden_states))
                      for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))  # [2B, H, T, D]
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        if attn.norm_added_q is not None:
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
        z_pos, z_neg = image_attention_pair(q, k, v, ek[:b], ev[:b], ek[b:], ev[b:])
        image = self.guidance.combine(merge_heads(z_pos, q.dtype), merge_heads(z_neg, q.dtype))
        image = attn.to_out[1](attn.to_out[0](image.contiguous()))
        if attn.context_pre_only:  # the last block drops the text stream: its queries are never needed
            return image, None
        text = merge_heads(text_attention_rows(eq, ek, ev, k, v), q.dtype)
        return image, attn.to_add_out(text.contiguous())


class SD3GuidanceHandle(JointGuidanceHandle):
    """NASA/NAG installed on an SD3Transformer2DModel: `set_negative(prompt_embeds, pooled_embeds)` before running
    it, `remove()` afterwards (restores the processors, removes every hook). Also a context manager; the interface of
    `nasa_joint.JointGuidanceHandle` (SD3 has no single-stream blocks, so there is no `construction` to choose: the
    image stream is single throughout, exactly as the official code computes it).

    `installed` is False for guidance that is off (nothing was installed) and after `remove()`. The processors run
    SDPA / the shared-key kernel, not a backend chosen with diffusers' `set_attention_backend`."""

    def __init__(self, model, guidance: nasa.NegativeGuidance):
        super().__init__(model, guidance, "official")  # every block dual-stream: one construction

    def _check(self, model, construction: str) -> None:
        cls = type(model).__name__
        if cls not in SUPPORTED:
            raise ValueError(f"NASA/NAG for SD3 supports {', '.join(SUPPORTED)}; got {cls} (FLUX.1: "
                             f"`nasa_joint.apply_joint_guidance`).")

    def _install(self):
        model = self.model
        original, joint = dict(model.attn_processors), {}
        for i, block in enumerate(model.transformer_blocks):
            name = f"transformer_blocks.{i}.attn.processor"
            proc = original.get(name)
            if type(proc).__name__ != "JointAttnProcessor2_0":
                raise ValueError(f"NASA/NAG joint attention replaces JointAttnProcessor2_0; {name} has "
                                 f"{type(proc).__name__} (unfuse QKV projections / remove other attention patches, "
                                 f"IP-Adapter included, first).")
            norm = type(block.norm1).__name__
            if norm not in IMAGE_NORMS:
                raise ValueError(f"NASA/NAG for SD3: transformer_blocks.{i}.norm1 is {norm}; expected one of "
                                 f"{tuple(IMAGE_NORMS)}.")
            joint[name] = SD3JointGuidanceProcessor(self.guidance)
        self.original = original
        model.set_attn_processor({**original, **joint})  # attn2 (SD3.5 image-only attention) keeps its own
        hooks = [model.register_forward_pre_hook(self._two_text_streams, with_kwargs=True),
                 model.norm_out.register_forward_pre_hook(self._conditioning_rows("x", "conditioning_embedding"),
                                                          with_kwargs=True)]
        hooks += [block.norm1.register_forward_pre_hook(
            self._conditioning_rows(IMAGE_NORMS[type(block.norm1).__name__], "emb"), with_kwargs=True)
            for block in model.transformer_blocks]
        self._hooks = hooks

    def set_negative(self, prompt_embeds: torch.Tensor, pooled_embeds: torch.Tensor | None = None):
        """The negative prompt's `encode_prompt` outputs: `prompt_embeds` [1 or B, T, C] (the positive's T: encode
        both with the same `max_sequence_length`) and `pooled_embeds` [same batch, P].

        `pooled_embeds=None` modulates the negative text stream with the positive pooled embedding, as the official
        diffusers SD3.5 NAG pipeline does; ComfyUI-NAG's SD3.5 patch (and the FLUX code) give the negative its own.
        Rejected embeddings remove the handle before the ValueError."""
        return super().set_negative(prompt_embeds, pooled_embeds)


def apply_sd3_guidance(transformer, guidance: nasa.NegativeGuidance) -> SD3GuidanceHandle:
    """Install NASA/NAG on an SD3/SD3.5 transformer; returns the handle to feed (`set_negative`) and remove. Off
    settings (NASA α = 0, NAG scale 1) install nothing."""
    return SD3GuidanceHandle(transformer, guidance)
