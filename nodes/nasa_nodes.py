"""SwiftStepNASA: a negative prompt for one-step models in ComfyUI, through NASA or NAG in every UNet attn2.

The patched MODEL is a clone with an `attn2` replace patch per transformer block; the combination is `core.nasa` /
`core.nag`, the attention ComfyUI's own `optimized_attention` for both branches (so α = 0 is the unpatched model).
PixArt gets per-clone object patches of its cross-attention; FLUX.1 and Z-Image (joint attention, no cross-attention)
get a model function wrapper and an attention override (`JointNegativeGuidance`, below).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from comfy_api.latest import io

from .. import attention_kernels
from ..core import nag, nasa

MODES = nasa.MODES


def attn2_locations(diffusion_model):
    """((block, number, transformer_index), attn2 module) for every UNet transformer block with cross-attention,
    keyed the way ComfyUI's UNet names them in `transformer_options["block"]`."""
    found = []
    for block, blocks in (("input", getattr(diffusion_model, "input_blocks", None)),
                          ("middle", [getattr(diffusion_model, "middle_block", None)]),
                          ("output", getattr(diffusion_model, "output_blocks", None))):
        for number, sub in enumerate(blocks or []):
            if sub is None:
                continue
            for module in sub.modules():
                for index, tb in enumerate(getattr(module, "transformer_blocks", []) or []):
                    if getattr(tb, "attn2", None) is not None:
                        found.append(((block, number, index), tb.attn2))
    return found


def cache_key(like: torch.Tensor, *modules) -> tuple:
    """Key of the cached negative K/V: device, dtype and the weights they came from. A LoRA or another patch applied
    to a clone later changes the weights (new storage or an in-place copy), and ComfyUI ≥ 0.33's `clone()` shares this
    patch object between clones, so K/V computed before must not be reused then. ComfyUI patches weights with new
    storage by default; in-place updates are seen through the version counter, which inference tensors (weights
    loaded under `torch.inference_mode`) do not have."""
    weights = tuple((p.data_ptr(), None if p.is_inference() else p._version)
                    for m in modules for p in m.parameters())
    return like.device, like.dtype, weights


