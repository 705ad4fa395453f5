"""Triton flash-attention forward kernels for diffusion models: plain attention, fused dual (NASA) attention, and
the shared-key dual attention of joint-attention DiTs (two text prefixes, one set of image keys).

Algorithm: FlashAttention-2's forward (Dao 2023, Alg. 1) — one program per (query tile, batch·head), streaming
K/V tiles with an online softmax in base 2: the score scale carries log2(e) so `exp2` replaces `exp`, the running
output is rescaled before each P·V product, and the row sums divide once in the epilogue. Non-causal only (diffusion).

The dual kernel loads each Q tile once and runs two online softmaxes, over (K+, V+) and (K−, V−) of different
lengths, then either writes `Z+ − α·Z−` (SNOOPI eq. 9, fused epilogue) or both outputs (for NAG, whose per-token
norm spans all heads and is applied by the caller).

Layout: [B, H, L, D] with arbitrary strides; any Lq/Lk (ragged tails masked); head dims up to 256 (padded to a
power of two in registers, masked in memory). Masks: key-padding, broadcastable to [B, H, 1, Lk], as an additive
float bias in natural-log units (0 keep, −inf drop). Host wrappers: `flash_attention`, `dual_flash_attention`,
`prefix_dual_flash_attention`, `flash_attention_fp8`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .attention_ref import check_prefix_dual_inputs

LOG2E = 1.4426950408889634  # 1/ln 2: the kernels use exp2


@triton.jit
def _softmax_step(qk, n_ok, m_i):
    """One online-softmax update for a [BM, BN] score tile in log2 units (ragged key tail masked): the new row
    maxima, the tile's unnormalised probabilities and the factor that rescales what was accumulated before."""
    qk = tl.where(n_ok[None, :], qk, float("-inf"))
    m_ij = tl.maximum(m_i, tl.max(qk, 1))
    # a row whose keys so far are all masked (left-padded text) has m = −inf: exponents against 0 there, not
    # −inf − (−inf) = NaN, so it contributes nothing until its first unmasked key
    m_ref = tl.where(m_ij == float("-inf"), 0.0, m_ij)
    return tl.math.exp2(qk - m_ref[:, None]), tl.math.exp2(m_i - m_ref), m_ij


@triton.jit
def _attend(q, K, V, bias_ptr, stride_kn, stride_kd, stride_vn, stride_vd, stride_bn, LK, qk_scale, offs_d,
            HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
            HAS_MASK: tl.constexpr, PRECISION: tl.constexpr):
    """softmax(q·Kᵀ)·V for one query tile [BM, D], by an online softmax over all K/V tiles (fp32 accumulation)."""
    acc, m_i, l_i = _kv_state(q, K, V, bias_ptr, stride_kn, stride_kd, stride_vn, stride_vd, stride_bn, LK, qk_scale,
                              offs_d, HEAD_DIM, BLOCK_M, BLOCK_D, BLOCK_N, HAS_MASK, PRECISION)
    return acc / l_i[:, None]


@triton.jit
def _q_tile(Q, stride_qb, stride_qh, stride_qm, stride_qd, H, LQ, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
            BLOCK_M: tl.constexpr):
    """This program's (batch, head) and query tile [BM, D] (ragged rows and padded head dims masked to 0)."""
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < LQ
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    return b, h, q, offs_m, offs_d, m_ok, d_ok


