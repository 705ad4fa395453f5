"""NASA / NAG on joint attention (FLUX.1): one image stream, two text streams.

A joint-attention DiT has no text cross-attention to patch: text and image tokens attend together. The negative
prompt therefore gets its own text stream through every block, while the image stream stays single (the official NAG
code's construction, ChenDarYen/Normalized-Attention-Guidance `src/transformer_flux.py`, `src/attention_flux_nag.py`):

- the transformer sees the text embeddings and the pooled embeddings of both prompts, stacked on the batch [pos; neg]
  (2B rows), the timestep doubled — so the negative text stream is modulated by its own pooled embedding —, and the
  image latents once (B rows);
- dual-stream blocks: the image AdaLN takes the positive rows of temb; in attention the image queries attend to
  [txt+, img] and [txt−, img] (Z+, Z−), their output is `NegativeGuidance.combine(Z+, Z−)`; each text stream attends
  to its own [txt, img] and keeps its output;
- single-stream blocks, `construction`:
  * "official": the image is tiled to 2B before the first single block; each row runs with its own temb, and in
    every attention the image part of both rows is replaced by combine(row+, row−). The two rows' image streams
    then drift apart (the negative row is modulated by the negative temb), so every attention is computed twice in
    full and the single blocks cost a second batch. This reproduces the official code.
  * "shared" (default): the image stream stays single here too. Each single block runs one row per sample,
    [txt+, txt−, img], with the positive temb for all tokens; txt± queries attend to [txt±, img], the image queries
    give (Z+, Z−) over [txt±, img] with the image keys scored once, and the image output is the mix.
    APPROXIMATION: the official code modulates the negative text tokens (and its negative image row) with the
    negative pooled temb in these blocks; here they share the positive temb. When both prompts have the same pooled
    embedding, or the model has no single blocks, "shared" equals "official".

The image queries' (Z+, Z−) come from `attention_kernels.prefix_dual_attention` (one pass over the
image keys, two softmax states for the two text prefixes; Triton where dispatch picks it, else its exact SDPA
reference).
Everything is installed with forward hooks and attention processors (no subclass, no copied diffusers code);
`remove()` restores both. Guidance that is off (NASA α = 0, NAG scale 1) installs nothing, so it is bit-identical.

NAG scale convention: `nag_scale` = φ + 1 as in the official code; the official FLUX processor takes the L2 norm of
the per-token ratio (`NegativeGuidance(nag_norm=2)`). NASA on FLUX applies SNOOPI eq. 9 (Z+ − α·Z−) at the same place;
SNOOPI publishes no FLUX α and the NAG paper reports NASA unstable on FLUX.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

from .. import attention_kernels
from ..core import finite, nasa
from .negative_context import NegativeContext, negative_rows

try:  # diffusers ≥ 0.35 keeps the projection helper and the rotary embedding here
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import _get_qkv_projections
except ImportError:  # pragma: no cover - older diffusers
    _get_qkv_projections = apply_rotary_emb = None

CONSTRUCTIONS = ("shared", "official")
SUPPORTED = ("FluxTransformer2DModel",)


def guidance_is_off(guidance: nasa.NegativeGuidance) -> bool:
    """NASA with α = 0 or NAG with scale 1: the plain model, nothing to install."""
    return guidance.alpha == 0.0 if guidance.mode == "nasa" else guidance.nag_scale == 1.0


# ---------------------------------------------------------------- attention over [txt±, img] (layout [B, H, L, D])
def image_attention_pair(q, k_img, v_img, k_pos, v_pos, k_neg, v_neg, mask_pos=None, mask_neg=None):
    """(Z+, Z−) of the image queries q [B, H, N, D] over [K_txt+; K_img] and [K_txt−; K_img] (each text prefix with
    its bool key mask [B, T±], True = attend, or None), the image keys scored once: the shared-key kernel
    (`attention_kernels.prefix_dual_attention`, Triton where dispatch picks it, else its exact SDPA reference)."""
    return attention_kernels.prefix_dual_attention(q, k_img, v_img, k_pos, v_pos, k_neg, v_neg, mask_pos=mask_pos,
                                                   mask_neg=mask_neg)


def text_attention_rows(q_txt, k_txt, v_txt, k_img, v_img, mask=None):
    """Each text stream over its own [K_txt; K_img]: q/k/v_txt [2B, H, T, D] (rows [pos; neg]), image keys
    [B, H, N, D] shared by both streams, `mask` [2B, T] bool over the text keys (True = attend) or None. One SDPA
    call on 2B rows."""
    k = torch.cat([k_txt, k_img.repeat(2, 1, 1, 1)], dim=2)
    v = torch.cat([v_txt, v_img.repeat(2, 1, 1, 1)], dim=2)
    if mask is not None:
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], k_img.shape[2])], dim=1)[:, None, None, :]
    return F.scaled_dot_product_attention(q_txt, k, v, attn_mask=mask)


def merge_heads(z, dtype):  # [B, H, L, D] → [B, L, H·D]
    return z.transpose(1, 2).flatten(2, 3).to(dtype)


def _projections(attn, hidden_states, encoder_hidden_states=None):
    """q, k, v [B, L, H, D] with the QK norms (and e_q, e_k, e_v for the text stream where given), as
    FluxAttnProcessor computes them."""
    q, k, v, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
    q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in (q, k, v))
    q, k = attn.norm_q(q), attn.norm_k(k)
    if encoder_hidden_states is None:
        return q, k, v
    eq, ek, ev = (t.unflatten(-1, (-1, attn.head_dim)) for t in (eq, ek, ev))
    return q, k, v, attn.norm_added_q(eq), attn.norm_added_k(ek), ev


def rope_rows(x, freqs, start, stop):
    """RoPE on x [B, L, H, D] with rows [start:stop] of the (cos, sin) table, as FluxAttnProcessor applies it."""
    if freqs is None:
        return x
    return apply_rotary_emb(x, tuple(f[start:stop] for f in freqs), sequence_dim=1)


def refuse_mask(attention_mask):
    if attention_mask is not None:
        raise ValueError("NASA/NAG joint attention takes no `attention_mask` (FLUX uses none).")


# ---------------------------------------------------------------- processors
class FluxJointGuidanceProcessor:
    """Dual-stream block: image tokens [B, N] once, text streams [pos; neg] as 2B rows.

    Image q/k/v are projected once for B; the image queries give (Z+, Z−) against the two text prefixes with the
    image keys shared, and their output is `guidance.combine(Z+, Z−)` (NAG: heads merged before the norm, as the
    official code). Each text stream attends to its own [txt, img] and keeps its output."""

    def __init__(self, guidance: nasa.NegativeGuidance):
        self.guidance = guidance

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        refuse_mask(attention_mask)
        b, t = hidden_states.shape[0], encoder_hidden_states.shape[1]
        if encoder_hidden_states.shape[0] != 2 * b:
            raise ValueError(f"NASA/NAG joint attention expects 2·{b} text rows (positive and negative stream), got "
                             f"{encoder_hidden_states.shape[0]}: run the transformer with the hooks of "
                             f"`apply_joint_guidance` installed.")
        q, k, v, eq, ek, ev = _projections(attn, hidden_states, encoder_hidden_states)
        q, k = rope_rows(q, image_rotary_emb, t, None), rope_rows(k, image_rotary_emb, t, None)  # [B, N, H, D]
        eq, ek = rope_rows(eq, image_rotary_emb, 0, t), rope_rows(ek, image_rotary_emb, 0, t)  # [2B, T, H, D]
        q, k, v, eq, ek, ev = (x.transpose(1, 2) for x in (q, k, v, eq, ek, ev))
        z_pos, z_neg = image_attention_pair(q, k, v, ek[:b], ev[:b], ek[b:], ev[b:])
        image = self.guidance.combine(merge_heads(z_pos, q.dtype), merge_heads(z_neg, q.dtype))
        text = merge_heads(text_attention_rows(eq, ek, ev, k, v), q.dtype)
        image = attn.to_out[1](attn.to_out[0](image.contiguous()))
        return image, attn.to_add_out(text.contiguous())


class FluxOfficialSingleProcessor:
    """Single-stream block of the official construction: rows [pos; neg] each [txt, img] (2B rows, the image tiled
    before the first single block); full attention per row, then the image part of both rows is replaced by
    combine(row+, row−)."""

    def __init__(self, guidance: nasa.NegativeGuidance, state: dict):
        self.guidance, self.state = guidance, state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        refuse_mask(attention_mask)
        t, b = self.state["text_len"], hidden_states.shape[0] // 2
        q, k, v = _projections(attn, hidden_states)
        q, k = rope_rows(q, image_rotary_emb, 0, None), rope_rows(k, image_rotary_emb, 0, None)
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        z = F.scaled_dot_product_attention(q, k, v)  # [2B, H, T + N, D]: the image keys differ per row here
        mix = self.guidance.combine(merge_heads(z[:b, :, t:], q.dtype), merge_heads(z[b:, :, t:], q.dtype))
        text = merge_heads(z[:, :, :t], q.dtype)
        return torch.cat([text, torch.cat([mix, mix], dim=0)], dim=1)


class FluxSharedSingleProcessor:
    """Single-stream block of the shared construction: one row per sample, [txt+, txt−, img] (B rows); txt±
    queries over [txt±, img], image queries → (Z+, Z−) with the image keys scored once, image output = the mix."""

    def __init__(self, guidance: nasa.NegativeGuidance, state: dict):
        self.guidance, self.state = guidance, state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        refuse_mask(attention_mask)
        t, b = self.state["text_len"], hidden_states.shape[0]
        q, k, v = _projections(attn, hidden_states)  # [B, 2T + N, H, D]
        q, k = rope_rows(q, image_rotary_emb, 0, None), rope_rows(k, image_rotary_emb, 0, None)  # the extended table
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        (qp, qn, qi), (kp, kn, ki), (vp, vn, vi) = (x.split_with_sizes([t, t, x.shape[2] - 2 * t], dim=2)
                                                    for x in (q, k, v))
        z_pos, z_neg = image_attention_pair(qi, ki, vi, kp, vp, kn, vn)
        mix = self.guidance.combine(merge_heads(z_pos, q.dtype), merge_heads(z_neg, q.dtype))
        text = text_attention_rows(torch.cat([qp, qn]), torch.cat([kp, kn]), torch.cat([vp, vn]), ki, vi)
        return torch.cat([merge_heads(text[:b], q.dtype), merge_heads(text[b:], q.dtype), mix], dim=1)


def check_text_pair(pos, neg, batch: int, why: str) -> None:
    """The positive text embeddings have the image's batch, and the negative ones its tokens and width (`why`)."""
    if pos.shape[0] != batch:
        raise ValueError(f"`encoder_hidden_states` has batch {pos.shape[0]}, `hidden_states` {batch}.")
    if neg.shape[1:] != pos.shape[1:]:
        raise ValueError(f"negative `prompt_embeds` is {tuple(neg.shape[1:])} (tokens, width), the positive "
                         f"{tuple(pos.shape[1:])}: encode both with the same max_sequence_length ({why}).")