class NASAAttn2Patch:
    """`attn2` replace patch: (q, k, v, extra_options) → combine(Z+, Z−), before ComfyUI applies `to_out`."""

    def __init__(self, attn2, negative: torch.Tensor, guidance: nasa.NegativeGuidance):
        self.attn2, self.negative, self.guidance = attn2, negative, guidance
        self._kv = {}  # cache_key → (K−, V−): the negative prompt is constant over the steps

    def cleanup(self) -> None:
        """ComfyUI ≥ 0.33 calls this after sampling: the cache is rebuilt on the next run."""
        self._kv = {}

    def negative_kv(self, like: torch.Tensor):
        key = cache_key(like, self.attn2.to_k, self.attn2.to_v)
        if key not in self._kv:
            neg = self.negative.to(device=like.device, dtype=like.dtype)
            with torch.no_grad():
                self._kv = {key: (self.attn2.to_k(neg), self.attn2.to_v(neg))}
        return self._kv[key]

    def _fused(self, q, k, v, k_neg, v_neg, heads):
        """The fused Triton dual kernel (Q read once, Z+ − α·Z− in its epilogue) where dispatch picks it, else None."""
        b, _, inner = q.shape
        d = inner // heads
        split = lambda t, n=b: t.view(n, -1, heads, d).transpose(1, 2)  # noqa: E731
        reps = b // k_neg.shape[0]
        qh, kh, vh = split(q), split(k), split(v)
        knh, vnh = (split(t.repeat_interleave(reps, 0)) for t in (k_neg, v_neg))
        if attention_kernels.select_path("dual", qh, (kh, vh, knh, vnh), (), max(kh.shape[2], knh.shape[2])) != "triton":
            return None
        z = attention_kernels.dual_attention(qh, kh, vh, knh, vnh, alpha=self.guidance.alpha, backend="triton")
        return z.transpose(1, 2).reshape(b, -1, inner)

    def __call__(self, q, k, v, extra_options):
        from comfy.ldm.modules.attention import optimized_attention

        heads = extra_options["n_heads"]
        kwargs = dict(attn_precision=extra_options.get("attn_precision"), transformer_options=extra_options)
        z_pos = optimized_attention(q, k, v, heads, **kwargs)  # what the unpatched layer computes
        # Only rows of positive conditioning (cond_or_uncond 0) get the negative branch; with cfg > 1 the
        # uncond rows stay as they are.
        chunks = extra_options.get("cond_or_uncond") or [0]
        rows = q.shape[0] // len(chunks)
        pos_rows = [i for c, kind in enumerate(chunks) if kind == 0 for i in range(c * rows, (c + 1) * rows)]
        if not pos_rows:
            return z_pos
        k_neg, v_neg = self.negative_kv(q)
        if self.guidance.mode == "nasa" and len(pos_rows) == q.shape[0] and q.shape[0] % k_neg.shape[0] == 0:
            fused = self._fused(q, k, v, k_neg, v_neg, heads)
            if fused is not None:
                return fused
        idx = torch.tensor(pos_rows, device=q.device)
        q_pos = q.index_select(0, idx)
        reps = len(pos_rows) // k_neg.shape[0] if len(pos_rows) % k_neg.shape[0] == 0 else None
        if reps is None:
            raise ValueError(f"SwiftStepNASA: input `negative` has batch {k_neg.shape[0]}, which does not divide "
                             f"the {len(pos_rows)} positive rows.")
        k_neg, v_neg = k_neg.repeat_interleave(reps, 0), v_neg.repeat_interleave(reps, 0)
        z_neg = optimized_attention(q_pos, k_neg, v_neg, heads, **kwargs)
        z_sel = z_pos.index_select(0, idx)
        return z_pos.index_copy(0, idx, self.guidance.combine(z_sel, z_neg))


class PixArtCrossAttnForward:
    """Object patch for ComfyUI's PixArt `MultiHeadCrossAttention.forward` (DiTs have no attn2 replace hook):
    the same positive attention, plus the negative branch through the block's own `kv_linear`."""

    def __init__(self, module, y_proj, negative: torch.Tensor, combine):
        self.module, self.y_proj, self.negative, self.combine = module, y_proj, negative, combine
        self._kv = {}

    def cleanup(self) -> None:
        self._kv = {}

    def __call__(self, x, cond, mask=None):
        from comfy.ldm.modules.attention import optimized_attention

        m = self.module
        B, N, C = x.shape
        q = m.q_linear(x).view(1, -1, m.num_heads, m.head_dim)
        k, v = m.kv_linear(cond).view(1, -1, 2, m.num_heads, m.head_dim).unbind(2)
        q = q.view(B, -1, C)
        z_pos = optimized_attention(q, k.view(B, -1, C), v.view(B, -1, C), m.num_heads, mask=None)
        key = cache_key(x, self.y_proj, m.kv_linear)
        if key not in self._kv:
            with torch.no_grad():
                neg = self.y_proj(self.negative.to(device=x.device, dtype=x.dtype))  # the model's caption MLP
                k_neg, v_neg = m.kv_linear(neg).view(neg.shape[0], -1, 2, C).unbind(2)
            self._kv = {key: (k_neg, v_neg)}
        k_neg, v_neg = self._kv[key]
        if B % k_neg.shape[0]:
            raise ValueError(f"SwiftStepNASA: input `negative` has batch {k_neg.shape[0]}, which does not divide "
                             f"the batch {B}.")
        reps = B // k_neg.shape[0]
        z_neg = optimized_attention(q, k_neg.repeat_interleave(reps, 0), v_neg.repeat_interleave(reps, 0),
                                    m.num_heads, mask=None)
        return m.proj_drop(m.proj(self.combine(z_pos, z_neg)))