@triton.jit
def _flash_fwd_kernel(Q, K, V, Out, Bias,
                      stride_qb, stride_qh, stride_qm, stride_qd,
                      stride_kb, stride_kh, stride_kn, stride_kd,
                      stride_vb, stride_vh, stride_vn, stride_vd,
                      stride_ob, stride_oh, stride_om, stride_od,
                      stride_bb, stride_bh, stride_bn,
                      H, LQ, LK, sm_scale,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      HAS_MASK: tl.constexpr, PRECISION: tl.constexpr):
    b, h, q, offs_m, offs_d, m_ok, d_ok = _q_tile(Q, stride_qb, stride_qh, stride_qm, stride_qd, H, LQ, HEAD_DIM,
                                                  BLOCK_D, BLOCK_M)
    out = _attend(q, K + b * stride_kb + h * stride_kh, V + b * stride_vb + h * stride_vh,
                  Bias + b * stride_bb + h * stride_bh, stride_kn, stride_kd, stride_vn, stride_vd, stride_bn, LK,
                  sm_scale * 1.4426950408889634, offs_d, HEAD_DIM, BLOCK_M, BLOCK_D, BLOCK_N, HAS_MASK, PRECISION)
    tl.store(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             out.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


@triton.jit
def _dual_fwd_kernel(Q, KP, VP, KN, VN, Out, OutNeg, BiasP, BiasN,
                     stride_qb, stride_qh, stride_qm, stride_qd,
                     stride_kpb, stride_kph, stride_kpn, stride_kpd,
                     stride_vpb, stride_vph, stride_vpn, stride_vpd,
                     stride_knb, stride_knh, stride_knn, stride_knd,
                     stride_vnb, stride_vnh, stride_vnn, stride_vnd,
                     stride_ob, stride_oh, stride_om, stride_od,
                     stride_bpb, stride_bph, stride_bpn, stride_bnb, stride_bnh, stride_bnn,
                     H, LQ, LKP, LKN, sm_scale, alpha,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     HAS_MASK_P: tl.constexpr, HAS_MASK_N: tl.constexpr, FUSE_NASA: tl.constexpr,
                     PRECISION: tl.constexpr):
    b, h, q, offs_m, offs_d, m_ok, d_ok = _q_tile(Q, stride_qb, stride_qh, stride_qm, stride_qd, H, LQ, HEAD_DIM,
                                                  BLOCK_D, BLOCK_M)  # Q read once for both branches
    qk_scale = sm_scale * 1.4426950408889634

    z_pos = _attend(q, KP + b * stride_kpb + h * stride_kph, VP + b * stride_vpb + h * stride_vph,
                    BiasP + b * stride_bpb + h * stride_bph, stride_kpn, stride_kpd, stride_vpn, stride_vpd,
                    stride_bpn, LKP, qk_scale, offs_d, HEAD_DIM, BLOCK_M, BLOCK_D, BLOCK_N, HAS_MASK_P, PRECISION)
    z_neg = _attend(q, KN + b * stride_knb + h * stride_knh, VN + b * stride_vnb + h * stride_vnh,
                    BiasN + b * stride_bnb + h * stride_bnh, stride_knn, stride_knd, stride_vnn, stride_vnd,
                    stride_bnn, LKN, qk_scale, offs_d, HEAD_DIM, BLOCK_M, BLOCK_D, BLOCK_N, HAS_MASK_N, PRECISION)
    io_mask = m_ok[:, None] & d_ok[None, :]
    o_off = b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    if FUSE_NASA:  # SNOOPI eq. 9, before W_o
        tl.store(Out + o_off, (z_pos - alpha * z_neg).to(Out.dtype.element_ty), mask=io_mask)
    else:
        tl.store(Out + o_off, z_pos.to(Out.dtype.element_ty), mask=io_mask)
        tl.store(OutNeg + o_off, z_neg.to(OutNeg.dtype.element_ty), mask=io_mask)


def default_config(head_dim: int, lk: int, dtype: torch.dtype = torch.float16) -> dict:
    """Block sizes. fp16/bf16 from the H100 measurements in shared/notes/triton_attention.md §3: cross-attention
    (≤ 128 keys) BLOCK_N 32; long sequences (128, 64) at d ≤ 64, (64, 64) up to d 128. Head dims above 128 (padded to
    256 in registers) and fp32 (the exact path: fp32 products without tensor cores, tiles twice the bytes) take
    small tiles so that every configuration fits the 99 KiB of shared memory per block of sm86/sm89 GPUs, without
    register spills — checked by compiling for sm80/sm89/sm90 (tests/attention_kernels/test_compile_targets.py,
    bench/kernel_resources.py); the previous larger tiles needed up to 208 KiB there."""
    if dtype == torch.float32:
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
    if lk <= 128 or head_dim > 128:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    if head_dim <= 64:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)


