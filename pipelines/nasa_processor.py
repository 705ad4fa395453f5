"""NASA / NAG negative-prompt attention for diffusers models, installed as attention processors.

`apply_nasa(model, ...)` puts a `NASAAttnProcessor` on every *text cross-attention* (`attn2`) of a
UNet2DConditionModel (SD1.x, SD2.x, SDXL), PixArtTransformer2DModel or SanaTransformer2DModel and leaves every other
processor as it was. The negative context reaches the processors through a shared `NegativeContext` (a stateful
route: PixArt and SANA do not forward attention kwargs, and one route for every backbone keeps self-attention free of
foreign kwargs). `remove()` (or leaving the `nasa_attention(...)` block) puts the original processor objects back.

The positive branch repeats diffusers' own processor step by step (AttnProcessor2_0, or SanaAttnProcessor2_0 whose
q/k norm runs before the head split), so α = 0 reproduces the unpatched model bit for bit. The combination is
`core.nasa` / `core.nag`.
"""

from __future__ import annotations

import contextlib

import torch

from .. import attention_kernels
from ..core import nasa
from .attention_processor import SwiftStepAttnProcessor
from .negative_context import NegativeContext, negative_rows

SUPPORTED = ("UNet2DConditionModel", "PixArtTransformer2DModel", "SanaTransformer2DModel",
             "FluxTransformer2DModel (experimental)")
JOINT_ATTENTION = ("SD3Transformer2DModel", "QwenImageTransformer2DModel",
                   "HunyuanVideoTransformer3DModel", "WanTransformer3DModel", "AuraFlowTransformer2DModel")
MODES = nasa.MODES


class NASAAttnProcessor(SwiftStepAttnProcessor):
    """Text cross-attention with a negative branch: out = W_o·combine(Z+, Z−) (+ bias), Q projected once.

    The attention runs through `attention_kernels.dual_attention`: on CUDA the fused Triton kernel (one read of Q, both
    softmaxes in one pass, NASA's subtraction in its epilogue); elsewhere two SDPA calls."""

    def __init__(self, context: NegativeContext, qk_norm_before_heads: bool = False):
        super().__init__(qk_norm_before_heads=qk_norm_before_heads)
        self.context = context

    def _negative_kv(self, attn, batch, head_dim, dtype, device):
        ctx = self.context
        cached = ctx._kv.get(id(attn))
        if cached is not None and cached[0].shape[0] == batch and cached[0].dtype == dtype:
            return cached
        neg = negative_rows(ctx.encoder_hidden_states, batch, "prompt embeddings").to(device=device, dtype=dtype)
        if attn.norm_cross:  # Algorithm 1 normalises both contexts
            neg = attn.norm_encoder_hidden_states(neg)
        key, value = attn.to_k(neg), attn.to_v(neg)
        if self.qk_norm_before_heads and attn.norm_k is not None:
            key = attn.norm_k(key)
        key, value = self._heads(attn, key, batch, head_dim), self._heads(attn, value, batch, head_dim)
        if not self.qk_norm_before_heads and attn.norm_k is not None:
            key = attn.norm_k(key)  # the paper's pseudo-code forgets norm_k on the negative keys
        ctx._kv[id(attn)] = (key, value)
        return key, value

    def _negative_mask(self, attn, batch, dtype):
        mask = self.context.attention_mask
        if mask is None:
            return None
        mask = negative_rows(mask, batch, "attention mask").to(dtype)
        bias = ((1.0 - mask) * -10000.0).unsqueeze(1)  # [B, 1, L−], the additive form diffusers' models build
        bias = attn.prepare_attention_mask(bias, mask.shape[-1], batch)
        return bias.view(batch, attn.heads, -1, bias.shape[-1])

    def attend(self, attn, query, key, value, attention_mask):
        ctx = self.context
        if ctx.encoder_hidden_states is None:
            return super().attend(attn, query, key, value, attention_mask)
        batch, _, _, head_dim = query.shape
        k_neg, v_neg = self._negative_kv(attn, batch, head_dim, query.dtype, query.device)
        neg_mask = self._negative_mask(attn, batch, query.dtype)
        if ctx.mode == "nasa":  # eqs. 7–9, the subtraction fused into the attention epilogue
            z = attention_kernels.dual_attention(query, key, value, k_neg, v_neg, alpha=ctx.alpha, mask_pos=attention_mask,
                                       mask_neg=neg_mask)
            return self._merge(attn, z, query.dtype)
        z_pos, z_neg = attention_kernels.dual_attention(query, key, value, k_neg, v_neg, mask_pos=attention_mask,
                                              mask_neg=neg_mask)
        return ctx.combine(self._merge(attn, z_pos, query.dtype), self._merge(attn, z_neg, query.dtype))  # NAG


