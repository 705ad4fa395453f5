"""NASA / NAG on FLUX.2 / FLUX.2-klein (Flux2Transformer2DModel): one image stream, two text streams.

FLUX.2-klein is step-distilled and runs at guidance 1, so the stock pipeline's negative prompt does nothing. Here the
negative prompt gets its own text stream through every block while the image stream stays single, the construction
`nasa_joint.py` uses for FLUX.1 ("shared"), which is exact on FLUX.2:

- the transformer computes its modulation once per forward from temb, which holds the timestep (and the guidance
  embedding of FLUX.2-dev) but no pooled text; the same modulation is what the negative prompt's own forward would
  use, so nothing is approximated where FLUX.1's "shared" construction gives the negative text the positive temb;
- dual-stream blocks: the text stream runs as 2B rows [pos; neg] (the text modulation repeated to 2B rows), the
  image stream as B rows. The image q/k/v are projected once; the image queries give (Z+, Z−) over [txt+, img] and
  [txt−, img] (`attention_kernels.prefix_dual_attention`, the image keys scored once) and their output is
  `NegativeGuidance.combine(Z+, Z−)`; each text stream attends to its own [txt, img] and keeps its output
  (`nasa_joint.FluxJointGuidanceProcessor`: FLUX.2's `Flux2Attention` has FLUX.1's projections, QK norms and RoPE);
- after the last dual-stream block the two text rows of a sample become one row [txt+, txt−] (B × 2T), which the
  transformer concatenates with the image as it does the stock text: the single blocks see [txt+, txt−, img] with
  the per-sample modulation; txt± queries attend to [txt±, img], the image queries give (Z+, Z−) as above and their
  attention output is the mix (the fused MLP half of `to_qkv_mlp_proj` runs on every token as in the stock block);
  the rotary table repeats the text positions for txt− (both prompts share FLUX.2's text ids);
- after the last single block the txt− tokens are dropped, so the transformer's own slice by the original text
  length leaves the image.

Installed with forward hooks and attention processors only (no diffusers code copied, no subclass of a diffusers
class): a transformer pre-hook stacks the negative text on the batch, a hook on `double_stream_modulation_txt`
repeats its rows, hooks on the last dual- and single-stream blocks re-arrange the text. `remove()` restores the
processors and removes every hook; guidance that is off (NASA α = 0, NAG scale 1) installs nothing, so it is
bit-identical. With CFG on as well (FLUX.2 base models) both passes of a step get the NAG negative.

NAG: no published FLUX.2 setting; the official joint-attention code's FLUX.1 example (`core.nag.DEFAULTS["flux"]`,
L2 ratio) is the closest. NASA applies SNOOPI eq. 9 (Z+ − α·Z−) at the same place; SNOOPI publishes no FLUX.2 α.
"""

from __future__ import annotations

import torch

from ..core import nasa
from .nasa_joint import (FluxJointGuidanceProcessor, JointGuidanceHandle, _get_qkv_projections, call_arguments,
                         check_text_pair, image_attention_pair, merge_heads, refuse_mask, rope_rows,
                         text_attention_rows)
from .negative_context import negative_rows

SUPPORTED = ("Flux2Transformer2DModel",)
STOCK_PROCESSORS = {"transformer_blocks": "Flux2AttnProcessor",
                    "single_transformer_blocks": "Flux2ParallelSelfAttnProcessor"}


