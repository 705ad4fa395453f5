"""SwiftStepTritonAttention: route a ComfyUI model's attention through `swiftstep.attention_kernels`, per model and reversibly.

Uses ComfyUI's per-model `optimized_attention_override` hook (every `@wrap_attn` attention, UNets and DiTs alike)
on a clone; where dispatch keeps SDPA (CPU, unsupported shape, or no measured win) ComfyUI's own attention runs.
"""

from __future__ import annotations

from comfy_api.latest import io

from .. import attention_kernels

BACKENDS = ("auto", "triton")
EIGHT_BIT = ("off", "int8", "e4m3")


class TritonAttentionOverride:
    """`fn(original_func, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
    skip_output_reshape=False, **kwargs)`: the Triton kernel where dispatch picks it, else `original_func`."""

    def __init__(self, backend: str, self_attention_8bit: str = "off"):
        self.backend = backend
        self.self_attention_8bit = self_attention_8bit  # "off", "int8" or "e4m3"

    def __call__(self, func, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                 skip_output_reshape=False, **kwargs):
        def original():
            return func(q, k, v, heads, mask=mask, attn_precision=attn_precision, skip_reshape=skip_reshape,
                        skip_output_reshape=skip_output_reshape, **kwargs)

        if attn_precision is not None and attn_precision != q.dtype:
            return original()  # the model asks for an upcast softmax: ComfyUI's path honours it
        if skip_reshape:
            b, _, _, d = q.shape
            qh, kh, vh = q, k, v
        else:
            b, lq, inner = q.shape
            d = inner // heads
            qh, kh, vh = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
        if mask is not None:  # ComfyUI masks are per-query ([Lq, Lk] / [B, Lq, Lk]); the kernel takes key padding
            return original()
        backend = None if self.backend == "auto" else self.backend
        if self.self_attention_8bit != "off" and qh.shape[2] == kh.shape[2] and \
                attention_kernels.select_8bit_path(qh, kh, vh, self.self_attention_8bit, backend) == "triton":
            out = attention_kernels.attention_8bit(qh, kh, vh, qk_format=self.self_attention_8bit, backend="triton")
            return out if skip_output_reshape else out.transpose(1, 2).reshape(b, -1, heads * d)
        if attention_kernels.select_path("single", qh, (kh, vh), (), kh.shape[2], backend) != "triton":
            return original()
        out = attention_kernels.attention(qh, kh, vh, backend="triton")
        if skip_output_reshape:
            return out
        return out.transpose(1, 2).reshape(b, -1, heads * d)


class SwiftStepTritonAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SwiftStepTritonAttention",
            display_name="SwiftStep Triton Attention",
            category="swiftstep/speed",
            description="Runs the model's attention through swiftstep's Triton kernels where they are supported and "
                        "measured faster (CUDA); elsewhere ComfyUI's own attention runs unchanged.",
            inputs=[
                io.Model.Input("model", tooltip="Any model whose attention uses ComfyUI's optimized_attention. "
                                                "Not modified: the node returns a patched clone."),
                io.Combo.Input("backend", options=list(BACKENDS), default="auto",
                               tooltip="auto: Triton only where measured faster (docs/attention-kernels.md), else ComfyUI's "
                                       "attention. triton: always the Triton kernel where it can run (CUDA)."),
                io.Combo.Input("self_attention_8bit", options=list(EIGHT_BIT), default="off",
                               tooltip="Opt-in 8-bit self-attention on sm89+ GPUs (Ada/Hopper): int8 Q·Kᵀ + e4m3 P·V "
                                       "(cosine ≥ 0.999 vs exact in tests), or e4m3 throughout (≈ 0.9987). Faster, "
                                       "slightly less exact; elsewhere ComfyUI's attention runs."),
            ],
            outputs=[io.Model.Output(tooltip="The patched clone.")],
        )

    @classmethod
    def execute(cls, model, backend, self_attention_8bit="off") -> io.NodeOutput:
        if backend not in BACKENDS:
            raise ValueError(f"SwiftStepTritonAttention: input `backend` must be one of {BACKENDS}, got {backend!r}.")
        if self_attention_8bit not in EIGHT_BIT:
            raise ValueError(f"SwiftStepTritonAttention: input `self_attention_8bit` must be one of {EIGHT_BIT}, got "
                             f"{self_attention_8bit!r}.")
        m = model.clone()
        # Not `set_model_optimized_attention` (ComfyUI ≥ 0.33's setter): it drops the first argument, ComfyUI's own
        # attention function, which the override falls back to where Triton is not picked. New dicts, not the
        # clone's, because ComfyUI ≥ 0.33 no longer deep-copies model_options on clone().
        options = dict(m.model_options.get("transformer_options", {}))
        options["optimized_attention_override"] = TritonAttentionOverride(backend, self_attention_8bit)
        m.model_options = {**m.model_options, "transformer_options": options}
        return io.NodeOutput(m)


NODES = [SwiftStepTritonAttention]