@torch.no_grad()
def project_context(model, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
    """What the model's blocks see of a text-encoder output: DiTs project (and normalise) captions before their
    blocks, so the negative must go through the same layers as the positive does inside `forward`."""
    param = next(model.parameters())
    x = encoder_hidden_states.to(device=param.device, dtype=param.dtype)
    cls = type(model).__name__
    if cls in ("PixArtTransformer2DModel", "SanaTransformer2DModel"):
        x = model.caption_projection(x)
        if getattr(model, "caption_norm", None) is not None:
            x = model.caption_norm(x)
    elif getattr(model, "encoder_hid_proj", None) is not None:
        if model.config.encoder_hid_dim_type != "text_proj":
            raise ValueError(f"NASA/NAG: {cls} with encoder_hid_dim_type={model.config.encoder_hid_dim_type!r} is "
                             f"not supported (only plain text conditioning).")
        x = model.encoder_hid_proj(x)
    return x


def text_cross_attention_names(model) -> list[str]:
    """Processor names of the text cross-attentions NASA patches; a clear error when the model has none."""
    cls = type(model).__name__
    if cls in JOINT_ATTENTION:
        raise ValueError(f"NASA/NAG do not support {cls} yet: it mixes text and image tokens in one joint attention "
                         f"(no separate text cross-attention to patch). Supported: {', '.join(SUPPORTED)}.")
    names = [n for n in getattr(model, "attn_processors", {}) if n.endswith("attn2.processor")]
    if not names:
        raise ValueError(f"{cls} has no text cross-attention layers (`attn2`) for NASA/NAG; supported models: "
                         f"{', '.join(SUPPORTED)}.")
    return names


class NASAHandle:
    """An installed NASA/NAG patch: `set_negative(...)` per call, `remove()` restores the original processors."""

    def __init__(self, model, context: NegativeContext):
        self.model, self.context = model, context
        names = text_cross_attention_names(model)
        self.original = dict(model.attn_processors)
        patched = {}
        for name in names:
            qk_before = type(self.original[name]).__name__ == "SanaAttnProcessor2_0"
            patched[name] = NASAAttnProcessor(context, qk_norm_before_heads=qk_before)
        self.names = sorted(patched)
        model.set_attn_processor({name: patched.get(name, proc) for name, proc in self.original.items()})

    def set_negative(self, encoder_hidden_states, attention_mask=None) -> "NASAHandle":
        """The negative prompt's text-encoder output, as the model's `encoder_hidden_states` input would be."""
        if encoder_hidden_states is not None:
            encoder_hidden_states = project_context(self.model, encoder_hidden_states)
        self.context.set_negative(encoder_hidden_states, attention_mask)
        return self

    def remove(self) -> None:
        self.model.set_attn_processor(dict(self.original))
        self.context.set_negative(None)


def make_context(mode: str = "nasa", alpha: float = 0.1, nag_scale: float = 3.0, nag_tau: float = 2.5,
                 nag_alpha: float = 0.5) -> NegativeContext:
    return NegativeContext(nasa.NegativeGuidance.checked(mode, alpha, nag_scale, nag_tau, nag_alpha))


def apply_guidance(model, guidance: nasa.NegativeGuidance) -> NASAHandle:
    """`apply_nasa` with settings already validated (`core.nasa.NegativeGuidance`), as the joint-attention routes take
    them: every text cross-attention of a UNet, PixArt or SANA model."""
    return NASAHandle(model, NegativeContext(guidance))


def apply_nasa(model, mode: str = "nasa", alpha: float = 0.1, nag_scale: float = 3.0, nag_tau: float = 2.5,
               nag_alpha: float = 0.5) -> NASAHandle:
    """Install NASA (or NAG) on every text cross-attention of `model`; returns the handle to feed and remove it.

    FluxTransformer2DModel gets the experimental joint-attention route (`nasa_joint`)."""
    context = make_context(mode, alpha, nag_scale, nag_tau, nag_alpha)
    if type(model).__name__ == "FluxTransformer2DModel":
        from .nasa_joint import JointNASAHandle

        return JointNASAHandle(model, context)
    return NASAHandle(model, context)


def remove_nasa(handle: NASAHandle) -> None:
    handle.remove()


@contextlib.contextmanager
def nasa_attention(model, negative_encoder_hidden_states, negative_attention_mask=None, **settings):
    """`with nasa_attention(pipe.unet, neg_embeds, alpha=0.2): pipe(...)` — patched inside, restored after."""
    handle = apply_nasa(model, **settings).set_negative(negative_encoder_hidden_states, negative_attention_mask)
    try:
        yield handle
    finally:
        handle.remove()