class Flux2SharedSingleProcessor:
    """`Flux2ParallelSelfAttention` on one row per sample, [txt+, txt−, img] (B rows; T from the handle's `state`,
    `image_rotary_emb` the transformer's [txt, img] table): txt± queries over [txt±, img], image queries → (Z+, Z−)
    with the image keys scored once, the image's attention output = the mix; the fused MLP half as in the stock
    processor."""

    def __init__(self, guidance: nasa.NegativeGuidance, state: dict):
        self.guidance, self.state = guidance, state

    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None):
        refuse_mask(attention_mask)
        t, b, length = self.state.get("text_len"), hidden_states.shape[0], hidden_states.shape[1]
        if t is None or length <= 2 * t or (image_rotary_emb is not None
                                            and image_rotary_emb[0].shape[0] != length - t):
            raise ValueError("NASA/NAG on FLUX.2: this single block got the stock [txt, img] sequence; run the "
                             "transformer with the hooks of `apply_flux2_guidance` installed.")
        proj = attn.to_qkv_mlp_proj(hidden_states)  # [q, k, v, MLP gate, MLP linear]
        qkv, mlp = proj.split_with_sizes([3 * attn.inner_dim, proj.shape[-1] - 3 * attn.inner_dim], dim=-1)
        q, k, v = (x.unflatten(-1, (-1, attn.head_dim)) for x in qkv.chunk(3, dim=-1))  # [B, 2T + N, H, D]
        q, k = attn.norm_q(q), attn.norm_k(k)
        if image_rotary_emb is not None:
            if self.state.get("rope") is None:  # once per forward: every single block gets the same table
                self.state["rope"] = tuple(torch.cat([f[:t], f[:t], f[t:]]) for f in image_rotary_emb)
            q, k = rope_rows(q, self.state["rope"], 0, None), rope_rows(k, self.state["rope"], 0, None)
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, 2T + N, D]
        sizes = [t, t, length - 2 * t]
        (qp, qn, qi), (kp, kn, ki), (vp, vn, vi) = (x.split_with_sizes(sizes, dim=2) for x in (q, k, v))
        z_pos, z_neg = image_attention_pair(qi, ki, vi, kp, vp, kn, vn)
        mix = self.guidance.combine(merge_heads(z_pos, q.dtype), merge_heads(z_neg, q.dtype))
        text = text_attention_rows(torch.cat([qp, qn]), torch.cat([kp, kn]), torch.cat([vp, vn]), ki, vi)
        out = torch.cat([merge_heads(text[:b], q.dtype), merge_heads(text[b:], q.dtype), mix], dim=1)
        return attn.to_out(torch.cat([out, attn.mlp_act_fn(mlp)], dim=-1))


def _check_text_ids(text_ids, length: int) -> None:
    if text_ids is None:
        return
    if not torch.is_tensor(text_ids) or text_ids.ndim not in (2, 3) or text_ids.shape[-2] != length:
        raise ValueError(f"negative `text_ids` must be [T, n_axes] or [B, T, n_axes] with T = {length} (the "
                         f"negative `prompt_embeds`' length), as `Flux2KleinPipeline.encode_prompt` returns them; got "
                         f"{tuple(getattr(text_ids, 'shape', ())) or type(text_ids).__name__}.")


