"""SwiftStepNASA: a negative prompt for one-step models in ComfyUI, through NASA or NAG in every UNet attn2.

The patched MODEL is a clone with an `attn2` replace patch per transformer block; the combination is `core.nasa` /
`core.nag`, the attention ComfyUI's own `optimized_attention` for both branches (so α = 0 is the unpatched model).
"""

from __future__ import annotations

import torch
from comfy_api.latest import io

from .. import attention_kernels
from ..core import nasa

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


def patch_model(model, negative: torch.Tensor, mode: str, alpha: float, nag_scale: float, nag_tau: float,
                nag_alpha: float):
    """A clone of `model` with NASA/NAG on every UNet cross-attention; `model` itself is left untouched."""
    guidance = nasa.NegativeGuidance.checked(mode, alpha, nag_scale, nag_tau, nag_alpha,
                                             mode_name="SwiftStepNASA: input `mode`")
    diffusion_model = model.get_model_object("diffusion_model")
    locations = attn2_locations(diffusion_model)
    pixart = pixart_cross_attentions(diffusion_model) if not locations else []
    if not locations and not pixart:
        raise ValueError(f"SwiftStepNASA: input `model` is a {type(diffusion_model).__name__}, which has no text "
                         f"cross-attention blocks NASA can patch; supported: SD1.x, SD2.x and SDXL UNets, PixArt.")
    m = model.clone()
    if pixart:  # DiT route: per-clone object patches, applied only while this clone samples
        y_proj = diffusion_model.y_embedder.y_proj
        for name, module in pixart:
            m.add_object_patch(name, PixArtCrossAttnForward(module, y_proj, negative, guidance.combine))
        return m
    for (block, number, index), attn2 in locations:
        m.set_model_attn2_replace(NASAAttn2Patch(attn2, negative, guidance), block, number, index)
    return m


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
                        "patches the self/joint-attention output and runs the negative as a CFG batch.",
            inputs=[
                io.Model.Input("model", tooltip="An SD1.x, SD2.x or SDXL model (any loader). Not modified: the node "
                                                "returns a patched clone."),
                io.Conditioning.Input("negative", tooltip="The negative prompt (CLIP Text Encode). Its first entry "
                                                          "is used; it may be longer than the positive prompt."),
                io.Combo.Input("mode", options=list(MODES), default="nasa",
                               tooltip="nasa: Z+ − α·Z− (SNOOPI). nag: normalized attention guidance (NAG paper)."),
                io.Float.Input("nasa_scale", default=0.2, min=0.0, max=5.0, step=0.01,
                               tooltip="NASA α. Paper values: SD1.5 0.1, SD2.1 0.2 (SwiftBrush v2 0.3), PixArt 0.5. "
                                       "0 = off."),
                io.Float.Input("nag_scale", default=3.0, min=1.0, max=20.0, step=0.1,
                               tooltip="NAG scale = φ + 1 (the NAG code's convention; paper φ=2 → 3). 1 = off."),
                io.Float.Input("nag_tau", default=2.5, min=1.0, max=10.0, step=0.1,
                               tooltip="NAG τ: clips how much the guided attention's L1 norm may grow (paper: 2.5)."),
                io.Float.Input("nag_alpha", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="NAG α: blend of the guided and the plain attention (SDXL 0.5, SD1.5 0.375)."),
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
