"""SwiftStepNASA: a negative prompt for one-step models in ComfyUI, through NASA or NAG in every UNet attn2.

The patched MODEL is a clone with an `attn2` replace patch per transformer block; the combination is `core.nasa` /
`core.nag`, the attention ComfyUI's own `optimized_attention` for both branches (so α = 0 is the unpatched model).
PixArt gets per-clone object patches of its cross-attention; the joint-attention DiTs (FLUX.1, FLUX.2, Z-Image,
Qwen-Image, SD3/SD3.5: no cross-attention) get a model function wrapper and an attention override
(`JointNegativeGuidance`, below).
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


# ---------------------------------------------- joint-attention DiTs: FLUX.1, FLUX.2, Z-Image, Qwen-Image, SD3/SD3.5
# A joint-attention DiT has no text cross-attention: text and image tokens attend together. The negative prompt gets
# its own text stream: the positive and the negative text run as two batch rows of ONE model call at cfg 1, and inside
# every joint attention the image tokens' output of both rows is replaced by combine(Z+, Z−), so the two rows' image
# streams stay identical (the official NAG code's construction: one image stream, two text streams). Two hooks
# ComfyUI provides, sharing one object: the model function wrapper (rows) and `optimized_attention_override` (mix).
# Cost: every token is computed twice, 2× a plain step (as core's NAGuidance). The diffusers route
# (pipelines/nasa_joint.py, construction "shared" with the shared-key kernel) keeps the image stream single at 1.13×;
# ComfyUI offers no hook for that short of replacing its blocks (future work, issue 17).

JOINT_FAMILIES = {"flux": "FLUX.1", "flux2": "FLUX.2", "zimage": "Z-Image", "qwenimage": "Qwen-Image",
                  "sd3": "SD3/SD3.5"}
SUPPORTED = ("SD1.x, SD2.x and SDXL UNets, PixArt, FLUX.1 (dev, schnell, Fill, Kontext), FLUX.2 (klein, dev; "
             "ComfyUI ≥ 0.33), Z-Image, Qwen-Image and SD3/SD3.5")
# (comfy.model_base class, comfy.supported_models config; None = any) → family. By class name, never by weights:
# Flux's subclasses (Flux2, Chroma, LongCat…) and QwenImage's (MageFlow) are other nets, Lumina2 is also Lumina 2.0.
JOINT_MODELS = {("Flux", None): "flux", ("Flux2", "Flux2"): "flux2", ("Lumina2", "ZImage"): "zimage",
                ("QwenImage", "QwenImage"): "qwenimage", ("SD3", "SD3"): "sd3"}
# comfy/model_base.py Flux2.extra_conds left-pads every FLUX.2 text conditioning shorter than this with zeros (its
# klein text encoder already pads to it); the negative gets the same.
FLUX2_TEXT_LEN = 512


def joint_family(model) -> str | None:
    """The `core.nag.DEFAULTS` family of a ComfyUI joint-attention MODEL ("flux", "flux2", "zimage", "qwenimage",
    "sd3"; `JOINT_MODELS`), else None."""
    base = getattr(model, "model", None)
    name, config = type(base).__name__, type(getattr(base, "model_config", None)).__name__
    return JOINT_MODELS.get((name, None)) or JOINT_MODELS.get((name, config))


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
    where a row's text is padded (texts of different lengths, Qwen-Image's text masks) its padded keys are masked."""

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
        if kind is not None and call.get("text_keep") is not None:
            if mask is not None:
                raise ValueError(f"SwiftStepNASA on {JOINT_FAMILIES[owner.family]}: this attention already has a "
                                 f"mask; texts of different lengths need their own (this ComfyUI passes one here).")
            mask = owner.key_mask(call, length, q)
        out = attend(q, k, v, heads, mask=mask, attn_precision=attn_precision, skip_reshape=skip_reshape,
                     skip_output_reshape=skip_output_reshape, **kwargs)
        if kind != "joint":
            return out  # another attention (Z-Image's refiners, SD3.5's image-only attn2) or another model call
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
    """NASA/NAG on a joint-attention MODEL: ComfyUI's `model_function_wrapper` (this object) runs the positive rows
    with the negative text appended as rows B…2B−1 and returns the first B; its `override` mixes the image tokens'
    attention output in every joint attention of that call. Every family puts the text first in its joint sequence
    ([txt, img], [cap, img], SD3's [context, x]), so one override serves all.

    FLUX.1: both rows take the POSITIVE pooled embedding (`y`), so both rows' modulation is identical and their image
    streams stay identical. This equals `pipelines.nasa_joint.apply_joint_guidance(..., construction="official")`
    with `set_negative(negative_embeds, positive_pooled)`; the official NAG code gives the negative text stream its own
    pooled embedding, which this route cannot do without the image rows diverging. Joint attention is [txt, img]
    (double and single blocks); the two T5 conditionings need the same length (ComfyUI pads them to 256).
    SD3/SD3.5: the same for its pooled `y` (adaLN of every block): both rows take the positive one, as the official
    diffusers NAG pipeline (`NAGStableDiffusion3Pipeline`) does, i.e. `pipelines.nasa_joint_sd3.apply_sd3_guidance`
    with `set_negative(negative_embeds)`; ComfyUI-NAG's MMDiT patch modulates the negative text with its own pooled
    embedding instead. The negative CONDITIONING's `pooled_output` is not used. SD3 text has no positions, so texts of
    different lengths (long T5 prompts) are padded to one length with the padding masked; SD3.5-Large's last block
    (`context_pre_only`) still attends over [context, x] and only its image output is kept, SD3.5-Medium's image-only
    `attn2` is left as it is (`joint_len`).
    FLUX.2 and Qwen-Image: the modulation reads the timestep only (no pooled text), nothing is approximated; these
    equal `nasa_joint_flux2.apply_flux2_guidance` and `nasa_joint_qwenimage.apply_qwenimage_guidance`. The image
    positions do not depend on the text length (FLUX.2 text ids count 0…T−1 on their own axis; Qwen-Image's text
    positions start after the image's half-size), so the shorter text is padded at its end with its padding masked,
    and each text keeps its own positions. A FLUX.2 negative shorter than 512 tokens is first left-padded with zeros
    as ComfyUI pads every FLUX.2 conditioning (`FLUX2_TEXT_LEN`); Qwen-Image's own text masks (`attention_mask`, from
    batched prompts of different lengths) mask those keys too.
    Z-Image: the adaLN takes t only, nothing is approximated; the unified sequence is [cap, img] (comfy/ldm/lumina:
    captions padded to `pad_tokens_multiple` with `cap_pad_token`, then the image patches, also padded). Its refiner
    layers attend over the captions or the image alone and are left as they are. Captions of different lengths: the
    shorter is padded to the longer (its extra positions set to `cap_pad_token`, `CaptionPadForward`), and where the
    negative's padded length Tn is below the positive's Tp its keys Tn…Tp are masked in the context refiner and the
    main layers. Each caption then sees exactly its own padded tokens at its own positions, and the image keeps the
    positive's position offset, as `pipelines.nasa_joint_zimage` does; a negative longer than Tp is refused (it would
    move the positive row's image positions)."""

    def __init__(self, family: str, negative: torch.Tensor, guidance: nasa.NegativeGuidance, patch_size: int = 2,
                 pad_multiple: int | None = None, previous=None, previous_override=None,
                 negative_mask: torch.Tensor | None = None, register_length: int = 0):
        self.family, self.negative, self.guidance = family, negative, guidance
        self.negative_mask = negative_mask  # Qwen-Image: the negative CONDITIONING's text mask [B, T], 1 = token
        self.patch_size, self.pad_multiple, self.register_length = patch_size, pad_multiple, register_length
        self.previous = previous  # a model_function_wrapper installed before, called inside this one
        self.override = JointAttentionOverride(self, previous_override)
        self.call = None  # per guided call: batch, text_len, joint_len, real_len, text_keep
        self.in_caption_refiner = False

    def __deepcopy__(self, memo):  # ComfyUI 0.3.64's clone() deep-copies model_options: keep one shared state
        return self

    # ------------------------------------------------------------ the attention side
    def is_joint(self, call: dict, length: int) -> bool:
        if call["joint_len"] is None:  # FLUX.1/FLUX.2/Qwen-Image: every attention of the model is a joint [txt, img]
            return length > call["text_len"]
        return length == call["joint_len"]

    @staticmethod
    def key_mask(call: dict, length: int, like: torch.Tensor) -> torch.Tensor:
        """Additive key mask [2B, 1, L] (ComfyUI's attention functions all add it): the text keys a row does not keep
        (`text_keep` [2B, T], text first) ignored. A large finite negative, not −inf: exp gives 0 without inf
        arithmetic."""
        keep = call["text_keep"].to(like.device)
        mask = torch.zeros(keep.shape[0], 1, length, device=like.device, dtype=like.dtype)
        mask[:, 0, :keep.shape[1]].masked_fill_(~keep, -torch.finfo(like.dtype).max)
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

    def _captions(self, pos: torch.Tensor, neg: torch.Tensor, pos_mask=None,
                  neg_mask=None) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Both text conditionings at one length, and what the call needs to know about it."""
        lp, ln = pos.shape[1], neg.shape[1]
        b = pos.shape[0]
        if self.family == "flux":
            if lp != ln:
                raise ValueError(f"SwiftStepNASA on FLUX.1: the negative prompt has {ln} tokens, the positive {lp}; "
                                 f"both run as rows of one batch and FLUX's text positions are shared, so they need "
                                 f"the same length (ComfyUI pads FLUX's T5 conditioning to 256 tokens: this happens "
                                 f"when a prompt is longer than that; shorten it).")
            return pos, neg, {"text_len": lp, "joint_len": None}
        if self.family == "zimage":
            m = self.pad_multiple
            tp, tn = _round_up(lp, m), _round_up(ln, m)
            if tn > tp:
                raise ValueError(f"SwiftStepNASA on Z-Image: the negative prompt has {ln} tokens, more than the "
                                 f"positive's caption block holds ({lp} tokens padded to {tp}); shorten the negative "
                                 f"prompt or lengthen the positive.")
            info = {"text_len": tp, "real_len": None, "text_keep": None}
            if tn < tp:
                keep = torch.ones(2 * b, tp, dtype=torch.bool, device=pos.device)
                keep[b:, tn:] = False
                info["text_keep"] = keep
            if lp != ln:
                n = max(lp, ln)
                pos, neg = (F.pad(t, (0, 0, 0, n - t.shape[1])) for t in (pos, neg))
                info["real_len"] = (lp, ln)
            return pos, neg, info
        # FLUX.2, Qwen-Image, SD3: the image positions do not depend on the text length and each text token keeps
        # its index, so the shorter text is padded at its end and its padding masked.
        if self.family == "flux2" and ln < FLUX2_TEXT_LEN:
            neg, ln = F.pad(neg, (0, 0, FLUX2_TEXT_LEN - ln, 0)), FLUX2_TEXT_LEN
        t = max(lp, ln)
        keep = torch.cat([_text_keep(pos_mask, b, lp, t, pos.device), _text_keep(neg_mask, b, ln, t, pos.device)])
        r = self.register_length  # SD3's learned register tokens, prepended to the text inside the model
        keep = F.pad(keep, (r, 0), value=True)
        pos, neg = (F.pad(x, (0, 0, 0, t - x.shape[1])) for x in (pos, neg))
        return pos, neg, {"text_len": r + t, "joint_len": None, "text_keep": None if bool(keep.all()) else keep}

    def _guided(self, apply_model, args):
        x, c = args["input"], args["c"]
        name = JOINT_FAMILIES[self.family]
        refused = [("control", "a ControlNet"), ("ref_contexts", "Z-Image omni references"),
                   ("siglip_feats", "Z-Image omni references")]
        if self.family != "qwenimage":  # Qwen-Image's is its text mask, handled below; FLUX's are regional prompts
            refused.append(("attention_mask", "an attention mask (regional prompts)"))
        for key, what in refused:
            if c.get(key) is not None:
                raise ValueError(f"SwiftStepNASA on {name} does not combine with {what} yet.")
        if self.family == "zimage" and c.get("ref_latents") is not None:
            raise ValueError("SwiftStepNASA on Z-Image does not combine with reference latents (omni) yet.")
        options = c.get("transformer_options", {})
        if options.get("optimized_attention_override") is not self.override:
            raise ValueError(f"SwiftStepNASA on {name}: a node applied after it replaced its attention override "
                             f"(`optimized_attention_override`); apply that node before SwiftStepNASA.")
        pos = c["c_crossattn"]
        b = x.shape[0]
        neg = self.negative.to(device=pos.device, dtype=pos.dtype)
        if b % neg.shape[0]:
            raise ValueError(f"SwiftStepNASA: input `negative` has batch {neg.shape[0]}, which does not divide the "
                             f"batch {b}.")
        reps = b // neg.shape[0]
        neg = neg.repeat_interleave(reps, 0)
        if neg.shape[2] != pos.shape[2]:
            raise ValueError(f"SwiftStepNASA: input `negative` has width {neg.shape[2]}, the positive conditioning "
                             f"{pos.shape[2]}: encode both with this model's text encoder.")
        pos_mask = neg_mask = None
        if self.family == "qwenimage":
            pos_mask = _mask_rows(c.get("attention_mask"), b, pos.shape[1], "the positive conditioning")
            if self.negative_mask is not None:
                neg_mask = _mask_rows(self.negative_mask.repeat_interleave(reps, 0), b, neg.shape[1],
                                      "input `negative`")
        pos, neg, call = self._captions(pos, neg, pos_mask, neg_mask)
        if self.family in ("zimage", "sd3"):  # other attentions (refiners, SD3.5's attn2) see the image alone
            h, w = (-(-s // self.patch_size) for s in x.shape[-2:])
            call["joint_len"] = call["text_len"] + _round_up(h * w, self.pad_multiple)
        doubled = {k: _twice(v, b) for k, v in c.items()
                   if k not in ("c_crossattn", "transformer_options", "attention_mask")}
        doubled["c_crossattn"] = torch.cat([pos, neg])  # FLUX.1, SD3: `y` (pooled) doubled = the positive's for both
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


def _mask_rows(mask, b: int, length: int, what: str) -> torch.Tensor | None:
    """A Qwen-Image text mask as bool [B, T] (True = token), or None. ComfyUI's Qwen-Image text encoder gives 1/0
    (integer) masks; the model turns them into additive ones."""
    if mask is None:
        return None
    if torch.is_floating_point(mask):
        raise ValueError(f"SwiftStepNASA on Qwen-Image: {what} has a float (additive) `attention_mask`; expected the "
                         f"1/0 mask ComfyUI's Qwen-Image text encoder gives.")
    if mask.shape[0] != b:
        mask = mask.repeat_interleave(b // mask.shape[0], 0) if mask.shape[0] and b % mask.shape[0] == 0 else None
    if mask is None or tuple(mask.shape) != (b, length):
        raise ValueError(f"SwiftStepNASA on Qwen-Image: {what}'s `attention_mask` does not match its {length} "
                         f"tokens.")
    return mask != 0


def _text_keep(mask, b: int, length: int, padded: int, device) -> torch.Tensor:
    """A text stream's kept keys [B, padded] (bool): its mask (or all of its `length` tokens), not the padding."""
    keep = torch.ones(b, length, dtype=torch.bool, device=device) if mask is None else mask.to(device)
    return F.pad(keep, (0, padded - length), value=False)