class Flux2GuidanceHandle(JointGuidanceHandle):
    """NASA/NAG installed on a Flux2Transformer2DModel: `set_negative(prompt_embeds, text_ids=None)` before running
    it, `remove()` afterwards (restores the processors, removes every hook). Also a context manager.

    `installed` is False for guidance that is off (nothing was installed) and after `remove()`. The processors run
    SDPA / the shared-key kernel, not a backend chosen with diffusers' `set_attention_backend`."""

    text_ids = None  # the negative's, checked against the positive's when given

    def __init__(self, model, guidance: nasa.NegativeGuidance):
        super().__init__(model, guidance, "shared")  # exact here: the modulation reads the timestep only

    def _check(self, model, construction: str) -> None:
        cls = type(model).__name__
        if cls not in SUPPORTED:
            raise ValueError(f"NASA/NAG for FLUX.2 supports {', '.join(SUPPORTED)}; got {cls} (FLUX.1: "
                             f"`nasa_joint.apply_joint_guidance`).")
        if _get_qkv_projections is None:  # pragma: no cover - older diffusers
            raise ValueError("NASA/NAG for FLUX.2 needs diffusers ≥ 0.36.")
        if not len(model.transformer_blocks):
            raise ValueError("NASA/NAG for FLUX.2 needs at least one dual-stream block (`num_layers` ≥ 1): the two "
                             "text streams are merged into the single-stream sequence after the last one.")

    # ---------------------------------------------------------------- installation
    def _install(self):
        model = self.model
        original, procs = dict(model.attn_processors), {}
        for name, proc in original.items():
            stock = STOCK_PROCESSORS[name.split(".")[0]]
            if type(proc).__name__ != stock:
                raise ValueError(f"NASA/NAG for FLUX.2 replaces {stock}; {name} has {type(proc).__name__} (unfuse "
                                 f"QKV projections / remove other attention patches first).")
            procs[name] = (FluxJointGuidanceProcessor(self.guidance) if name.startswith("transformer_blocks.")
                           else Flux2SharedSingleProcessor(self.guidance, self.state))
        self.original = original
        model.set_attn_processor(procs)
        hooks = [model.register_forward_pre_hook(self._two_text_streams, with_kwargs=True),
                 model.double_stream_modulation_txt.register_forward_hook(self._text_modulation_rows),
                 model.transformer_blocks[-1].register_forward_hook(self._one_row_two_texts)]
        if len(model.single_transformer_blocks):
            hooks.append(model.single_transformer_blocks[-1].register_forward_hook(self._drop_negative_text))
        self._hooks = hooks

    def set_negative(self, prompt_embeds: torch.Tensor, text_ids: torch.Tensor | None = None):
        """The negative prompt's `Flux2KleinPipeline.encode_prompt` outputs: `prompt_embeds` [1 or B, T, C] (the
        positive's T: encode both with the same `max_sequence_length`) and optionally its `text_ids` [B, T, 4],
        which must equal the positive's (the transformer builds one rotary table from `txt_ids[0]` for both text
        streams; for equal T the stock ids are equal).

        Rejected embeddings remove the handle before the ValueError, so `apply_flux2_guidance(...).set_negative(...)`
        never leaves a patch behind that the caller holds no handle to."""
        try:
            self._check_negative(prompt_embeds, None)
            _check_text_ids(text_ids, prompt_embeds.shape[1])
        except ValueError:
            self.remove()
            raise
        self.context.set_negative(prompt_embeds)
        self.text_ids = text_ids
        return self

    def remove(self) -> None:
        super().remove()
        self.text_ids = None
        self.state.update(batch=None, text_len=None, rope=None)

    # ---------------------------------------------------------------- hooks
    def _two_text_streams(self, module, args, kwargs):
        """Transformer pre-hook: text embeddings [pos; neg] (2B rows), the image latents and the timestep unchanged
        (B rows): the stock forward's `num_txt_tokens` stays T."""
        neg = self.context.encoder_hidden_states
        if neg is None:
            raise ValueError("NASA/NAG on FLUX.2: call `set_negative(prompt_embeds)` before running the transformer.")
        kw = call_arguments(module, args, kwargs)
        if kw.get("kv_cache_mode") is not None or kw.get("kv_cache") is not None:
            raise ValueError("NASA/NAG on FLUX.2 does not take `kv_cache_mode` / `kv_cache` (the reference-image KV "
                             "cache of Flux2KleinKVPipeline).")
        pos, b = kw["encoder_hidden_states"], kw["hidden_states"].shape[0]
        check_text_pair(pos, neg, b, "FLUX.2 shares the text ids")
        if self.text_ids is not None:
            pos_ids, neg_ids = (i[0] if i.ndim == 3 else i for i in (kw["txt_ids"], self.text_ids))
            if not torch.equal(neg_ids.to(pos_ids), pos_ids):
                raise ValueError("negative `text_ids` differ from the positive `txt_ids`: both text streams use the "
                                 "rotary table of `txt_ids`; encode both prompts with the same pipeline and "
                                 "max_sequence_length.")
        kw["encoder_hidden_states"] = torch.cat([pos, negative_rows(neg, b, "prompt_embeds").to(pos)])
        self.state.update(batch=b, text_len=pos.shape[1], rope=None)
        return (), kw

    def _text_modulation_rows(self, module, args, output):
        """The dual-stream text modulation [B, 6·D] → [2B, 6·D] for the [pos; neg] text rows; one row (a shared
        timestep) broadcasts as it is."""
        return torch.cat([output, output]) if output.shape[0] == self.state["batch"] else output

    def _one_row_two_texts(self, block, args, output):
        """After the last dual-stream block: text [pos; neg] (2B × T) → [txt+, txt−] (B × 2T), which the transformer
        concatenates with the image for the single blocks; with no single block only txt+ is kept."""
        txt, img = output
        b = self.state["batch"]
        if not len(self.model.single_transformer_blocks):
            return txt[:b], img
        return torch.cat([txt[:b], txt[b:]], dim=1), img

    def _drop_negative_text(self, block, args, output):
        """After the last single block: [txt+, txt−, img] → [txt+, img], the layout the transformer slices."""
        t = self.state["text_len"]
        return torch.cat([output[:, :t], output[:, 2 * t:]], dim=1)


def apply_flux2_guidance(transformer, guidance: nasa.NegativeGuidance) -> Flux2GuidanceHandle:
    """Install NASA/NAG on a Flux2Transformer2DModel (FLUX.2, FLUX.2-klein); returns the handle to feed
    (`set_negative(prompt_embeds, text_ids)`, as `Flux2KleinPipeline.encode_prompt` returns them) and remove. Off
    settings (NASA α = 0, NAG scale 1) install nothing."""
    return Flux2GuidanceHandle(transformer, guidance)
