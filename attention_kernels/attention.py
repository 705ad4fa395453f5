"""`attention`, `dual_attention`, `prefix_dual_attention`: the Triton kernels where they are supported and measured
(or, for `prefix_dual_attention`, counted) faster, SDPA elsewhere.

All take SDPA's layout and conventions: q [B, H, Lq, D], k/v [B, H, Lk, D], `mask` a key-padding mask (bool,
True = attend, or additive float) broadcastable to [B, H, 1, Lk], `scale` default 1/√D. The SDPA path is exact
PyTorch; the Triton path agrees with it to float rounding (tests: fp32 ≤ 1e-4, fp16 ≤ 3e-3 relative).

Path choice, per call: `backend=` argument, else the `SWIFTSTEP_ATTENTION` environment variable (`auto` | `triton` |
`sdpa`), else `auto`. `auto` picks Triton only where an H100 measurement says it wins (shared/notes/
triton_attention.md): the fused dual kernel for short negative/positive contexts (≤ 300 keys: 27 µs vs 40 µs for two
cuDNN calls at SDXL's 4096×77, d64, fp16), in fp16/bf16 (float32 stays on exact SDPA). For single attention cuDNN SDPA is faster (0.8–0.93× for Triton), so
`auto` keeps SDPA. `prefix_dual_attention` (the image queries of a joint-attention DiT against two text prefixes
and one set of image keys) takes its kernel on CUDA fp16/bf16 by a multiply-add count alone — no GPU has timed it
yet; the reason string says so. Each distinct choice is logged once with its reason; `last_path()` returns the latest.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from .attention_ref import check_prefix_dual_inputs, prefix_dual_attention_ref

logger = logging.getLogger("swiftstep.attention_kernels")

BACKENDS = ("auto", "triton", "sdpa")
ENV = "SWIFTSTEP_ATTENTION"
DUAL_MAX_KEYS = 300  # above this, two cuDNN calls beat the fused kernel (B1·H24·4096×512·d128 bf16 on H100)
_logged: set = set()
_last: dict = {}


def _triton_module():
    try:
        from . import flash_attn_triton
    except ImportError as e:  # no triton wheel on this platform
        return None, f"triton is not importable ({e})"
    return flash_attn_triton, ""


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _unsupported(q: torch.Tensor, tensors, masks) -> str:
    """Why the Triton path cannot run these inputs ('' when it can)."""
    if not (q.is_cuda or (_interpreting() and q.device.type == "cpu")):
        return f"inputs on {q.device.type} (Triton needs CUDA)"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype}"
    if q.shape[-1] > 256:
        return f"head_dim {q.shape[-1]} > 256"
    if any(t.dtype != q.dtype or t.device != q.device for t in tensors):
        return "mixed dtypes/devices"
    for m in masks:
        if m is not None and m.dim() == 4 and m.shape[2] != 1:
            return "per-query mask (only key-padding masks)"
    module, why = _triton_module()
    return why if module is None else ""


def auto_choice(kind: str, dtype: torch.dtype, lk: int) -> tuple[str, str]:
    """`auto`'s (path, reason) for supported CUDA inputs: Triton only where a measurement says it wins."""
    if dtype == torch.float32:  # the exact path: fp32 products without tensor cores; only fp16/bf16 were measured
        return "sdpa", "float32 inputs: exact SDPA (the Triton kernels are measured faster in fp16/bf16 only)"
    if kind == "dual" and lk <= DUAL_MAX_KEYS:
        return "triton", f"fused dual kernel reads Q once (contexts ≤ {DUAL_MAX_KEYS} keys)"
    if kind == "dual":
        return "sdpa", f"contexts of {lk} keys: two cuDNN calls measured faster than the fused kernel"
    if kind == "prefix_dual":
        return "triton", ("shared-key dual kernel: q·K_imgᵀ and P·V_img once for both prompts (0.56× the multiply-adds "
                          "of two SDPA calls at FLUX 1024², counted; not yet measured on a GPU)")
    return "sdpa", "cuDNN SDPA measured faster than the Triton kernel for single attention"


