"""EXPERIMENTAL: NASA / NAG for joint-attention MM-DiTs (FLUX.1), where text and image tokens share one attention.

There is no separate text cross-attention to patch, so the negative prompt needs its own text stream through every
block (SNOOPI claims NASA applies to Flux but publishes no code or scale; the NAG paper reports NASA unstable there).
Route, with hooks and processors only: a forward pre-hook doubles the batch — rows [:B] carry the positive prompt,
rows [B:] the negative one, both with the *same* image tokens, timestep and pooled (positive) embedding. In every
joint attention the image tokens' output becomes `combine(Z+_img, Z−_img)` in both rows, so the two rows' image
streams stay identical while each text stream evolves with its own prompt; a forward hook returns rows [:B]. The cost
is close to CFG's (the doubled batch); the gain over CFG is that the guidance acts inside attention, with no scale
on the final prediction.
"""

from __future__ import annotations

import inspect
import warnings

import torch
import torch.nn.functional as F

from .negative_context import NegativeContext

try:  # diffusers ≥ 0.35 keeps the projection helper and rotary embedding here
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import _get_qkv_projections
except ImportError:  # pragma: no cover - older diffusers
    _get_qkv_projections = apply_rotary_emb = None


class JointNASAProcessor:
    """FluxAttnProcessor's computation with the image tokens' attention output replaced by the NASA/NAG mix."""

    def __init__(self, context: NegativeContext, state: dict):
        self.context, self.state = context, state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        query, key, value, e_query, e_key, e_value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            e_query, e_key, e_value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (e_query, e_key, e_value))
            e_query, e_key = attn.norm_added_q(e_query), attn.norm_added_k(e_key)
            query, key, value = (torch.cat([a, b], dim=1) for a, b in ((e_query, query), (e_key, key),
                                                                         (e_value, value)))
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                             attn_mask=attention_mask).transpose(1, 2)  # [2B, T+N, H, D]
        out = out.flatten(2, 3).to(query.dtype)

        text_len = self.state["text_len"]
        b = out.shape[0] // 2
        img = out[:, text_len:]
        mixed = self.context.combine(img[:b], img[b:])  # Z+ vs Z− for the image tokens (eq. 9 / NAG eqs. 7–10)
        out = torch.cat([out[:, :text_len], torch.cat([mixed, mixed], dim=0)], dim=1)

        if encoder_hidden_states is None:  # single-stream block: its proj_out follows outside the attention
            return out
        text, image = out[:, :text_len], out[:, text_len:]
        image = attn.to_out[1](attn.to_out[0](image.contiguous()))
        return image, attn.to_add_out(text.contiguous())


class JointNASAHandle:
    """Installed experimental NASA/NAG on a FluxTransformer2DModel; `remove()` restores processors and hooks."""

    def __init__(self, model, context: NegativeContext):
        if _get_qkv_projections is None:
            raise ValueError("NASA/NAG for FLUX needs diffusers ≥ 0.35.")
        warnings.warn("NASA/NAG on FLUX is experimental: the NAG paper reports NASA unstable on Flux; start with "
                      "small strengths.", stacklevel=3)
        self.model, self.context, self.state = model, context, {"text_len": None}
        self.original = dict(model.attn_processors)
        model.set_attn_processor({n: JointNASAProcessor(context, self.state) for n in self.original})
        self.names = sorted(self.original)
        self._hooks = [model.register_forward_pre_hook(self._double, with_kwargs=True),
                       model.register_forward_hook(self._first_half, with_kwargs=True)]
        self._batch = None

    def set_negative(self, encoder_hidden_states, attention_mask=None) -> "JointNASAHandle":
        """The negative prompt's T5 embeddings, same length as the positive ones (they share `txt_ids`)."""
        if attention_mask is not None:
            raise ValueError("NASA/NAG for FLUX takes no negative attention mask (Flux uses none).")
        self.context.set_negative(encoder_hidden_states)
        return self

    def _double(self, module, args, kwargs):
        neg = self.context.encoder_hidden_states
        if neg is None:
            raise ValueError("NASA/NAG for FLUX: call `set_negative(...)` before running the transformer.")
        kwargs = dict(inspect.signature(module.forward).bind(*args, **kwargs).arguments)
        pos = kwargs["encoder_hidden_states"]
        if neg.shape[1] != pos.shape[1]:
            raise ValueError(f"NASA/NAG for FLUX: the negative prompt has {neg.shape[1]} tokens and the positive "
                             f"{pos.shape[1]}; encode both with the same max_sequence_length.")
        b = pos.shape[0]
        if b % neg.shape[0]:
            raise ValueError(f"negative prompt batch {neg.shape[0]} does not divide the model batch {b}.")
        self._batch, self.state["text_len"] = b, pos.shape[1]
        neg = neg.to(pos).repeat_interleave(b // neg.shape[0], dim=0)
        for name in ("hidden_states", "pooled_projections", "timestep", "guidance"):
            if kwargs.get(name) is not None:
                kwargs[name] = torch.cat([kwargs[name], kwargs[name]], dim=0)
        kwargs["encoder_hidden_states"] = torch.cat([pos, neg], dim=0)
        return (), kwargs

    def _first_half(self, module, args, kwargs, output):
        b = self._batch
        if isinstance(output, tuple):
            return (output[0][:b],) + tuple(output[1:])
        output.sample = output.sample[:b]
        return output

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self.model.set_attn_processor(dict(self.original))
        self.context.set_negative(None)