def _bias(mask: torch.Tensor | None, q: torch.Tensor, lk: int):
    """Key-padding mask → additive float32 bias [B or 1, H or 1, Lk] and its strides (broadcast dims stride 0)."""
    if mask is None:
        return q, (0, 0, 0), False  # a dummy pointer; never read
    if mask.dim() == 4:
        if mask.shape[2] != 1:
            raise ValueError(f"Triton attention takes key-padding masks [B, H, 1, Lk]; got a {tuple(mask.shape)} "
                             f"per-query mask (use the SDPA path).")
        mask = mask[:, :, 0]
    elif mask.dim() == 2:
        mask = mask[:, None]
    elif mask.dim() != 3:
        raise ValueError(f"mask must be [B, Lk], [B, H, Lk] or [B, H, 1, Lk]; got {tuple(mask.shape)}.")
    if mask.shape[-1] != lk:
        raise ValueError(f"mask has {mask.shape[-1]} keys; the keys have {lk}.")
    bias = torch.zeros(mask.shape, dtype=torch.float32, device=q.device).masked_fill(~mask, float("-inf")) \
        if mask.dtype == torch.bool else mask.to(torch.float32)
    strides = tuple(0 if bias.shape[i] == 1 else bias.stride(i) for i in range(3))
    return bias, strides, True


def _precision(q: torch.Tensor) -> str:
    # fp32 inputs: exact fp32 products ("ieee"); TF32 would cost ~1e-3 relative error, beyond the exact-fallback promise
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _check(q, *kv):
    if q.dim() != 4 or any(t.dim() != 4 for t in kv):
        raise ValueError("Triton attention takes [B, H, L, D] tensors.")
    if q.shape[-1] > 256:
        raise ValueError(f"Triton attention supports head_dim ≤ 256, got {q.shape[-1]}.")
    for t in kv:
        if t.shape[0] != q.shape[0] or t.shape[1] != q.shape[1] or t.shape[3] != q.shape[3] or t.dtype != q.dtype:
            raise ValueError(f"k/v {tuple(t.shape)} {t.dtype} do not match q {tuple(q.shape)} {q.dtype}.")


def _block_d(head_dim: int, minimum: int = 16) -> int:
    """Head dim padded to a power of two in registers (≥ 16 for fp16 MMAs, ≥ 32 for 8-bit ones)."""
    return max(minimum, triton.next_power_of_2(head_dim))


def flash_launch(q, k, v, mask=None, scale=None, config: dict | None = None):
    """(kernel, grid, args, constexprs, out) of one `flash_attention` call: the single place its launch is built,
    shared by the launch itself and by the ahead-of-time compile check (`attention_kernels.targets`)."""
    _check(q, k, v)
    B, H, LQ, D = q.shape
    LK = k.shape[2]
    cfg = dict(config or default_config(D, LK, q.dtype))
    out = torch.empty_like(q)
    bias, bs, has_mask = _bias(mask, q, LK)
    grid = (triton.cdiv(LQ, cfg["BLOCK_M"]), B * H)
    args = (q, k, v, out, bias, *q.stride(), *k.stride(), *v.stride(), *out.stride(), *bs,
            H, LQ, LK, float(scale if scale is not None else 1.0 / math.sqrt(D)))
    meta = dict(HEAD_DIM=D, BLOCK_D=_block_d(D), HAS_MASK=has_mask, PRECISION=_precision(q), **cfg)
    return _flash_fwd_kernel, grid, args, meta, out


def flash_attention(q, k, v, mask=None, scale=None, config: dict | None = None) -> torch.Tensor:
    """softmax(q·kᵀ·scale + mask)·v for [B, H, Lq, D] / [B, H, Lk, D]; same dtype as q."""
    kernel, grid, args, meta, out = flash_launch(q, k, v, mask, scale, config)
    kernel[grid](*args, **meta)
    return out