def select_path(kind: str, q, tensors, masks, lk: int, backend: str | None = None) -> str:
    """'triton' or 'sdpa' for a call of `kind` ('single' | 'dual' | 'prefix_dual'); logs each distinct choice once,
    with why."""
    backend = backend or os.environ.get(ENV, "auto")
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS} (argument or ${ENV}), got {backend!r}.")
    if backend == "sdpa":
        path, reason = "sdpa", f"forced ({ENV} or backend=)"
    else:
        why = _unsupported(q, tensors, masks)
        if backend == "triton":
            if why:
                raise ValueError(f"Triton {kind} attention was forced but cannot run: {why}.")
            path, reason = "triton", "forced"
        elif why:
            path, reason = "sdpa", why
        elif not q.is_cuda:  # the CPU interpreter is for tests, never an automatic choice
            path, reason = "sdpa", f"inputs on {q.device.type} (Triton needs CUDA)"
        else:
            path, reason = auto_choice(kind, q.dtype, lk)
    key = (kind, path, reason)
    if key not in _logged:
        _logged.add(key)
        logger.info("swiftstep %s attention: %s (%s)", kind, path, reason)
    _last.update(kind=kind, path=path, reason=reason)
    return path


def last_path() -> dict:
    """{'kind', 'path', 'reason'} of the latest call."""
    return dict(_last)


def _sdpa_mask(mask):
    if mask is None or mask.dim() == 4:
        return mask
    return mask[:, None, None, :] if mask.dim() == 2 else mask[:, :, None, :]


def attention(q, k, v, mask=None, scale=None, backend: str | None = None) -> torch.Tensor:
    """softmax(q·kᵀ·scale + mask)·v, [B, H, Lq, D] → [B, H, Lq, D]."""
    if select_path("single", q, (k, v), (mask,), k.shape[2], backend) == "triton":
        return _triton_module()[0].flash_attention(q, k, v, mask, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_sdpa_mask(mask), scale=scale)


FP8_CAPABILITY = (8, 9)  # e4m3 MMA: Ada (sm89) and Hopper (sm90) onwards


def select_8bit_path(q, k, v, qk_format: str = "int8", backend: str | None = None) -> str:
    """'triton' where the 8-bit kernel can run (CUDA sm89+ with Triton, or forced under the CPU interpreter), else
    'sdpa'; logs each distinct choice once, with why."""
    backend = backend or os.environ.get(ENV, "auto")
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS} (argument or ${ENV}), got {backend!r}.")
    why = "forced (backend='sdpa')" if backend == "sdpa" else _unsupported(q, (k, v), ())
    if not why and q.is_cuda and torch.cuda.get_device_capability(q.device) < FP8_CAPABILITY:
        why = f"GPU sm{''.join(map(str, torch.cuda.get_device_capability(q.device)))} has no e4m3 MMA (needs sm89+)"
    if not why and not q.is_cuda and backend != "triton":
        why = f"inputs on {q.device.type} (Triton needs CUDA)"
    if why and backend == "triton":
        raise ValueError(f"8-bit Triton attention was forced but cannot run: {why}.")
    path = "sdpa" if why else "triton"
    reason = why or f"8-bit kernel, Q·Kᵀ in {qk_format}, P·V in e4m3 (opt-in)"
    key = ("8bit", path, reason)
    if key not in _logged:
        _logged.add(key)
        logger.info("swiftstep 8-bit attention: %s (%s)", path, reason)
    _last.update(kind="8bit", path=path, reason=reason)
    return path


