"""SwiftStepTritonAttention: route a ComfyUI model's attention through `swiftstep.kernels`, per model and reversibly.

Uses ComfyUI's per-model `optimized_attention_override` hook (every `@wrap_attn` attention, UNets and DiTs alike)
on a clone; where dispatch keeps SDPA (CPU, unsupported shape, or no measured win) ComfyUI's own attention runs.
"""

from __future__ import annotations

from comfy_api.latest import io

from .. import kernels

BACKENDS = ("auto", "triton")


class TritonAttentionOverride:
    """`fn(original_func, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
    skip_output_reshape=False, **kwargs)`: the Triton kernel where dispatch picks it, else `original_func`."""

    def __init__(self, backend: str):
        self.backend = backend

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
        if kernels.select_path("single", qh, (kh, vh), (), kh.shape[2],
                               None if self.backend == "auto" else self.backend) != "triton":
            return original()
        out = kernels.attention(qh, kh, vh, backend="triton")
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
                               tooltip="auto: Triton only where measured faster (see README), else ComfyUI's "
                                       "attention. triton: always the Triton kernel where it can run (CUDA)."),
            ],
            outputs=[io.Model.Output(tooltip="The patched clone.")],
        )

    @classmethod
    def execute(cls, model, backend) -> io.NodeOutput:
        if backend not in BACKENDS:
            raise ValueError(f"SwiftStepTritonAttention: input `backend` must be one of {BACKENDS}, got {backend!r}.")
        m = model.clone()
        options = dict(m.model_options.get("transformer_options", {}))
        options["optimized_attention_override"] = TritonAttentionOverride(backend)
        m.model_options = {**m.model_options, "transformer_options": options}
        return io.NodeOutput(m)


NODES = [SwiftStepTritonAttention]
