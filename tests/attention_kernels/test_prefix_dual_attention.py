"""Shared-key dual attention (a joint-attention DiT's image queries against [text±; image] keys) against a float64
reference written from the formula. The kernel runs under Triton's CPU interpreter (TRITON_INTERPRET=1, set in
tests/conftest.py when no GPU is present) or on the GPU; outputs are pre-filled with NaN so unwritten tiles fail."""

import importlib
import importlib.util
import logging
import math

import pytest
import torch

from swiftstep.attention_kernels import last_path, prefix_dual_attention
from swiftstep.attention_kernels.attention_ref import prefix_dual_attention_merged

from ..tolerance import assert_close_to_scale

dispatch = importlib.import_module("swiftstep.attention_kernels.attention")  # the package's `attention` is the function
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}  # relative to max |Z|
# bf16 only on a GPU: the interpreter's bf16 tl.dot multiplies raw bits (shared/notes/triton_attention.md §6)
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])
SMALL = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)  # tiles every odd size several times
CONFIGS = {"small": SMALL, "default": None}


def joint_reference(q, k_img, v_img, k_txt, v_txt, mask=None, scale=None):
    """softmax(q·[K_txt; K_img]ᵀ·scale + [mask; 0])·[V_txt; V_img] in float64, written from the formula."""
    q, k_img, v_img, k_txt, v_txt = (t.double() for t in (q, k_img, v_img, k_txt, v_txt))
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    s_txt = q @ k_txt.transpose(-1, -2) * scale  # [B, H, Lq, Lt]
    if mask is not None:
        bias = torch.where(mask, 0.0, -math.inf) if mask.dtype == torch.bool else mask
        bias = bias.double().to(q.device)
        s_txt = s_txt + (bias[:, None, None, :] if bias.dim() == 2 else bias[:, :, None, :] if bias.dim() == 3
                         else bias)
    s = torch.cat([s_txt, q @ k_img.transpose(-1, -2) * scale], dim=-1)  # [B, H, Lq, Lt + Limg]
    return torch.softmax(s, dim=-1) @ torch.cat([v_txt, v_img], dim=2)


def rand(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE, dtype)


def inputs(b, h, lq, limg, lt_pos, lt_neg, d, dtype, seed=0):
    """q, k_img, v_img, k_pos, v_pos, k_neg, v_neg."""
    sizes = (lq, limg, limg, lt_pos, lt_pos, lt_neg, lt_neg)
    return tuple(rand(b, h, n, d, dtype=dtype, seed=seed + i) for i, n in enumerate(sizes))


def key_mask(b, lt, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, lt, generator=g) > 0.3).to(DEVICE)


def kernel(*args, **kw):
    from swiftstep.attention_kernels import flash_attn_triton

    return flash_attn_triton.prefix_dual_flash_attention(*args, **kw)


@pytest.fixture(autouse=True)
def nan_empty(monkeypatch):
    """Every torch.empty/empty_like the wrappers make starts as NaN."""
    real_empty, real_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(float("nan")))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: real_like(*a, **k).fill_(float("nan")))


def assert_pair(out, refs, dtype):
    for name, z, ref in zip(("Z+", "Z-"), out, refs):
        assert z.dtype == dtype and z.shape == ref.shape
        assert_close_to_scale(z, ref, rel=TOL[dtype], what=name)


# ---------------------------------------------------------------- the kernel against the formula
@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lq,limg,lt_pos,lt_neg,d", [(63, 63, 77, 13, 64), (33, 45, 20, 77, 128)])
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "masks"])
@pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))
def test_kernel_matches_formula(dtype, lq, limg, lt_pos, lt_neg, d, masked, config):
    q, ki, vi, kp, vp, kn, vn = inputs(2, 2, lq, limg, lt_pos, lt_neg, d, dtype)
    mp, mn = (key_mask(2, lt_pos, 11), key_mask(2, lt_neg, 12)) if masked else (None, None)
    out = kernel(q, ki, vi, kp, vp, kn, vn, mp, mn, config=config)
    assert_pair(out, (joint_reference(q, ki, vi, kp, vp, mp), joint_reference(q, ki, vi, kn, vn, mn)), dtype)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_alpha_form_is_z_pos_minus_alpha_z_neg(dtype):
    q, ki, vi, kp, vp, kn, vn = inputs(1, 2, 63, 63, 77, 13, 64, dtype, seed=20)
    mp = key_mask(1, 77, 30)
    out = kernel(q, ki, vi, kp, vp, kn, vn, mask_pos=mp, alpha=0.3, config=SMALL)
    ref = joint_reference(q, ki, vi, kp, vp, mp) - 0.3 * joint_reference(q, ki, vi, kn, vn)
    assert out.dtype == dtype
    assert_close_to_scale(out, ref, rel=TOL[dtype], what="Z+ - 0.3 Z-")
    # alpha = 0 is Z+ alone
    assert_close_to_scale(kernel(q, ki, vi, kp, vp, kn, vn, mask_pos=mp, alpha=0.0, config=SMALL),
                          joint_reference(q, ki, vi, kp, vp, mp), rel=TOL[dtype], what="alpha=0")


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_fully_masked_prefixes_leave_the_image_keys(dtype):
    """A fully padded text prefix (or fully padded leading key tiles) is well defined: the image keys remain."""
    q, ki, vi, kp, vp, kn, vn = inputs(2, 2, 40, 40, 77, 13, 64, dtype, seed=40)
    mp = torch.ones(2, 77, dtype=torch.bool, device=DEVICE)
    mp[0, :50] = False  # left padding: the first three BLOCK_N=16 tiles are fully masked
    mp[1] = False  # batch 1: no positive text at all
    mn = torch.zeros(2, 1, 13, device=DEVICE)  # additive, [B, H=1, Lt]
    mn[0] = -math.inf  # batch 0: no negative text
    z_pos, z_neg = kernel(q, ki, vi, kp, vp, kn, vn, mp, mn, config=SMALL)
    assert_pair((z_pos, z_neg), (joint_reference(q, ki, vi, kp, vp, mp), joint_reference(q, ki, vi, kn, vn, mn)),
                dtype)
    image_only = torch.softmax(q.double() @ ki.double().mT / 8.0, -1) @ vi.double()
    assert_close_to_scale(z_pos[1], image_only[1], rel=TOL[dtype], what="Z+ without text")
    assert_close_to_scale(z_neg[0], image_only[0], rel=TOL[dtype], what="Z- without text")