# ---------------------------------------------------------------- the handle
@functools.lru_cache(maxsize=None)
def forward_signature(forward) -> inspect.Signature:
    return inspect.signature(forward)


def call_arguments(module, args, kwargs) -> dict:
    """A module call's arguments by name (the class's `forward`: wrappers such as offload hooks hide it)."""
    arguments = forward_signature(type(module).forward).bind(module, *args, **kwargs).arguments
    arguments.pop(next(iter(arguments)))  # self
    return dict(arguments)


class JointGuidanceHandle:
    """NASA/NAG installed on a FluxTransformer2DModel: `set_negative(prompt_embeds, pooled_embeds)` before running
    it, `remove()` afterwards (restores the processors, removes every hook). Also a context manager.

    `installed` is False for guidance that is off (nothing was installed) and after `remove()`. The processors run
    SDPA / the shared-key kernel, not a backend chosen with diffusers' `set_attention_backend`."""

    def __init__(self, model, guidance: nasa.NegativeGuidance, construction: str = "shared"):
        """The same for every family's handle; `_check` (per family) refuses what the hooks cannot serve."""
        if not isinstance(guidance, nasa.NegativeGuidance):
            raise TypeError(f"`guidance` must be a core.nasa.NegativeGuidance, got {type(guidance).__name__}.")
        self._check(model, construction)
        self.model, self.guidance, self.construction = model, guidance, construction
        self.context = NegativeContext(guidance)
        self.pooled_embeds = None  # families without a pooled text embedding keep it None
        self.state = {"batch": None, "text_len": None, "rope": None}
        self._hooks, self.original = [], None
        self.installed = not guidance_is_off(guidance)
        if self.installed:
            self._install()

    def _check(self, model, construction: str) -> None:
        cls = type(model).__name__
        if cls not in SUPPORTED:
            raise ValueError(f"NASA/NAG joint attention supports {', '.join(SUPPORTED)}; got {cls}.")
        if construction not in CONSTRUCTIONS:
            raise ValueError(f"`construction` must be one of {CONSTRUCTIONS}, got {construction!r}.")
        if _get_qkv_projections is None:
            raise ValueError("NASA/NAG for FLUX needs diffusers ≥ 0.35.")

    # ---------------------------------------------------------------- installation
    def _install(self):
        model = self.model
        for name, proc in model.attn_processors.items():
            if not (type(proc).__name__.startswith("FluxAttnProcessor")):
                raise ValueError(f"NASA/NAG joint attention replaces FluxAttnProcessor; {name} has "
                                 f"{type(proc).__name__} (remove other attention patches first).")
        self.original = dict(model.attn_processors)
        single = (FluxSharedSingleProcessor if self.construction == "shared" else FluxOfficialSingleProcessor)
        procs = {}
        for name in self.original:
            if name.startswith("single_transformer_blocks."):
                procs[name] = single(self.guidance, self.state)
            else:
                procs[name] = FluxJointGuidanceProcessor(self.guidance)
        model.set_attn_processor(procs)
        hooks = [model.register_forward_pre_hook(self._two_text_streams, with_kwargs=True),
                 model.register_forward_hook(self._positive_rows, with_kwargs=True),
                 model.norm_out.register_forward_pre_hook(self._conditioning_rows("x", "conditioning_embedding"),
                                                          with_kwargs=True)]
        image_norm = self._conditioning_rows("x", "emb")  # the image AdaLN: temb rows of the image batch (B)
        hooks += [block.norm1.register_forward_pre_hook(image_norm, with_kwargs=True)
                  for block in model.transformer_blocks]
        blocks = list(model.single_transformer_blocks)
        if self.construction == "official" and blocks:
            hooks.append(blocks[0].register_forward_pre_hook(self._tile_image, with_kwargs=True))
        elif self.construction == "shared":
            for block in blocks:
                hooks.append(block.register_forward_pre_hook(self._one_row_two_texts, with_kwargs=True))
                hooks.append(block.register_forward_hook(self._two_text_rows, with_kwargs=True))
        self._hooks = hooks

    def set_negative(self, prompt_embeds: torch.Tensor, pooled_embeds: torch.Tensor | None = None):
        """The negative prompt's encoder outputs as the pipeline's `encode_prompt` returns them: `prompt_embeds`
        [1 or B, T, C] (same T as the positive: FLUX's text ids are shared) and `pooled_embeds` [same batch, P].

        `pooled_embeds=None` modulates the negative text stream with the positive pooled embedding (the earlier
        experimental route, kept for `apply_nasa`); the official NAG code gives the negative its own.
        Rejected embeddings remove the handle before the ValueError, so `apply_joint_guidance(...).set_negative(...)`
        never leaves a patch behind that the caller holds no handle to."""
        try:
            self._check_negative(prompt_embeds, pooled_embeds)
        except ValueError:
            self.remove()
            raise
        self.context.set_negative(prompt_embeds)
        self.pooled_embeds = pooled_embeds
        return self

    @staticmethod
    def _check_negative(prompt_embeds, pooled_embeds) -> None:
        if not torch.is_tensor(prompt_embeds) or prompt_embeds.ndim != 3:
            raise ValueError(f"negative `prompt_embeds` must be a [B, T, C] tensor, got "
                             f"{tuple(getattr(prompt_embeds, 'shape', ())) or type(prompt_embeds).__name__}.")
        if not prompt_embeds.is_meta:  # meta tensors (counting multiply-adds, bench/nasa.py) hold no values
            finite.check_finite_tensor("prompt_embeds", prompt_embeds, "finite (negative prompt embeddings)")
        if pooled_embeds is None:
            return
        if not torch.is_tensor(pooled_embeds) or pooled_embeds.ndim != 2 \
                or pooled_embeds.shape[0] != prompt_embeds.shape[0]:
            raise ValueError(f"negative `pooled_embeds` must be [{prompt_embeds.shape[0]}, P] like "
                             f"`prompt_embeds`' batch, got {tuple(getattr(pooled_embeds, 'shape', ()))}.")
        if not pooled_embeds.is_meta:
            finite.check_finite_tensor("pooled_embeds", pooled_embeds, "finite (negative pooled embeddings)")

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self.original is not None:
            self.model.set_attn_processor(dict(self.original))
            self.original = None
        self.installed = False
        self.context.set_negative(None)
        self.pooled_embeds = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    # ---------------------------------------------------------------- hooks
    def _two_text_streams(self, module, args, kwargs):
        """Transformer pre-hook (FLUX.1 and SD3): text and pooled embeddings [pos; neg] (2B rows), timestep/guidance
        doubled, the image latents unchanged (B rows)."""
        neg = self.context.encoder_hidden_states
        if neg is None:
            raise ValueError("NASA/NAG joint attention: call `set_negative(prompt_embeds, pooled_embeds)` before "
                             "running the transformer.")
        kw = call_arguments(module, args, kwargs)
        pos, pooled = kw["encoder_hidden_states"], kw["pooled_projections"]
        b = kw["hidden_states"].shape[0]
        check_text_pair(pos, neg, b, "the two text streams run as one batch; FLUX also shares the text ids")
        neg = negative_rows(neg, b, "prompt_embeds").to(pos)
        if self.pooled_embeds is None:
            neg_pooled = pooled
        else:
            if self.pooled_embeds.shape[1] != pooled.shape[1]:
                raise ValueError(f"negative `pooled_embeds` has width {self.pooled_embeds.shape[1]}, the positive "
                                 f"{pooled.shape[1]}.")
            neg_pooled = negative_rows(self.pooled_embeds, b, "pooled_embeds").to(pooled)
        kw["encoder_hidden_states"] = torch.cat([pos, neg])
        kw["pooled_projections"] = torch.cat([pooled, neg_pooled])
        for name in ("timestep", "guidance"):
            x = kw.get(name)
            if torch.is_tensor(x) and x.ndim and x.shape[0] == b:
                kw[name] = torch.cat([x, x])
        self.state.update(batch=b, text_len=pos.shape[1], rope=None)
        return (), kw

    def _positive_rows(self, module, args, kwargs, output):
        b = self.state["batch"]
        sample = output[0] if isinstance(output, tuple) else output.sample
        if sample.shape[0] != 2 * b:
            return output
        if isinstance(output, tuple):
            return (sample[:b],) + tuple(output[1:])
        output.sample = sample[:b]
        return output

    @staticmethod
    def _conditioning_rows(x_name: str, emb_name: str):
        """Pre-hook for an AdaLN whose input has fewer rows than temb: keep temb's first rows (the positive ones),
        as the official code's Trunc* norms."""

        def hook(module, args, kwargs):
            kw = call_arguments(module, args, kwargs)
            x, emb = kw[x_name], kw.get(emb_name)
            if emb is None or emb.shape[0] == x.shape[0]:
                return None
            kw[emb_name] = emb[: x.shape[0]]
            return (), kw

        return hook

    def _tile_image(self, block, args, kwargs):
        """Official construction, before the first single block: the image stream tiled to [img; img] (2B)."""
        kw = call_arguments(block, args, kwargs)
        img = kw["hidden_states"]
        if 2 * img.shape[0] == kw["encoder_hidden_states"].shape[0]:
            kw["hidden_states"] = torch.cat([img, img])
        return (), kw

    def _one_row_two_texts(self, block, args, kwargs):
        """Shared construction, before each single block: text [pos; neg] (2B × T) → [txt+, txt−] (B × 2T), the
        positive temb for all tokens, the rotary table extended by the text positions for the second copy."""
        kw = call_arguments(block, args, kwargs)
        txt, b, t = kw["encoder_hidden_states"], self.state["batch"], self.state["text_len"]
        kw["encoder_hidden_states"] = torch.cat([txt[:b], txt[b:]], dim=1)
        kw["temb"] = kw["temb"][:b]
        freqs = kw.get("image_rotary_emb")
        if freqs is not None:
            if self.state["rope"] is None:  # once per forward: every single block gets the same table
                self.state["rope"] = tuple(torch.cat([f[:t], f[:t], f[t:]]) for f in freqs)
            kw["image_rotary_emb"] = self.state["rope"]
        return (), kw

    def _two_text_rows(self, block, args, kwargs, output):
        txt, img = output
        t = self.state["text_len"]
        return torch.cat([txt[:, :t], txt[:, t:]]), img