def pixart_cross_attentions(diffusion_model):
    """(object-patch name, module) of every PixArt cross-attention in a ComfyUI PixArt model, else []."""
    if getattr(diffusion_model, "y_embedder", None) is None:
        return []
    return [(f"diffusion_model.blocks.{i}.cross_attn.forward", block.cross_attn)
            for i, block in enumerate(getattr(diffusion_model, "blocks", []))
            if hasattr(getattr(block, "cross_attn", None), "kv_linear")]


# ---------------------------------------------------------------- joint-attention DiTs: FLUX.1 and Z-Image
# A joint-attention DiT has no text cross-attention: text and image tokens attend together. The negative prompt gets
# its own text stream: the positive and the negative text run as two batch rows of ONE model call at cfg 1, and inside
# every joint attention the image tokens' output of both rows is replaced by combine(Z+, Z−), so the two rows' image
# streams stay identical (the official NAG code's construction: one image stream, two text streams). Two hooks
# ComfyUI provides, sharing one object: the model function wrapper (rows) and `optimized_attention_override` (mix).
# Cost: every token is computed twice, 2× a plain step (as core's NAGuidance). The diffusers route
# (pipelines/nasa_joint.py, construction "shared" with the shared-key kernel) keeps the image stream single at 1.13×;
# ComfyUI offers no hook for that short of replacing its blocks (future work, issue 17).

JOINT_FAMILIES = {"flux": "FLUX.1", "zimage": "Z-Image"}
SUPPORTED = "SD1.x, SD2.x and SDXL UNets, PixArt, FLUX.1 (dev, schnell, Fill, Kontext) and Z-Image"


def joint_family(model) -> str | None:
    """"flux" for ComfyUI's FLUX.1 models (`comfy.model_base.Flux` itself; its subclasses Flux2, Chroma, LongCat… are
    other nets), "zimage" for Z-Image (`model_base.Lumina2` with the `ZImage` config; Lumina 2.0 shares the class),
    else None."""
    base = getattr(model, "model", None)
    name = type(base).__name__
    if name == "Flux":
        return "flux"
    if name == "Lumina2" and type(getattr(base, "model_config", None)).__name__ == "ZImage":
        return "zimage"
    return None