@needs_triton
def test_strided_views_scale_and_other_mask_forms():
    # (B, L, H·D) projections viewed as [B, H, L, D], as the joint-attention processors pass them
    def heads(n, seed):
        return rand(1, n, 2 * 40, dtype=torch.float16, seed=seed).view(1, n, 2, 40).transpose(1, 2)

    q, ki, vi, kp, vp, kn, vn = (heads(n, s) for s, n in enumerate((31, 31, 31, 19, 19, 7, 7)))
    mp = key_mask(1, 19, 50)[:, None, None, :]  # bool [B, 1, 1, Lt]
    mn = torch.where(key_mask(1, 7, 51), 0.0, -1e4).to(DEVICE)[:, None, :].expand(1, 2, 7)  # additive [B, H, Lt]
    out = kernel(q, ki, vi, kp, vp, kn, vn, mp, mn, scale=0.07, config=SMALL)
    assert_pair(out, (joint_reference(q, ki, vi, kp, vp, mp[:, 0, 0], 0.07),
                      joint_reference(q, ki, vi, kn, vn, mn, 0.07)), torch.float16)


def test_merged_states_algorithm_is_exact():
    """The kernel's algorithm in torch (image state once, merged with each prefix's state) equals the formula."""
    q, ki, vi, kp, vp, kn, vn = (t.double() for t in inputs(2, 3, 21, 30, 9, 5, 16, torch.float32, seed=60))
    mp, mn = key_mask(2, 9, 61), torch.zeros(2, 5, dtype=torch.bool, device=DEVICE)  # Z− with no text at all
    z_pos, z_neg = prefix_dual_attention_merged(q, ki, vi, kp, vp, kn, vn, mp, mn)
    assert_close_to_scale(z_pos, joint_reference(q, ki, vi, kp, vp, mp), rel=1e-12, what="Z+")
    assert_close_to_scale(z_neg, joint_reference(q, ki, vi, kn, vn, mn), rel=1e-12, what="Z-")


# ---------------------------------------------------------------- dispatch
def cpu_inputs(dtype=torch.float32, d=32, seed=70):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, 2, n, d, generator=g).to(dtype) for n in (24, 24, 24, 11, 11, 6, 6))


def test_cpu_without_interpreter_uses_exact_sdpa_and_says_why(monkeypatch, caplog):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("SWIFTSTEP_ATTENTION", raising=False)
    monkeypatch.setattr(dispatch, "_logged", set())
    q, ki, vi, kp, vp, kn, vn = cpu_inputs()
    mp = torch.ones(2, 11, dtype=torch.bool)
    mp[:, 8:] = False
    with caplog.at_level(logging.INFO, logger="swiftstep.attention_kernels"):
        z_pos, z_neg = prefix_dual_attention(q, ki, vi, kp, vp, kn, vn, mask_pos=mp)
        prefix_dual_attention(q, ki, vi, kp, vp, kn, vn, mask_pos=mp)
    assert last_path() == {"kind": "prefix_dual", "path": "sdpa", "reason": "inputs on cpu (Triton needs CUDA)"}
    assert [r.getMessage() for r in caplog.records if r.name == "swiftstep.attention_kernels"] == [
        "swiftstep prefix_dual attention: sdpa (inputs on cpu (Triton needs CUDA))"]  # logged once
    assert_close_to_scale(z_pos, joint_reference(q, ki, vi, kp, vp, mp), what="Z+")
    assert_close_to_scale(z_neg, joint_reference(q, ki, vi, kn, vn), what="Z-")
    with pytest.raises(ValueError, match="Triton prefix_dual attention was forced but cannot run: inputs on cpu"):
        prefix_dual_attention(q, ki, vi, kp, vp, kn, vn, backend="triton")


