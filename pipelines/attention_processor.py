"""`SwiftStepAttnProcessor`: diffusers' AttnProcessor2_0, step for step, with the attention itself from
`swiftstep.attention_kernels` (Triton where dispatch picks it, exact SDPA elsewhere). Install with
`apply_swiftstep_attention(model)`; `remove()` restores the original processor objects."""

from __future__ import annotations

import torch

from .. import attention_kernels


class SwiftStepAttnProcessor:
    """Self- or cross-attention for diffusers `Attention` modules; subclasses change only `attend`."""

    def __init__(self, qk_norm_before_heads: bool = False, backend: str | None = None,
                 self_attention_8bit: str | None = None):
        self.qk_norm_before_heads = qk_norm_before_heads  # SanaAttnProcessor2_0 normalises q/k before the split
        self.backend = backend
        self.self_attention_8bit = self_attention_8bit  # None, "int8" or "e4m3" (opt-in, see attention_kernels.attention_8bit)
        self._is_self = False

    @staticmethod
    def _heads(attn, x, batch, head_dim):
        return x.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

    @staticmethod
    def _merge(attn, z, dtype):
        return z.transpose(1, 2).reshape(z.shape[0], -1, attn.heads * z.shape[-1]).to(dtype)

    def attend(self, attn, query, key, value, attention_mask) -> torch.Tensor:
        """[B, H, L, D] q/k/v → [B, L, H·D], before the output projection."""
        if self.self_attention_8bit and self._is_self and attention_mask is None:
            z = attention_kernels.attention_8bit(query, key, value, qk_format=self.self_attention_8bit, backend=self.backend)
        else:
            z = attention_kernels.attention(query, key, value, mask=attention_mask, backend=self.backend)
        return self._merge(attn, z, query.dtype)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)  # SNOOPI eqs. 7–8 share W_q: Q is projected once
        self._is_self = encoder_hidden_states is None
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        if self.qk_norm_before_heads:
            if attn.norm_q is not None:
                query = attn.norm_q(query)
            if attn.norm_k is not None:
                key = attn.norm_k(key)
        head_dim = key.shape[-1] // attn.heads
        query = self._heads(attn, query, batch_size, head_dim)
        key, value = self._heads(attn, key, batch_size, head_dim), self._heads(attn, value, batch_size, head_dim)
        if not self.qk_norm_before_heads:
            if attn.norm_q is not None:
                query = attn.norm_q(query)
            if attn.norm_k is not None:
                key = attn.norm_k(key)

        hidden_states = self.attend(attn, query, key, value, attention_mask)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


REPLACEABLE = ("AttnProcessor2_0", "SanaAttnProcessor2_0", "AttnProcessor")


class AttentionHandle:
    def __init__(self, model, backend: str | None = None, self_attention_8bit: str | None = None):
        if self_attention_8bit not in (None, "int8", "e4m3"):
            raise ValueError(f"`self_attention_8bit` must be None, 'int8' or 'e4m3', got {self_attention_8bit!r}.")
        self.model = model
        self.original = dict(model.attn_processors)
        patched = {n: SwiftStepAttnProcessor(type(p).__name__ == "SanaAttnProcessor2_0", backend, self_attention_8bit)
                   for n, p in self.original.items() if type(p).__name__ in REPLACEABLE}
        if not patched:
            kinds = sorted({type(p).__name__ for p in self.original.values()})
            raise ValueError(f"{type(model).__name__} has no standard attention processors to route through the "
                             f"kernels (found {kinds}; replaceable: {REPLACEABLE}).")
        self.names = sorted(patched)
        model.set_attn_processor({n: patched.get(n, p) for n, p in self.original.items()})

    def remove(self) -> None:
        self.model.set_attn_processor(dict(self.original))


def apply_swiftstep_attention(model, backend: str | None = None,
                              self_attention_8bit: str | None = None) -> AttentionHandle:
    """Route every standard attention of `model` (UNet, PixArt, SANA cross-attention) through `swiftstep.attention_kernels`.
    `self_attention_8bit="int8"` (or "e4m3") runs unmasked self-attention through the opt-in 8-bit kernel where the
    GPU has e4m3 MMA (sm89+), exact SDPA elsewhere."""
    return AttentionHandle(model, backend, self_attention_8bit)