def guidance_is_off(guidance: nasa.NegativeGuidance) -> bool:
    """NASA α = 0 or NAG scale 1: the plain model (nothing is installed, so the patched clone is bit-identical)."""
    return guidance.alpha == 0.0 if guidance.mode == "nasa" else guidance.nag_scale == 1.0


def patch_joint_model(model, negative: torch.Tensor, guidance: nasa.NegativeGuidance,
                      negative_mask: torch.Tensor | None = None):
    """A clone of a joint-attention `model` (`JOINT_FAMILIES`) with the wrapper and the attention override installed
    (also for guidance that is off: `patch_model` skips this then). `negative_mask`: the negative CONDITIONING's
    `attention_mask` (Qwen-Image; other families ignore it, as ComfyUI does)."""
    family = joint_family(model)
    if family is None:
        raise ValueError(f"SwiftStepNASA: joint-attention guidance supports {', '.join(JOINT_FAMILIES.values())}, "
                         f"got {type(getattr(model, 'model', None)).__name__}.")
    previous = model.model_options.get("model_function_wrapper")
    if isinstance(previous, JointNegativeGuidance):
        raise ValueError("SwiftStepNASA is already applied to this model; apply it once (one negative prompt).")
    diffusion_model = model.get_model_object("diffusion_model")
    m = model.clone()
    options = dict(m.model_options.get("transformer_options", {}))
    wrapper = JointNegativeGuidance(family, negative, guidance, patch_size=getattr(diffusion_model, "patch_size", 2),
                                    pad_multiple=getattr(diffusion_model, "pad_tokens_multiple", None),
                                    previous=previous, previous_override=options.get("optimized_attention_override"),
                                    negative_mask=negative_mask if family == "qwenimage" else None,
                                    register_length=getattr(diffusion_model, "register_length", 0) or 0)
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
                nag_alpha: float, negative_mask: torch.Tensor | None = None):
    """A clone of `model` with NASA/NAG on every UNet cross-attention, PixArt cross-attention or joint attention
    (FLUX.1, FLUX.2, Z-Image, Qwen-Image, SD3/SD3.5); `model` itself is left untouched."""
    family = joint_family(model)
    guidance = nasa.NegativeGuidance.checked(mode, alpha, nag_scale, nag_tau, nag_alpha,
                                             mode_name="SwiftStepNASA: input `mode`",
                                             # NAG's per-token ratio: the official code's per family (L2; SD3 L1)
                                             nag_norm=nag.DEFAULTS[family]["nag_norm"] if family else 1)
    if family is not None:
        return model.clone() if guidance_is_off(guidance) else patch_joint_model(model, negative, guidance,
                                                                                  negative_mask)
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
                        "patches the self/joint-attention output and runs the negative as a CFG batch. Joint-attention "
                        "DiTs (FLUX.1, FLUX.2 klein/dev, Z-Image, Qwen-Image, SD3/SD3.5): the negative text runs as a "
                        "second row of the same call and the image tokens' attention output is mixed in every joint "
                        "attention, so this costs 2x the plain step (as core's NAGuidance); the diffusers routes "
                        "(about 1.13x) need block changes ComfyUI has no hook for. FLUX.1 and SD3 use the positive's "
                        "pooled embedding for both rows; FLUX.2, Z-Image and Qwen-Image approximate nothing.",
            inputs=[
                io.Model.Input("model", tooltip="An SD1.x, SD2.x, SDXL, PixArt, FLUX.1, FLUX.2 (klein, dev; ComfyUI "
                                                "0.33+), Z-Image, Qwen-Image or SD3/SD3.5 model (any loader). Not "
                                                "modified: the node returns a patched clone."),
                io.Conditioning.Input("negative", tooltip="The negative prompt (CLIP Text Encode, same text encoder as "
                                                          "the positive). Its first entry is used; on UNets it may be "
                                                          "longer than the positive prompt. FLUX.1: as many T5 tokens "
                                                          "as the positive (ComfyUI pads both to 256), and the "
                                                          "positive's pooled embedding serves both. Z-Image: at most "
                                                          "the positive's token count rounded up to 32. FLUX.2, "
                                                          "Qwen-Image, SD3/SD3.5: any length (the shorter text's "
                                                          "padding is masked); SD3 uses the positive's pooled "
                                                          "embedding for both."),
                io.Combo.Input("mode", options=list(MODES), default="nasa",
                               tooltip="nasa: Z+ − α·Z− (SNOOPI). nag: normalized attention guidance (NAG "
                                       "paper); recommended on the joint-attention DiTs."),
                io.Float.Input("nasa_scale", default=0.2, min=0.0, max=5.0, step=0.01,
                               tooltip="NASA α. Paper values: SD1.5 0.1, SD2.1 0.2 (SwiftBrush v2 0.3), PixArt 0.5. "
                                       "Joint-attention DiTs: none published; start at 0.2 (the NAG paper finds NASA "
                                       "unstable on FLUX). 0 = off."),
                io.Float.Input("nag_scale", default=3.0, min=1.0, max=20.0, step=0.1,
                               tooltip="NAG scale = φ + 1 (the NAG code's convention; paper φ=2 → 3). FLUX.1 "
                                       "(official NAG example): 5; FLUX.2, Z-Image, Qwen-Image, SD3.5: 5 as well "
                                       "(none published). 1 = off."),
                io.Float.Input("nag_tau", default=2.5, min=1.0, max=10.0, step=0.1,
                               tooltip="NAG τ: clips how much the guided attention's norm may grow (paper: 2.5; "
                                       "L1 norm; L2 on FLUX.1/FLUX.2/Z-Image/Qwen-Image as the official "
                                       "joint-attention code, L1 on SD3 as its official code)."),
                io.Float.Input("nag_alpha", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="NAG α: blend of the guided and the plain attention (SDXL 0.5, SD1.5 0.375, "
                                       "FLUX.1 0.25, SD3.5 0.125; FLUX.2/Z-Image/Qwen-Image: FLUX.1's 0.25)."),
            ],
            outputs=[io.Model.Output(tooltip="The patched clone; use with SamplerCustom or KSampler at cfg 1.0.")],
        )

    @classmethod
    def execute(cls, model, negative, mode, nasa_scale, nag_scale, nag_tau, nag_alpha) -> io.NodeOutput:
        if not negative:
            raise ValueError("SwiftStepNASA: input `negative` is empty; connect a CLIP Text Encode.")
        context, extra = negative[0][0], negative[0][1]  # [B, L−, C], the encoder's extras
        return io.NodeOutput(patch_model(model, context, mode, nasa_scale, nag_scale, nag_tau, nag_alpha,
                                         negative_mask=extra.get("attention_mask")))


NODES = [SwiftStepNASA]