def apply_joint_guidance(transformer, guidance: nasa.NegativeGuidance,
                         construction: str = "shared") -> JointGuidanceHandle:
    """Install NASA/NAG on a joint-attention transformer (FLUX.1); returns the handle to feed (`set_negative`) and
    remove. `construction`: "shared" (default; one image stream in the single blocks too, ≈ 1.1× the plain step
    with the shared-key kernel) or "official" (the official NAG code's single blocks, a second batch there)."""
    return JointGuidanceHandle(transformer, guidance, construction)


class JointNASAHandle(JointGuidanceHandle):
    """`nasa_processor.apply_nasa(flux_transformer, ...)`: the shared construction with the cross-attention API
    (`set_negative(encoder_hidden_states, attention_mask=None)`); without a negative pooled embedding the negative
    text stream is modulated by the positive one. Use `apply_joint_guidance` for the official NAG route."""

    def __init__(self, model, context: NegativeContext):
        super().__init__(model, context.guidance)

    def set_negative(self, encoder_hidden_states, attention_mask=None, pooled_embeds=None) -> "JointNASAHandle":
        if attention_mask is not None:
            self.remove()  # as any rejected negative: nothing left installed
            raise ValueError("NASA/NAG for FLUX takes no negative `attention_mask` (FLUX uses none).")
        return super().set_negative(encoder_hidden_states, pooled_embeds)