def test_auto_choice_float32_stays_on_sdpa_and_fp16_is_unmeasured():
    path, reason = dispatch.auto_choice("prefix_dual", torch.float32, 4096 + 512)
    assert path == "sdpa" and "float32" in reason
    for dtype in (torch.float16, torch.bfloat16):
        path, reason = dispatch.auto_choice("prefix_dual", dtype, 4096 + 512)
        assert path == "triton" and "not yet measured" in reason


@needs_triton
@pytest.mark.parametrize("backend", ["triton", "sdpa"])
def test_forced_paths_agree_with_the_formula(backend, monkeypatch):
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SWIFTSTEP_ATTENTION", backend)
    q, ki, vi, kp, vp, kn, vn = (t.to(DEVICE) for t in cpu_inputs())
    mn = key_mask(2, 6, 71)[:, None, :].expand(2, 2, 6)  # bool [B, H, Lt]
    z_pos, z_neg = prefix_dual_attention(q, ki, vi, kp, vp, kn, vn, mask_neg=mn)
    assert last_path()["kind"] == "prefix_dual" and last_path()["path"] == backend
    assert_close_to_scale(z_pos, joint_reference(q, ki, vi, kp, vp), rel=TOL[torch.float32], what="Z+")
    assert_close_to_scale(z_neg, joint_reference(q, ki, vi, kn, vn, mn), rel=TOL[torch.float32], what="Z-")
    out = prefix_dual_attention(q, ki, vi, kp, vp, kn, vn, mask_neg=mn, alpha=0.5)
    assert_close_to_scale(out, joint_reference(q, ki, vi, kp, vp) - 0.5 * joint_reference(q, ki, vi, kn, vn, mn),
                          rel=TOL[torch.float32], what="Z+ - 0.5 Z-")


@needs_triton
@pytest.mark.parametrize("case", ["per-query mask", "head_dim", "mixed dtypes"])
def test_inputs_the_kernel_cannot_take_run_exact_sdpa(case, monkeypatch):
    """Even where the kernel could otherwise run (the interpreter here), these fall back to SDPA and say why."""
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("SWIFTSTEP_ATTENTION", raising=False)
    q, ki, vi, kp, vp, kn, vn = (t.to(DEVICE) for t in cpu_inputs(d=320 if case == "head_dim" else 32))
    mp = None
    if case == "per-query mask":
        mp = key_mask(2 * 24, 11, 72).view(2, 1, 24, 11)  # [B, 1, Lq, Lt]
        mp[..., 0] = True
    if case == "mixed dtypes":
        ki, vi = ki.double(), vi.double()
    z_pos, z_neg = prefix_dual_attention(q, ki, vi, kp, vp, kn, vn, mask_pos=mp)
    assert last_path()["path"] == "sdpa"
    assert {"per-query mask": "per-query mask", "head_dim": "head_dim 320 > 256",
            "mixed dtypes": "mixed dtypes"}[case] in last_path()["reason"]
    assert z_pos.dtype == q.dtype and z_neg.dtype == q.dtype
    assert_close_to_scale(z_pos, joint_reference(q, ki, vi, kp, vp, mp), what="Z+")
    assert_close_to_scale(z_neg, joint_reference(q, ki, vi, kn, vn), what="Z-")
    with pytest.raises(ValueError, match="was forced but cannot run"):
        prefix_dual_attention(q, ki, vi, kp, vp, kn, vn, mask_pos=mp, backend="triton")


@pytest.mark.parametrize("bad,match", [
    ("q", r"`q` must be \[B, H, Lq, D\]"),
    ("k_img", r"`k_img` must be \[B=2, H=2, L, D=32\]"),
    ("v_pos", r"`v_pos` has 10 tokens; `k_pos` has 11"),
    ("empty_img", r"`k_img` has no keys"),
    ("mask_neg", r"`mask_neg` has 7 keys; its text prefix has 6"),
])
@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_bad_shapes_name_the_argument(bad, match, backend, monkeypatch):
    if backend == "triton":
        pytest.importorskip("triton")
        if DEVICE == "cpu":
            monkeypatch.setenv("TRITON_INTERPRET", "1")
    args = dict(zip(("q", "k_img", "v_img", "k_pos", "v_pos", "k_neg", "v_neg"), cpu_inputs()))
    if bad == "q":
        args["q"] = args["q"][0]
    elif bad == "k_img":
        args["k_img"] = args["k_img"][:, :1]
    elif bad == "v_pos":
        args["v_pos"] = args["v_pos"][:, :, :10]
    elif bad == "empty_img":
        args["k_img"], args["v_img"] = args["k_img"][:, :, :0], args["v_img"][:, :, :0]
    else:
        args["mask_neg"] = torch.ones(2, 7, dtype=torch.bool)
    with pytest.raises(ValueError, match=match):
        prefix_dual_attention(**args, backend=backend)
    if backend == "triton":
        with pytest.raises(ValueError, match=match):
            kernel(**args)