def _round_up(n: int, multiple: int | None) -> int:
    return n if not multiple else -(-n // multiple) * multiple


def _twice(value, b: int):
    """A conditioning entry for the doubled batch: tensors (or lists of tensors) with B rows are repeated [v; v]."""
    if torch.is_tensor(value) and value.ndim and value.shape[0] == b:
        return torch.cat([value, value])
    if isinstance(value, (list, tuple)):
        return type(value)(_twice(v, b) for v in value)
    return value


def _rows(value, index: torch.Tensor, b: int):
    """A conditioning entry restricted to the batch rows `index` (entries without B rows are shared)."""
    if torch.is_tensor(value) and value.ndim and value.shape[0] == b:
        return value.index_select(0, index.to(value.device))
    if isinstance(value, (list, tuple)):
        return type(value)(_rows(v, index, b) for v in value)
    return value


def _select(args: dict, chunks: list, rows_per_chunk: int) -> dict:
    """The model-call arguments of ComfyUI's `model_function_wrapper` for the chunks listed (cond_or_uncond
    indices), as if calc_cond_batch had batched only those."""
    index = torch.tensor([i for c in chunks for i in range(c * rows_per_chunk, (c + 1) * rows_per_chunk)])
    b = args["input"].shape[0]
    c = {k: v for k, v in args["c"].items() if k != "transformer_options"}
    c = {k: _rows(v, index, b) for k, v in c.items()}
    options = dict(args["c"].get("transformer_options", {}))
    kinds = [args["cond_or_uncond"][i] for i in chunks]
    options["cond_or_uncond"] = kinds
    if "uuids" in options:
        options["uuids"] = [options["uuids"][i] for i in chunks]
    c["transformer_options"] = options
    return {"input": _rows(args["input"], index, b), "timestep": _rows(args["timestep"], index, b), "c": c,
            "cond_or_uncond": kinds}


class JointAttentionOverride:
    """`optimized_attention_override`: ComfyUI's attention (or the override installed before) for every call; in a
    guided call's joint attentions the image part of both rows becomes combine(Z+_img, Z−_img) (heads merged), and
    Z-Image's negative rows get their caption key mask where the two captions differ in length."""

    def __init__(self, owner: "JointNegativeGuidance", previous=None):
        self.owner, self.previous = owner, previous

    def __deepcopy__(self, memo):  # ComfyUI 0.3.64's clone() deep-copies model_options: keep one shared state
        return self

    def __call__(self, func, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                 skip_output_reshape=False, **kwargs):
        attend = func if self.previous is None else (lambda *a, **kw: self.previous(func, *a, **kw))
        call, owner = self.owner.call, self.owner
        seq = 2 if skip_reshape else 1
        length = q.shape[seq]
        kind = None
        if call is not None and q.shape[0] == 2 * call["batch"] and k.shape[seq] == length:
            if owner.is_joint(call, length):
                kind = "joint"
            elif owner.in_caption_refiner and length == call["text_len"]:
                kind = "captions"
        if kind is not None and call.get("masked") is not None:
            if mask is not None:
                raise ValueError("SwiftStepNASA on Z-Image: this attention already has a mask; captions of different "
                                 "lengths need their own (ComfyUI's Z-Image passes none).")
            mask = owner.key_mask(call, length, q)
        out = attend(q, k, v, heads, mask=mask, attn_precision=attn_precision, skip_reshape=skip_reshape,
                     skip_output_reshape=skip_output_reshape, **kwargs)
        if kind != "joint":
            return out  # another attention (Z-Image's refiners over captions or image alone) or another model call
        if skip_output_reshape:  # [2B, H, L, D] → [2B, L, H·D]: NAG's norm runs over all heads
            h, d = out.shape[1], out.shape[3]
            merged = owner.mix(out.transpose(1, 2).flatten(2), call)
            return merged.unflatten(2, (h, d)).transpose(1, 2)
        return owner.mix(out, call)


class CaptionPadForward:
    """Object patch for Z-Image's `cap_embedder.forward`: in a guided call whose two captions differ in length (the
    shorter one zero-padded to the longer to share the batch), the padded positions become `cap_pad_token`, what
    ComfyUI appends to each caption up to its multiple of 32 (comfy/ldm/lumina `pad_zimage`)."""

    def __init__(self, owner: "JointNegativeGuidance", module, diffusion_model):
        self.owner, self.module, self.diffusion_model = owner, module, diffusion_model

    def __call__(self, x, *args, **kwargs):
        out = type(self.module).forward(self.module, x, *args, **kwargs)
        call = self.owner.call
        if call is None or call.get("real_len") is None or out.shape[0] != 2 * call["batch"]:
            return out
        b, pad = call["batch"], self.diffusion_model.cap_pad_token
        out = out.clone()
        for half, n in enumerate(call["real_len"]):
            out[half * b:(half + 1) * b, n:] = pad.to(out)
        return out


class CaptionRefinerForward:
    """Object patch for a Z-Image context-refiner layer's `forward`: marks its attentions as caption-only ones (their
    length may equal the image's, so length alone cannot tell them from the noise refiner's)."""

    def __init__(self, owner: "JointNegativeGuidance", layer):
        self.owner, self.layer = owner, layer

    def __call__(self, *args, **kwargs):
        self.owner.in_caption_refiner = True
        try:
            return type(self.layer).forward(self.layer, *args, **kwargs)
        finally:
            self.owner.in_caption_refiner = False


class JointNegativeGuidance:
    """NASA/NAG on a FLUX.1 or Z-Image MODEL: ComfyUI's `model_function_wrapper` (this object) runs the positive rows
    with the negative text appended as rows B…2B−1 and returns the first B; its `override` mixes the image tokens'
    attention output in every joint attention of that call.

    FLUX.1: both rows take the POSITIVE pooled embedding (`y`), so both rows' modulation is identical and their image
    streams stay identical. This equals `pipelines.nasa_joint.apply_joint_guidance(..., construction="official")`
    with `set_negative(negative_embeds, positive_pooled)`; the official NAG code gives the negative text stream its own
    pooled embedding, which this route cannot do without the image rows diverging. Joint attention is [txt, img]
    (double and single blocks); the two T5 conditionings need the same length (ComfyUI pads them to 256).
    Z-Image: the adaLN takes t only, nothing is approximated; the unified sequence is [cap, img] (comfy/ldm/lumina:
    captions padded to `pad_tokens_multiple` with `cap_pad_token`, then the image patches, also padded). Its refiner
    layers attend over the captions or the image alone and are left as they are. Captions of different lengths: the
    shorter is padded to the longer (its extra positions set to `cap_pad_token`, `CaptionPadForward`), and where the
    negative's padded length Tn is below the positive's Tp its keys Tn…Tp are masked in the context refiner and the
    main layers. Each caption then sees exactly its own padded tokens at its own positions, and the image keeps the
    positive's position offset, as `pipelines.nasa_joint_zimage` does; a negative longer than Tp is refused (it would
    move the positive row's image positions)."""

    def __init__(self, family: str, negative: torch.Tensor, guidance: nasa.NegativeGuidance, patch_size: int = 2,
                 pad_multiple: int | None = None, previous=None, previous_override=None):
        self.family, self.negative, self.guidance = family, negative, guidance
        self.patch_size, self.pad_multiple = patch_size, pad_multiple
        self.previous = previous  # a model_function_wrapper installed before, called inside this one
        self.override = JointAttentionOverride(self, previous_override)
        self.call = None  # per guided call: batch, text_len, joint_len, real_len, masked
        self.in_caption_refiner = False

    def __deepcopy__(self, memo):  # ComfyUI 0.3.64's clone() deep-copies model_options: keep one shared state
        return self

    # ------------------------------------------------------------ the attention side
    def is_joint(self, call: dict, length: int) -> bool:
        if call["joint_len"] is None:  # FLUX: every attention of the model is a joint [txt, img] one
            return length > call["text_len"]
        return length == call["joint_len"]

    @staticmethod
    def key_mask(call: dict, length: int, like: torch.Tensor) -> torch.Tensor:
        """Additive key mask [2B, 1, L] (ComfyUI's attention functions all add it): the negative rows' caption keys
        from Tn to Tp ignored. A large finite negative, not −inf: exp gives 0 without inf arithmetic."""
        b, (tn, tp) = call["batch"], call["masked"]
        mask = torch.zeros(2 * b, 1, length, device=like.device, dtype=like.dtype)
        mask[b:, :, tn:tp] = -torch.finfo(like.dtype).max
        return mask

    def mix(self, out: torch.Tensor, call: dict) -> torch.Tensor:
        """out [2B, L, H·D], rows [pos; neg], text first: the image part of both rows → combine(Z+, Z−)."""
        b, t = call["batch"], call["text_len"]
        image = self.guidance.combine(out[:b, t:], out[b:, t:])
        return torch.cat([out[:, :t], torch.cat([image, image])], dim=1)

    # ------------------------------------------------------------ the model-call side
    def _run(self, apply_model, args):
        if self.previous is not None:
            return self.previous(apply_model, args)
        return apply_model(args["input"], args["timestep"], **args["c"])

    def __call__(self, apply_model, args):
        kinds = list(args["cond_or_uncond"])
        if 0 not in kinds:
            return self._run(apply_model, args)
        if all(kind == 0 for kind in kinds):
            return self._guided(apply_model, args)
        # cfg > 1 batches the negative CONDITIONING's own rows (uncond) with the positive ones: only the positive
        # rows are guided, the uncond ones run as they are.
        per_chunk = args["input"].shape[0] // len(kinds)
        pos = [i for i, kind in enumerate(kinds) if kind == 0]
        other = [i for i, kind in enumerate(kinds) if kind != 0]
        outs = {0: self._guided(apply_model, _select(args, pos, per_chunk)).chunk(len(pos)),
                1: self._run(apply_model, _select(args, other, per_chunk)).chunk(len(other))}
        order = {i: (0, pos.index(i)) if i in pos else (1, other.index(i)) for i in range(len(kinds))}
        return torch.cat([outs[order[i][0]][order[i][1]] for i in range(len(kinds))])

    def _captions(self, pos: torch.Tensor, neg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Both text conditionings at one length, and what the call needs to know about it."""
        lp, ln = pos.shape[1], neg.shape[1]
        if self.family == "flux":
            if lp != ln:
                raise ValueError(f"SwiftStepNASA on FLUX.1: the negative prompt has {ln} tokens, the positive {lp}; "
                                 f"both run as rows of one batch and FLUX's text positions are shared, so they need "
                                 f"the same length (ComfyUI pads FLUX's T5 conditioning to 256 tokens: this happens "
                                 f"when a prompt is longer than that; shorten it).")
            return pos, neg, {"text_len": lp, "joint_len": None}
        m = self.pad_multiple
        tp, tn = _round_up(lp, m), _round_up(ln, m)
        if tn > tp:
            raise ValueError(f"SwiftStepNASA on Z-Image: the negative prompt has {ln} tokens, more than the positive's "
                             f"caption block holds ({lp} tokens padded to {tp}); shorten the negative prompt or "
                             f"lengthen the positive.")
        info = {"text_len": tp, "real_len": None, "masked": (tn, tp) if tn < tp else None}
        if lp != ln:
            n = max(lp, ln)
            pos, neg = (F.pad(t, (0, 0, 0, n - t.shape[1])) for t in (pos, neg))
            info["real_len"] = (lp, ln)
        return pos, neg, info

    def _guided(self, apply_model, args):
        x, c = args["input"], args["c"]
        name = JOINT_FAMILIES[self.family]
        for key, what in (("control", "a ControlNet"), ("attention_mask", "an attention mask (regional prompts)"),
                          ("ref_contexts", "Z-Image omni references"), ("siglip_feats", "Z-Image omni references")):
            if c.get(key) is not None:
                raise ValueError(f"SwiftStepNASA on {name} does not combine with {what} yet.")
        if self.family == "zimage" and c.get("ref_latents") is not None:
            raise ValueError("SwiftStepNASA on Z-Image does not combine with reference latents (omni) yet.")
        options = c.get("transformer_options", {})
        if options.get("optimized_attention_override") is not self.override:
            raise ValueError("SwiftStepNASA on FLUX.1/Z-Image: a node applied after it replaced its attention "
                             "override (`optimized_attention_override`); apply that node before SwiftStepNASA.")
        pos = c["c_crossattn"]
        b = x.shape[0]
        neg = self.negative.to(device=pos.device, dtype=pos.dtype)
        if b % neg.shape[0]:
            raise ValueError(f"SwiftStepNASA: input `negative` has batch {neg.shape[0]}, which does not divide the "
                             f"batch {b}.")
        neg = neg.repeat_interleave(b // neg.shape[0], 0)
        if neg.shape[2] != pos.shape[2]:
            raise ValueError(f"SwiftStepNASA: input `negative` has width {neg.shape[2]}, the positive conditioning "
                             f"{pos.shape[2]}: encode both with this model's text encoder.")
        pos, neg, call = self._captions(pos, neg)
        if self.family == "zimage":
            h, w = (-(-s // self.patch_size) for s in x.shape[-2:])
            call["joint_len"] = call["text_len"] + _round_up(h * w, self.pad_multiple)
        doubled = {k: _twice(v, b) for k, v in c.items() if k not in ("c_crossattn", "transformer_options")}
        doubled["c_crossattn"] = torch.cat([pos, neg])  # FLUX: `y` (pooled) doubled = the positive one for both
        options = dict(options)
        options["cond_or_uncond"] = kinds = list(args["cond_or_uncond"]) * 2
        if "uuids" in options:
            options["uuids"] = list(options["uuids"]) * 2
        doubled["transformer_options"] = options
        self.call = {"batch": b, **call}
        try:
            out = self._run(apply_model, {"input": torch.cat([x, x]), "timestep": _twice(args["timestep"], b),
                                          "c": doubled, "cond_or_uncond": kinds})
        finally:
            self.call = None
            self.in_caption_refiner = False
        return out[:b]


def guidance_is_off(guidance: nasa.NegativeGuidance) -> bool:
    """NASA α = 0 or NAG scale 1: the plain model (nothing is installed, so the patched clone is bit-identical)."""
    return guidance.alpha == 0.0 if guidance.mode == "nasa" else guidance.nag_scale == 1.0


def patch_joint_model(model, negative: torch.Tensor, guidance: nasa.NegativeGuidance):
    """A clone of a FLUX.1/Z-Image `model` with the wrapper and the attention override installed (also for guidance
    that is off: `patch_model` skips this then)."""
    family = joint_family(model)
    if family is None:
        raise ValueError(f"SwiftStepNASA: joint-attention guidance supports FLUX.1 and Z-Image, got "
                         f"{type(getattr(model, 'model', None)).__name__}.")
    previous = model.model_options.get("model_function_wrapper")
    if isinstance(previous, JointNegativeGuidance):
        raise ValueError("SwiftStepNASA is already applied to this model; apply it once (one negative prompt).")
    diffusion_model = model.get_model_object("diffusion_model")
    m = model.clone()
    options = dict(m.model_options.get("transformer_options", {}))
    wrapper = JointNegativeGuidance(family, negative, guidance, patch_size=getattr(diffusion_model, "patch_size", 2),
                                    pad_multiple=getattr(diffusion_model, "pad_tokens_multiple", None),
                                    previous=previous, previous_override=options.get("optimized_attention_override"))
    # New dicts, not the clone's: ComfyUI ≥ 0.33 no longer deep-copies model_options on clone() (attention_nodes.py).
    options["optimized_attention_override"] = wrapper.override
    m.model_options = {**m.model_options, "transformer_options": options, "model_function_wrapper": wrapper}
    if family == "zimage":  # captions of different lengths (per clone, applied only while it samples)
        m.add_object_patch("diffusion_model.cap_embedder.forward",
                           CaptionPadForward(wrapper, diffusion_model.cap_embedder, diffusion_model))
        for i, layer in enumerate(diffusion_model.context_refiner):
            m.add_object_patch(f"diffusion_model.context_refiner.{i}.forward", CaptionRefinerForward(wrapper, layer))
    return m


def patch_model(model, negative: torch.Tensor, mode: str, alpha: float, nag_scale: float, nag_tau: float,
                nag_alpha: float):
    """A clone of `model` with NASA/NAG on every UNet cross-attention, PixArt cross-attention or FLUX.1/Z-Image joint
    attention; `model` itself is left untouched."""
    family = joint_family(model)
    guidance = nasa.NegativeGuidance.checked(mode, alpha, nag_scale, nag_tau, nag_alpha,
                                             mode_name="SwiftStepNASA: input `mode`",  # joint attention: L2 ratio
                                             nag_norm=nag.DEFAULTS[family]["nag_norm"] if family else 1)
    if family is not None:
        return model.clone() if guidance_is_off(guidance) else patch_joint_model(model, negative, guidance)
    diffusion_model = model.get_model_object("diffusion_model")
    locations = attn2_locations(diffusion_model)
    pixart = pixart_cross_attentions(diffusion_model) if not locations else []
    if not locations and not pixart:
        raise ValueError(f"SwiftStepNASA: input `model` is a {type(diffusion_model).__name__}"
                         f"{_model_name(model)}, which has no text cross-attention blocks NASA can patch; "
                         f"supported: {SUPPORTED}.")
    m = model.clone()
    if pixart:  # DiT route: per-clone object patches, applied only while this clone samples
        y_proj = diffusion_model.y_embedder.y_proj
        for name, module in pixart:
            m.add_object_patch(name, PixArtCrossAttnForward(module, y_proj, negative, guidance.combine))
        return m
    for (block, number, index), attn2 in locations:
        m.set_model_attn2_replace(NASAAttn2Patch(attn2, negative, guidance), block, number, index)
    return m


def _model_name(model) -> str:
    """" (SD3 model)" from ComfyUI's model config class, where there is one."""
    config = getattr(getattr(model, "model", None), "model_config", None)
    return f" ({type(config).__name__} model)" if config is not None else ""


class SwiftStepNASA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SwiftStepNASA",
            display_name="SwiftStep NASA / NAG Negative Prompt",
            category="swiftstep/guidance",
            description="A negative prompt without CFG: NASA (SNOOPI) or NAG in every text cross-attention of "
                        "SD1.x/SD2.x/SDXL UNets and PixArt, for one-step and few-step models; sample at cfg 1.0. The "
                        "negative prompt costs one extra attention over its tokens per cross-attention, not a second "
                        "batch: about 1.0x the plain step where CFG costs 1.7x (bench/nasa.py). Core's NAGuidance "
                        "patches the self/joint-attention output and runs the negative as a CFG batch. FLUX.1 and "
                        "Z-Image (joint attention): the negative text runs as a second row of the same call and the "
                        "image tokens' attention output is mixed in every joint attention, so this costs 2x the plain "
                        "step (as core's NAGuidance); the diffusers route (1.13x) needs block changes ComfyUI has no "
                        "hook for.",
            inputs=[
                io.Model.Input("model", tooltip="An SD1.x, SD2.x, SDXL, PixArt, FLUX.1 or Z-Image model (any loader). "
                                                "Not modified: the node returns a patched clone."),
                io.Conditioning.Input("negative", tooltip="The negative prompt (CLIP Text Encode). Its first entry "
                                                          "is used; on UNets it may be longer than the positive "
                                                          "prompt. FLUX.1: as many T5 tokens as the positive (ComfyUI "
                                                          "pads both to 256), and the positive's pooled embedding "
                                                          "serves both. Z-Image: at most the positive's token count "
                                                          "rounded up to 32."),
                io.Combo.Input("mode", options=list(MODES), default="nasa",
                               tooltip="nasa: Z+ − α·Z− (SNOOPI). nag: normalized attention guidance (NAG paper)."),
                io.Float.Input("nasa_scale", default=0.2, min=0.0, max=5.0, step=0.01,
                               tooltip="NASA α. Paper values: SD1.5 0.1, SD2.1 0.2 (SwiftBrush v2 0.3), PixArt 0.5. "
                                       "FLUX.1/Z-Image: none published; start at 0.2 (the NAG paper finds NASA "
                                       "unstable on FLUX). 0 = off."),
                io.Float.Input("nag_scale", default=3.0, min=1.0, max=20.0, step=0.1,
                               tooltip="NAG scale = φ + 1 (the NAG code's convention; paper φ=2 → 3). FLUX.1 "
                                       "(official NAG example): 5. 1 = off."),
                io.Float.Input("nag_tau", default=2.5, min=1.0, max=10.0, step=0.1,
                               tooltip="NAG τ: clips how much the guided attention's norm may grow (paper: 2.5; "
                                       "L1 norm, L2 on FLUX.1/Z-Image as the official joint-attention code)."),
                io.Float.Input("nag_alpha", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="NAG α: blend of the guided and the plain attention (SDXL 0.5, SD1.5 0.375, "
                                       "FLUX.1 0.25)."),
            ],
            outputs=[io.Model.Output(tooltip="The patched clone; use with SamplerCustom or KSampler at cfg 1.0.")],
        )

    @classmethod
    def execute(cls, model, negative, mode, nasa_scale, nag_scale, nag_tau, nag_alpha) -> io.NodeOutput:
        if not negative:
            raise ValueError("SwiftStepNASA: input `negative` is empty; connect a CLIP Text Encode.")
        context = negative[0][0]  # [B, L−, C]
        return io.NodeOutput(patch_model(model, context, mode, nasa_scale, nag_scale, nag_tau, nag_alpha))


NODES = [SwiftStepNASA]
