"""NASA / NAG on Z-Image (ZImageTransformer2DModel, single-stream S3-DiT): one image stream, two caption streams.

Z-Image-Turbo runs without CFG, so its stock negative prompt does nothing. Here the negative prompt gets its own
caption stream, the construction `nasa_joint.py` uses for FLUX.1 ("shared"), which is exact on Z-Image:

- the negative caption (the Qwen3 hidden states `ZImagePipeline.encode_prompt` returns, its own length) goes through
  `cap_embedder` and the `context_refiner` as the positive one does, with its own RoPE positions 1…L− (the context
  refiner has no timestep modulation, so nothing of the image or t reaches it);
- each main layer runs per sample on [img, cap+, cap−]: the stock unified sequence [img, cap+] (its batch padding
  masked) with the negative captions appended (theirs masked too). Image queries give Z+ over [img; cap+] and Z− over
  [img; cap−] (`attention_kernels.prefix_dual_attention`, the image keys scored once), and their output is
  `NegativeGuidance.combine(Z+, Z−)`; cap+ queries attend to [img, cap+] (as in the stock layer), cap− to
  [img, cap−];
- after the last main layer the cap− tokens are dropped: the final layer and unpatchify see the stock layout.

Z-Image's adaLN takes t only (no pooled text embedding), so the one temb modulates every token of the row, cap−
included, as it would in the negative prompt's own forward: unlike FLUX's "shared" construction nothing is
approximated. What the construction chooses: the image keeps the positive caption's RoPE offset (its first axis
starts after the positive caption) and the cap− tokens keep the positions of their own forward.

Installed with hooks and processors only, no diffusers code copied and no subclass. `_build_unified_sequence` is a
method, not a module, so the layers are hooked around it: a pre-hook on every main layer appends the negative
captions (layer 0) and hands each layer the extended mask and RoPE table (the forward passes its own [img, cap+]
ones to every layer), a post-hook on the last layer drops them. The negative captions are refined by the model's own
forward, called from the transformer's pre-hook on one dummy latent patch per negative and stopped right after the
context refiner (a capture hook raises): the caption padding, pad token and RoPE positions stay diffusers'. The noise
refiner records the image token count. `remove()` restores the processors and removes every hook; guidance that is
off (NASA α = 0, NAG scale 1) installs nothing, so it is bit-identical.

NAG: use `NegativeGuidance(nag_norm=2)` as the official joint-attention code (no official Z-Image NAG exists; the
FLUX.1 settings of `pipeline_distilled_dit.FLUX_NAG` are the closest published ones). NASA applies SNOOPI eq. 9
(Z+ − α·Z−) at the same place; SNOOPI publishes no Z-Image α.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core import finite, nasa
from .nasa_joint import call_arguments, forward_signature, guidance_is_off, image_attention_pair, merge_heads

try:  # the Lumina-style complex RoPE Z-Image's processor applies (use_real=False)
    from diffusers.models.embeddings import apply_rotary_emb
except ImportError:  # pragma: no cover - older diffusers
    apply_rotary_emb = None

SUPPORTED = ("ZImageTransformer2DModel",)
STOCK_PROCESSOR = "ZSingleStreamAttnProcessor"


def _sdpa_keys(mask):  # bool key mask [B, L] → SDPA's [B, 1, 1, L]; None stays None
    return None if mask is None else mask[:, None, None, :]


class ZImageJointGuidanceProcessor:
    """A main layer's attention on [img, cap+, cap−] per sample (lengths from the handle's `state`; `attention_mask`
    [B, S] bool, True = attend, or None; `freqs_cis` [B, S, D/2] complex, as the stock processor takes them)."""

    def __init__(self, guidance: nasa.NegativeGuidance, state: dict):
        self.guidance, self.state = guidance, state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        n, s = self.state.get("image_len"), self.state.get("unified_len")
        if n is None or s is None or hidden_states.shape[1] <= s:
            raise ValueError("NASA/NAG on Z-Image: this layer got the stock [img, cap] sequence; run the transformer "
                             "with the hooks of `apply_zimage_guidance` installed.")
        q, k, v = (f(hidden_states).unflatten(-1, (attn.heads, -1)) for f in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if freqs_cis is not None:
            q, k = apply_rotary_emb(q, freqs_cis, use_real=False), apply_rotary_emb(k, freqs_cis, use_real=False)
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, S, D]
        sizes = [n, s - n, q.shape[2] - s]
        (qi, qp, qn), (ki, kp, kn), (vi, vp, vn) = (x.split_with_sizes(sizes, dim=2) for x in (q, k, v))
        m_pos = m_neg = None
        if attention_mask is not None:
            _, m_pos, m_neg = attention_mask.bool().split_with_sizes(sizes, dim=1)  # the image is never padded
        z_pos, z_neg = image_attention_pair(qi, ki, vi, kp, vp, kn, vn, mask_pos=m_pos, mask_neg=m_neg)
        image = self.guidance.combine(merge_heads(z_pos, q.dtype), merge_heads(z_neg, q.dtype))
        # cap+ over [img, cap+]: the stock layer's own attention for these rows
        text_pos = F.scaled_dot_product_attention(qp, k[:, :, :s], v[:, :, :s],
                                                  attn_mask=_sdpa_keys(None if attention_mask is None
                                                                       else attention_mask[:, :s].bool()))
        m_img_neg = None if m_neg is None else torch.cat([m_neg.new_ones(m_neg.shape[0], n), m_neg], dim=1)
        text_neg = F.scaled_dot_product_attention(qn, torch.cat([ki, kn], 2), torch.cat([vi, vn], 2),
                                                  attn_mask=_sdpa_keys(m_img_neg))
        out = torch.cat([image, merge_heads(text_pos, q.dtype), merge_heads(text_neg, q.dtype)], dim=1)
        out = attn.to_out[0](out)
        if len(attn.to_out) > 1:  # dropout
            out = attn.to_out[1](out)
        return out


class _CaptionsRefined(Exception):
    """Raised by the capture hook once the context refiner has run: the rest of that forward is not needed."""


def _check_cap_feats(cap_feats, width: int) -> list[torch.Tensor]:
    """The negative prompt as a list of [L, C] tensors (one per prompt)."""
    if torch.is_tensor(cap_feats):
        if cap_feats.ndim not in (2, 3):
            raise ValueError(f"negative `cap_feats` must be a list of [L, {width}] tensors (as "
                             f"`ZImagePipeline.encode_prompt` returns), an [L, {width}] or a [B, L, {width}] tensor; "
                             f"got shape {tuple(cap_feats.shape)}.")
        cap_feats = [cap_feats] if cap_feats.ndim == 2 else list(cap_feats.unbind(0))
    if not isinstance(cap_feats, (list, tuple)) or not cap_feats:
        raise ValueError(f"negative `cap_feats` must be a non-empty list of [L, {width}] tensors, got "
                         f"{type(cap_feats).__name__}{'' if cap_feats else ' (empty)'}.")
    for i, c in enumerate(cap_feats):
        if not torch.is_tensor(c) or c.ndim != 2 or c.shape[0] == 0 or c.shape[1] != width:
            raise ValueError(f"negative `cap_feats[{i}]` must be [L ≥ 1, {width}] (the transformer's cap_feat_dim), "
                             f"got {tuple(getattr(c, 'shape', ())) or type(c).__name__}.")
        if not c.is_meta:  # meta tensors (counting multiply-adds) hold no values
            finite.check_finite_tensor(f"cap_feats[{i}]", c, "finite (negative prompt embeddings)")
    return list(cap_feats)


class ZImageGuidanceHandle:
    """NASA/NAG installed on a ZImageTransformer2DModel: `set_negative(cap_feats)` before running it, `remove()`
    afterwards (restores the processors, removes every hook). Also a context manager.

    `installed` is False for guidance that is off (nothing was installed) and after `remove()`. The processors run
    SDPA / the shared-key kernel, not a backend chosen with diffusers' `set_attention_backend`."""

    def __init__(self, model, guidance: nasa.NegativeGuidance):
        cls = type(model).__name__
        if cls not in SUPPORTED:
            raise ValueError(f"NASA/NAG for Z-Image supports {', '.join(SUPPORTED)}; got {cls}.")
        if not isinstance(guidance, nasa.NegativeGuidance):
            raise TypeError(f"`guidance` must be a core.nasa.NegativeGuidance, got {type(guidance).__name__}.")
        if apply_rotary_emb is None:  # pragma: no cover
            raise ValueError("NASA/NAG for Z-Image needs diffusers with ZImageTransformer2DModel (≥ 0.36).")
        if not (len(model.layers) and len(model.noise_refiner) and len(model.context_refiner)):
            raise ValueError("NASA/NAG for Z-Image needs main, noise-refiner and context-refiner layers; this model "
                             f"has {len(model.layers)}, {len(model.noise_refiner)} and {len(model.context_refiner)}.")
        self.model, self.guidance = model, guidance
        self.cap_feats = None
        self.state = {"encoding": False}
        self._hooks, self.original = [], None
        self.installed = not guidance_is_off(guidance)
        if self.installed:
            self._install()

    # ---------------------------------------------------------------- installation
    def _install(self):
        model = self.model
        for i, layer in enumerate(model.layers):
            name = type(layer.attention.processor).__name__
            if name != STOCK_PROCESSOR:
                raise ValueError(f"NASA/NAG for Z-Image replaces {STOCK_PROCESSOR}; layers.{i}.attention has {name} "
                                 f"(remove other attention patches first).")
        self.original = [layer.attention.processor for layer in model.layers]
        for layer in model.layers:
            layer.attention.set_processor(ZImageJointGuidanceProcessor(self.guidance, self.state))
        hooks = [model.register_forward_pre_hook(self._refine_negative, with_kwargs=True),
                 model.register_forward_hook(self._forget),
                 model.noise_refiner[0].register_forward_pre_hook(self._image_length, with_kwargs=True),
                 model.layers[-1].register_forward_hook(self._drop_negative)]
        hooks += [layer.register_forward_pre_hook(self._layer_inputs(first=i == 0), with_kwargs=True)
                  for i, layer in enumerate(model.layers)]
        self._hooks = hooks

    def set_negative(self, cap_feats) -> "ZImageGuidanceHandle":
        """The negative prompt's Qwen3 hidden states as `ZImagePipeline.encode_prompt` returns them: a list of
        [L, cap_feat_dim] tensors, one prompt (used for every sample) or one per sample, padding stripped (so each
        its own length); an [L, C] or [B, L, C] tensor is taken as that list.

        Rejected embeddings remove the handle before the ValueError, so `apply_zimage_guidance(...).set_negative(...)`
        never leaves a patch behind that the caller holds no handle to."""
        try:
            self.cap_feats = _check_cap_feats(cap_feats, self.model.config.cap_feat_dim)
        except ValueError:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self.original is not None:
            for layer, proc in zip(self.model.layers, self.original):
                layer.attention.set_processor(proc)
            self.original = None
        self.installed = False
        self.cap_feats = None
        self._forget()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    # ---------------------------------------------------------------- hooks
    def _refine_negative(self, module, args, kwargs):
        """Transformer pre-hook: the negative captions through cap_embedder and the context refiner, by the model's
        own forward on one dummy latent patch per negative, stopped after the context refiner."""
        if self.state["encoding"]:  # the nested call below
            return None
        if self.cap_feats is None:
            raise ValueError("NASA/NAG on Z-Image: call `set_negative(cap_feats)` before running the transformer.")
        kw = call_arguments(module, args, kwargs)
        x, caps = kw["x"], kw["cap_feats"]
        if isinstance(x[0], (list, tuple)):
            raise ValueError("NASA/NAG on Z-Image takes the basic mode's `x` (a list of latents), not the omni mode's "
                             "nested lists.")
        if kw.get("controlnet_block_samples") is not None:
            raise ValueError("NASA/NAG on Z-Image does not take `controlnet_block_samples` (its residuals are shaped "
                             "for the [img, cap] sequence).")
        b, negatives = len(x), self.cap_feats
        if len(negatives) not in (1, b):
            raise ValueError(f"negative `cap_feats` has {len(negatives)} prompts; expected 1 or one per sample ({b}).")
        negatives = [c.to(device=caps[0].device, dtype=caps[0].dtype) for c in negatives]
        passed = {k: kw[k] for k in ("patch_size", "f_patch_size", "joint_attention_kwargs") if k in kw}
        defaults = forward_signature(type(module).forward).parameters
        p, f = (passed.get(k, defaults[k].default) for k in ("patch_size", "f_patch_size"))
        dummy = [x[0].new_zeros(x[0].shape[0], f, p, p)] * len(negatives)  # 1 patch: the noise refiner runs on ~32
        captured = {}

        def capture(layer, layer_args, layer_kwargs, output):
            a = call_arguments(layer, layer_args, layer_kwargs)
            captured.update(feats=output, mask=a["attn_mask"], freqs=a["freqs_cis"])
            raise _CaptionsRefined

        hook = module.context_refiner[-1].register_forward_hook(capture, with_kwargs=True)
        self.state["encoding"] = True
        try:
            module(dummy, torch.zeros(len(negatives), device=x[0].device), negatives, **passed)
        except _CaptionsRefined:
            pass
        finally:
            hook.remove()
            self.state["encoding"] = False
        if not captured:  # pragma: no cover - a diffusers change that skips the context refiner
            raise RuntimeError("NASA/NAG on Z-Image: the context refiner did not run for the negative caption.")
        feats, mask, freqs = captured["feats"], captured["mask"], captured["freqs"]
        if len(negatives) == 1 and b > 1:
            feats, freqs = feats.expand(b, -1, -1), freqs.expand(b, -1, -1)
        self.state.update(negative=(feats, mask if mask is None else mask.expand(b, -1), freqs), image_len=None,
                          unified_len=None, mask=None, freqs=None)
        return None

    def _forget(self, *_):
        """After the forward: drop the per-call tensors (negative captions, extended mask and RoPE table)."""
        if not self.state["encoding"]:
            for key in ("negative", "image_len", "unified_len", "mask", "freqs"):
                self.state.pop(key, None)

    def _image_length(self, layer, args, kwargs):
        """noise_refiner[0] pre-hook: the image token count (patches padded to the model's multiple)."""
        if self.state["encoding"]:
            return None
        a = call_arguments(layer, args, kwargs)
        if a.get("attn_mask") is not None:
            raise ValueError("NASA/NAG on Z-Image needs latents of one size within a batch (`x`); got images with "
                             "different token counts.")
        self.state["image_len"] = a["x"].shape[1]

    def _layer_inputs(self, first: bool):
        """Main-layer pre-hook: layer 0 appends the negative captions to the unified [img, cap+] rows and builds the
        extended mask and RoPE table; every layer gets those (the forward hands each its [img, cap+] ones)."""

        def hook(layer, args, kwargs):
            a = call_arguments(layer, args, kwargs)
            if a.get("noise_mask") is not None:  # pragma: no cover - omni mode is rejected before
                raise ValueError("NASA/NAG on Z-Image does not take per-token noise masks (omni mode).")
            if first:
                x, feats = a["x"], self.state["negative"][0]
                self._extend(x, a["attn_mask"], a["freqs_cis"])
                a["x"] = torch.cat([x, feats.to(x)], dim=1)
            a["attn_mask"], a["freqs_cis"] = self.state["mask"], self.state["freqs"]
            return (), a

        return hook

    def _extend(self, x, mask_pos, freqs_pos):
        feats, mask_neg, freqs_neg = self.state["negative"]
        b, s, ln = x.shape[0], x.shape[1], feats.shape[1]
        mask = None
        if mask_pos is not None or mask_neg is not None:
            ones = torch.ones(b, 1, dtype=torch.bool, device=x.device)
            mask = torch.cat([ones.expand(b, s) if mask_pos is None else mask_pos.bool(),
                              ones.expand(b, ln) if mask_neg is None else mask_neg.to(x.device).bool()], dim=1)
        self.state.update(unified_len=s, mask=mask, freqs=torch.cat([freqs_pos, freqs_neg.to(freqs_pos)], dim=1))

    def _drop_negative(self, layer, args, output):
        return output[:, : self.state["unified_len"]]


def apply_zimage_guidance(transformer, guidance: nasa.NegativeGuidance) -> ZImageGuidanceHandle:
    """Install NASA/NAG on a ZImageTransformer2DModel; returns the handle to feed (`set_negative(cap_feats)`) and
    remove. Guidance that is off (NASA α = 0, NAG scale 1) installs nothing."""
    return ZImageGuidanceHandle(transformer, guidance)