def dual_launch(q, k_pos, v_pos, k_neg, v_neg, alpha: float | None = None, mask_pos=None, mask_neg=None,
                scale=None, config: dict | None = None):
    """(kernel, grid, args, constexprs, (out, out_neg)) of one `dual_flash_attention` call."""
    _check(q, k_pos, v_pos, k_neg, v_neg)
    B, H, LQ, D = q.shape
    cfg = dict(config or default_config(D, max(k_pos.shape[2], k_neg.shape[2]), q.dtype))
    out = torch.empty_like(q)
    out_neg = out if alpha is not None else torch.empty_like(q)
    bias_p, bsp, has_p = _bias(mask_pos, q, k_pos.shape[2])
    bias_n, bsn, has_n = _bias(mask_neg, q, k_neg.shape[2])
    grid = (triton.cdiv(LQ, cfg["BLOCK_M"]), B * H)
    args = (q, k_pos, v_pos, k_neg, v_neg, out, out_neg, bias_p, bias_n,
            *q.stride(), *k_pos.stride(), *v_pos.stride(), *k_neg.stride(), *v_neg.stride(),
            *out.stride(), *bsp, *bsn, H, LQ, k_pos.shape[2], k_neg.shape[2],
            float(scale if scale is not None else 1.0 / math.sqrt(D)), float(alpha if alpha is not None else 0.0))
    meta = dict(HEAD_DIM=D, BLOCK_D=_block_d(D), HAS_MASK_P=has_p, HAS_MASK_N=has_n, FUSE_NASA=alpha is not None,
                PRECISION=_precision(q), **cfg)
    return _dual_fwd_kernel, grid, args, meta, (out, out_neg)


def dual_flash_attention(q, k_pos, v_pos, k_neg, v_neg, alpha: float | None = None, mask_pos=None, mask_neg=None,
                         scale=None, config: dict | None = None):
    """Both branches with one read of Q: `Z+ − α·Z−` when `alpha` is given, else `(Z+, Z−)`."""
    kernel, grid, args, meta, (out, out_neg) = dual_launch(q, k_pos, v_pos, k_neg, v_neg, alpha, mask_pos,
                                                           mask_neg, scale, config)
    kernel[grid](*args, **meta)
    return out if alpha is not None else (out, out_neg)


# ---------------------------------------------------------------- 8-bit self-attention (Hopper, opt-in)
FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8_MAX = 127.0
QK_FORMATS = ("int8", "e4m3")


@triton.jit
def _e4m3_round(x):
    """Round fp32 x to the nearest e4m3 value (ties away from zero), in fp32 arithmetic. Only for the CPU interpreter:
    its fp32→e4m3 cast loses the exponent carry when rounding up across a power of two (127.9 → 64, not 128); GPUs
    convert in hardware (round to nearest even)."""
    a = tl.abs(x)
    e = tl.maximum(tl.math.floor(tl.math.log2(tl.maximum(a, 1.0 / 512.0))), -6.0)  # subnormals: step 2^-9
    step = tl.math.exp2(e - 3.0)
    r = tl.minimum(tl.math.floor(a / step + 0.5) * step, 448.0)
    return tl.where(x < 0, -r, r)