def attention_8bit(q, k, v, scale=None, qk_format: str = "int8", backend: str | None = None) -> torch.Tensor:
    """Opt-in 8-bit self-attention (no mask): Q·Kᵀ in int8 (or e4m3) with one scale per token, P·V in e4m3 with V
    scaled per channel (SageAttention2's recipe; `flash_attn_triton._fp8_fwd_kernel`). On GPUs without e4m3 MMA, on
    the CPU, or without Triton it runs exact SDPA instead and logs why once. Accuracy against exact attention on
    random inputs: cosine ≥ 0.999 with int8 Q·Kᵀ, ≈ 0.9987 with e4m3 (tests/attention_kernels/test_fp8_attention.py)."""
    if select_8bit_path(q, k, v, qk_format, backend) == "triton":
        return _triton_module()[0].flash_attention_fp8(q, k, v, scale, qk_format)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def dual_attention(q, k_pos, v_pos, k_neg, v_neg, alpha: float | None = None, mask_pos=None, mask_neg=None,
                   scale=None, backend: str | None = None):
    """NASA's two branches with one query: `Z+ − α·Z−` when `alpha` is given (the fused epilogue of SNOOPI eq. 9),
    else `(Z+, Z−)` (NAG: its norm spans all heads, so the caller combines)."""
    lk = max(k_pos.shape[2], k_neg.shape[2])
    if select_path("dual", q, (k_pos, v_pos, k_neg, v_neg), (mask_pos, mask_neg), lk, backend) == "triton":
        return _triton_module()[0].dual_flash_attention(q, k_pos, v_pos, k_neg, v_neg, alpha, mask_pos, mask_neg,
                                                        scale)
    z_pos = F.scaled_dot_product_attention(q, k_pos, v_pos, attn_mask=_sdpa_mask(mask_pos), scale=scale)
    z_neg = F.scaled_dot_product_attention(q, k_neg, v_neg, attn_mask=_sdpa_mask(mask_neg), scale=scale)
    return (z_pos, z_neg) if alpha is None else torch.sub(z_pos, z_neg, alpha=alpha)


def prefix_dual_attention(q, k_img, v_img, k_pos, v_pos, k_neg, v_neg, mask_pos=None, mask_neg=None, scale=None,
                          alpha: float | None = None, backend: str | None = None):
    """A joint-attention block's image queries under two prompts that share the image keys:
    Z± = softmax(q·[K_txt±; K_img]ᵀ·scale + [mask±; 0])·[V_txt±; V_img]. Returns `(Z+, Z−)` (NAG: its norm spans
    all heads, so the caller combines), or `Z+ − α·Z−` when `alpha` is given (NASA, SNOOPI eq. 9).

    q [B, H, Lq, D] (the image tokens' queries), k_img/v_img [B, H, Limg, D], k_pos/v_pos [B, H, Lt+, D],
    k_neg/v_neg [B, H, Lt−, D]: the two prefixes may differ in length. `mask_pos`/`mask_neg`: text key padding (bool
    True = attend, or additive float), [B, Lt±], [B, H, Lt±] or [B, H, 1, Lt±] ([B, H, Lq, Lt±] runs on SDPA); the
    image keys are never masked, so a fully masked prefix is well defined (attention over the image alone). The
    Triton kernel scores the image keys once for both prompts (`flash_attn_triton.prefix_dual_flash_attention`);
    the SDPA path concatenates keys and calls SDPA twice (`attention_ref.prefix_dual_attention_ref`, exact). Outputs
    in q's dtype."""
    check_prefix_dual_inputs(q, k_img, v_img, k_pos, v_pos, k_neg, v_neg, mask_pos, mask_neg)
    lk = k_img.shape[2] + max(k_pos.shape[2], k_neg.shape[2])
    if select_path("prefix_dual", q, (k_img, v_img, k_pos, v_pos, k_neg, v_neg), (mask_pos, mask_neg), lk,
                   backend) == "triton":
        return _triton_module()[0].prefix_dual_flash_attention(q, k_img, v_img, k_pos, v_pos, k_neg, v_neg, mask_pos,
                                                               mask_neg, scale, alpha)
    return prefix_dual_attention_ref(q, k_img, v_img, k_pos, v_pos, k_neg, v_neg, mask_pos, mask_neg, scale, alpha)