@triton.jit
def _fp8_fwd_kernel(Q8, K8, V8, Out, QS, KS, VS,
                    stride_qb, stride_qh, stride_qm, stride_qd,
                    stride_kb, stride_kh, stride_kn, stride_kd,
                    stride_vb, stride_vh, stride_vn, stride_vd,
                    stride_ob, stride_oh, stride_om, stride_od,
                    H, LQ, LK, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    QK_INT8: tl.constexpr, EMULATE: tl.constexpr):
    """FlashAttention-2 forward on 8-bit operands. Q and K: int8 (QK_INT8) or e4m3, one scale per token, dequantised
    in the fp32 scores (s_ij = q8_i·k8_j · sq_i · sk_j); P·448 in e4m3 (its dequantisation folds into the row-sum
    division); V e4m3 with one scale per channel (folded into the epilogue). EMULATE (the CPU interpreter) upcasts
    the e4m3 operands to fp16 before the P·V dot — exact: every e4m3 value is an fp16 value, both accumulate in
    fp32 — and rounds P with `_e4m3_round`."""
    b, h, q, offs_m, offs_d, m_ok, d_ok = _q_tile(Q8, stride_qb, stride_qh, stride_qm, stride_qd, H, LQ, HEAD_DIM,
                                                  BLOCK_D, BLOCK_M)
    bh = b * H + h
    q_scale = tl.load(QS + bh * LQ + offs_m, mask=m_ok, other=0.0) * qk_scale
    if EMULATE and not QK_INT8:
        q = q.to(tl.float16)
    K = K8 + b * stride_kb + h * stride_kh
    V = V8 + b * stride_vb + h * stride_vh
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(0, LK, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < LK
        k = tl.load(K + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                    mask=d_ok[:, None] & n_ok[None, :], other=0.0)  # [D, BN]
        k_scale = tl.load(KS + bh * LK + cols, mask=n_ok, other=0.0)
        if QK_INT8:
            qk = tl.dot(q, k, out_dtype=tl.int32).to(tl.float32)
        else:
            if EMULATE:
                k = k.to(tl.float16)
            qk = tl.dot(q, k, out_dtype=tl.float32)
        qk = qk * q_scale[:, None] * k_scale[None, :]  # log2 units
        p, alpha, m_ij = _softmax_step(qk, n_ok, m_i)
        acc = acc * alpha[:, None]
        v = tl.load(V + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # [BN, D] e4m3 (V stored channel-major)
        if EMULATE:
            acc = tl.dot(_e4m3_round(p * 448.0).to(tl.float16), v.to(tl.float16), acc, out_dtype=tl.float32)
        else:
            acc = tl.dot((p * 448.0).to(tl.float8e4nv), v, acc, out_dtype=tl.float32)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_ij
    v_scale = tl.load(VS + bh * HEAD_DIM + offs_d, mask=d_ok, other=0.0)
    out = acc / (l_i[:, None] * 448.0) * v_scale[None, :]
    tl.store(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             out.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def quantize_tokens(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit copy of x [B, H, L, D] with one scale per token: x8 = x / s, s = amax(|x_token|) / 127 (int8, rounded
    to nearest) or / 448 (e4m3)."""
    x = x.float()
    top = INT8_MAX if fmt == "int8" else FP8_MAX
    scale = (x.abs().amax(-1) / top).clamp_min(1e-12)  # [B, H, L]
    y = x / scale[..., None]
    x8 = y.round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8) if fmt == "int8" else y.to(torch.float8_e4m3fn)
    return x8, scale.contiguous()


def quantize_8bit(q, k, v, qk_format: str = "int8"):
    """What the 8-bit kernel reads: Q per token; K smoothed (minus its per-head mean over keys: softmax is invariant
    to it, and it narrows K's range) and per token; V e4m3 per channel, stored channel-major (Hopper's FP8 MMA wants
    the P·V operand K-major)."""
    if qk_format not in QK_FORMATS:
        raise ValueError(f"qk_format must be one of {QK_FORMATS}, got {qk_format!r}.")
    q8, qs = quantize_tokens(q, qk_format)
    k8, ks = quantize_tokens(k.float() - k.float().mean(dim=2, keepdim=True), qk_format)
    vs = (v.float().abs().amax(dim=2) / FP8_MAX).clamp_min(1e-12)  # [B, H, D]
    v8 = (v.float() / vs[:, :, None, :]).transpose(-1, -2).contiguous().to(torch.float8_e4m3fn).transpose(-1, -2)
    return q8, qs, k8, ks, v8, vs.contiguous()


def fp8_config(head_dim: int) -> dict:
    """Block sizes for the 8-bit kernel (BLOCK_N ≥ 32 for 8-bit MMA shapes). Untuned: no GPU measured them yet."""
    if head_dim <= 64:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2)


def fp8_launch(q, k, v, scale=None, qk_format: str = "int8", config: dict | None = None,
               emulate: bool | None = None):
    """(kernel, grid, args, constexprs, out) of one `flash_attention_fp8` call; `emulate` defaults to "not on CUDA"
    (the CPU interpreter)."""
    _check(q, k, v)
    B, H, LQ, D = q.shape
    LK = k.shape[2]
    cfg = dict(config or fp8_config(D))
    q8, qs, k8, ks, v8, vs = quantize_8bit(q, k, v, qk_format)
    out = torch.empty_like(q)
    grid = (triton.cdiv(LQ, cfg["BLOCK_M"]), B * H)
    args = (q8, k8, v8, out, qs, ks, vs, *q8.stride(), *k8.stride(), *v8.stride(), *out.stride(),
            H, LQ, LK, float(scale if scale is not None else 1.0 / math.sqrt(D)) * LOG2E)
    meta = dict(HEAD_DIM=D, BLOCK_D=_block_d(D, 32), QK_INT8=qk_format == "int8",
                EMULATE=(not q.is_cuda) if emulate is None else emulate, **cfg)
    return _fp8_fwd_kernel, grid, args, meta, out


def flash_attention_fp8(q, k, v, scale=None, qk_format: str = "int8", config: dict | None = None) -> torch.Tensor:
    """softmax(q·kᵀ·scale)·v with 8-bit operands (self-attention: no mask); q/k/v fp16/bf16/fp32 [B, H, L, D];
    output in q's dtype. Head dims are padded to ≥ 32 in registers (8-bit MMAs reduce over 32). `qk_format`:
    "int8" (SageAttention2's choice; cosine ≥ 0.999 vs exact in the tests) or "e4m3" (pure FP8: ≈ 0.9987 on random
    inputs, below that)."""
    kernel, grid, args, meta, out = fp8_launch(q, k, v, scale, qk_format, config)
    kernel[grid](*args, **meta)
    return out


# ---------------------------------------------------------------- shared-key dual attention (joint-attention DiTs)
# The image queries of a joint-attention block (FLUX, SD3, Qwen-Image, Z-Image) attend to [text; image] keys; with a
# negative prompt as a second text stream the two attentions share every image key and value and differ only in the
# text prefix. Attention over a union of key sets is the merge of per-set states (m = row max, l = row sum,
# acc = unnormalised output), as split-KV decoding merges partial results (FlashDecoding, Dao et al. 2023;
# FlashInfer's cascade attention, Ye et al. 2024, for a shared *prefix*; here the shared part is the image suffix):
#   Z± = (acc_img·2^(m_img − m) + acc_txt±·2^(m_txt± − m)) / (l_img·2^(m_img − m) + l_txt±·2^(m_txt± − m)),
#   m = max(m_img, m_txt±).
# So q·K_imgᵀ, its exponentials and P·V_img are computed once for both prompts, not twice as by two SDPA calls.


@triton.jit
def _kv_state(q, K, V, bias_ptr, stride_kn, stride_kd, stride_vn, stride_vd, stride_bn, LK, qk_scale, offs_d,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
              HAS_MASK: tl.constexpr, PRECISION: tl.constexpr):
    """The online softmax over all K/V tiles, returning its unnormalised state (acc [BM, D], m [BM], l [BM], log2
    units): `_attend` divides it out, `_merge` combines two. A row whose keys so far are all masked (a fully padded
    text prefix, or a left-padded first tile) keeps m = −inf, l = 0, acc = 0 (`_softmax_step`)."""
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    for start_n in range(0, LK, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < LK
        k = tl.load(K + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                    mask=d_ok[:, None] & n_ok[None, :], other=0.0)  # [D, BN]
        qk = tl.dot(q, k, input_precision=PRECISION) * qk_scale  # [BM, BN], log2 units
        if HAS_MASK:
            bias = tl.load(bias_ptr + cols * stride_bn, mask=n_ok, other=0.0).to(tl.float32)
            qk = qk + bias[None, :] * 1.4426950408889634
        p, alpha, m_ij = _softmax_step(qk, n_ok, m_i)  # [BM, BN], [BM], [BM]
        acc = acc * alpha[:, None]
        v = tl.load(V + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # [BN, D]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_ij
    return acc, m_i, l_i


@triton.jit
def _merge(acc_a, m_a, l_a, acc_b, m_b, l_b):
    """Normalised attention output [BM, D] over the union of two disjoint key sets from their states. m_a is finite
    (the image keys are never masked), so a fully masked set b (m_b = −inf) gets weight 2^(−inf) = 0."""
    m = tl.maximum(m_a, m_b)
    c_a = tl.math.exp2(m_a - m)
    c_b = tl.math.exp2(m_b - m)
    return (acc_a * c_a[:, None] + acc_b * c_b[:, None]) / (l_a * c_a + l_b * c_b)[:, None]


@triton.jit
def _prefix_dual_fwd_kernel(Q, KI, VI, KP, VP, KN, VN, Out, OutNeg, BiasP, BiasN,
                            stride_qb, stride_qh, stride_qm, stride_qd,
                            stride_kib, stride_kih, stride_kin, stride_kid,
                            stride_vib, stride_vih, stride_vin, stride_vid,
                            stride_kpb, stride_kph, stride_kpn, stride_kpd,
                            stride_vpb, stride_vph, stride_vpn, stride_vpd,
                            stride_knb, stride_knh, stride_knn, stride_knd,
                            stride_vnb, stride_vnh, stride_vnn, stride_vnd,
                            stride_ob, stride_oh, stride_om, stride_od,
                            stride_bpb, stride_bph, stride_bpn, stride_bnb, stride_bnh, stride_bnn,
                            H, LQ, LKI, LKP, LKN, sm_scale, alpha,
                            HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, HAS_MASK_P: tl.constexpr, HAS_MASK_N: tl.constexpr,
                            FUSE_NASA: tl.constexpr, PRECISION: tl.constexpr):
    b, h, q, offs_m, offs_d, m_ok, d_ok = _q_tile(Q, stride_qb, stride_qh, stride_qm, stride_qd, H, LQ, HEAD_DIM,
                                                  BLOCK_D, BLOCK_M)  # [BM, D], read once for both prompts
    qk_scale = sm_scale * 1.4426950408889634
    # the shared part: one pass over the image keys (no mask; BiasP is a dummy pointer, never read)
    acc_i, m_i, l_i = _kv_state(q, KI + b * stride_kib + h * stride_kih, VI + b * stride_vib + h * stride_vih,
                                BiasP, stride_kin, stride_kid, stride_vin, stride_vid, 0, LKI, qk_scale, offs_d,
                                HEAD_DIM, BLOCK_M, BLOCK_D, BLOCK_N, False, PRECISION)
    acc_t, m_t, l_t = _kv_state(q, KP + b * stride_kpb + h * stride_kph, VP + b * stride_vpb + h * stride_vph,
                                BiasP + b * stride_bpb + h * stride_bph, stride_kpn, stride_kpd, stride_vpn,
                                stride_vpd, stride_bpn, LKP, qk_scale, offs_d, HEAD_DIM, BLOCK_M, BLOCK_D, BLOCK_N,
                                HAS_MASK_P, PRECISION)
    z_pos = _merge(acc_i, m_i, l_i, acc_t, m_t, l_t)  # [BM, D]
    io_mask = m_ok[:, None] & d_ok[None, :]
    o_off = b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    if not FUSE_NASA:  # store now: z_pos need not stay live through the negative pass
        tl.store(Out + o_off, z_pos.to(Out.dtype.element_ty), mask=io_mask)
    acc_t, m_t, l_t = _kv_state(q, KN + b * stride_knb + h * stride_knh, VN + b * stride_vnb + h * stride_vnh,
                                BiasN + b * stride_bnb + h * stride_bnh, stride_knn, stride_knd, stride_vnn,
                                stride_vnd, stride_bnn, LKN, qk_scale, offs_d, HEAD_DIM, BLOCK_M, BLOCK_D, BLOCK_N,
                                HAS_MASK_N, PRECISION)
    z_neg = _merge(acc_i, m_i, l_i, acc_t, m_t, l_t)
    if FUSE_NASA:  # SNOOPI eq. 9, before W_o
        tl.store(Out + o_off, (z_pos - alpha * z_neg).to(Out.dtype.element_ty), mask=io_mask)
    else:
        tl.store(OutNeg + o_off, z_neg.to(OutNeg.dtype.element_ty), mask=io_mask)


def prefix_dual_config(head_dim: int, limg: int, dtype: torch.dtype = torch.float16) -> dict:
    """Block sizes for the shared-key dual kernel: `default_config` for the image keys (the long pass; text
    prefixes take the same BLOCK_N). Not tuned: no GPU has timed this kernel yet."""
    return default_config(head_dim, limg, dtype)


def prefix_dual_launch(q, k_img, v_img, k_pos, v_pos, k_neg, v_neg, mask_pos=None, mask_neg=None, scale=None,
                       alpha: float | None = None, config: dict | None = None):
    """(kernel, grid, args, constexprs, (out, out_neg)) of one `prefix_dual_flash_attention` call."""
    check_prefix_dual_inputs(q, k_img, v_img, k_pos, v_pos, k_neg, v_neg, mask_pos, mask_neg)
    _check(q, k_img, v_img, k_pos, v_pos, k_neg, v_neg)
    B, H, LQ, D = q.shape
    cfg = dict(config or prefix_dual_config(D, k_img.shape[2], q.dtype))
    out = torch.empty_like(q)
    out_neg = out if alpha is not None else torch.empty_like(q)  # same strides as out: the kernel takes one set
    bias_p, bsp, has_p = _bias(mask_pos, q, k_pos.shape[2])
    bias_n, bsn, has_n = _bias(mask_neg, q, k_neg.shape[2])
    grid = (triton.cdiv(LQ, cfg["BLOCK_M"]), B * H)
    args = (q, k_img, v_img, k_pos, v_pos, k_neg, v_neg, out, out_neg, bias_p, bias_n,
            *q.stride(), *k_img.stride(), *v_img.stride(), *k_pos.stride(), *v_pos.stride(), *k_neg.stride(),
            *v_neg.stride(), *out.stride(), *bsp, *bsn, H, LQ, k_img.shape[2], k_pos.shape[2], k_neg.shape[2],
            float(scale if scale is not None else 1.0 / math.sqrt(D)), float(alpha if alpha is not None else 0.0))
    meta = dict(HEAD_DIM=D, BLOCK_D=_block_d(D), HAS_MASK_P=has_p, HAS_MASK_N=has_n, FUSE_NASA=alpha is not None,
                PRECISION=_precision(q), **cfg)
    return _prefix_dual_fwd_kernel, grid, args, meta, (out, out_neg)


def prefix_dual_flash_attention(q, k_img, v_img, k_pos, v_pos, k_neg, v_neg, mask_pos=None, mask_neg=None,
                                scale=None, alpha: float | None = None, config: dict | None = None):
    """Z± = softmax(q·[K_txt±; K_img]ᵀ·scale + [mask±; 0])·[V_txt±; V_img] with the image keys' scores and P·V
    computed once for both prompts: `(Z+, Z−)`, or `Z+ − α·Z−` when `alpha` is given. q [B, H, Lq, D], k_img/v_img
    [B, H, Limg, D], k_pos/v_pos [B, H, Lt+, D], k_neg/v_neg [B, H, Lt−, D] (any lengths, one dtype); masks are
    key-padding masks of the text prefixes (bool True = attend, or additive float), broadcastable to [B, H, 1, Lt±];
    a fully masked prefix leaves attention over the image keys. Outputs in q's dtype."""
    kernel, grid, args, meta, (out, out_neg) = prefix_dual_launch(q, k_img, v_img, k_pos, v_pos, k_neg, v_neg,
                                                                  mask_pos, mask_neg, scale, alpha, config)
    kernel[grid](*args, **meta)
    return out if alpha is not None else (out, out_neg)
