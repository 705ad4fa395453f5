"""Triton kernels against the float64 reference, run by Triton's CPU interpreter (TRITON_INTERPRET=1, set in
tests/conftest.py when no GPU is present) or on the GPU. Outputs are pre-filled with NaN so unwritten tiles fail."""

import pytest
import torch

triton = pytest.importorskip("triton")

from swiftstep.attention_kernels import flash_attn_triton as fk  # noqa: E402
from swiftstep.attention_kernels.attention_ref import attention_ref, dual_attention_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}
# bf16 only on a GPU: the interpreter's bf16 tl.dot multiplies raw bits (shared/notes/triton_attention.md §6)
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])
# explicit configs (no autotuning): a small one that tiles the odd shapes several times, and every config
# `default_config` can return (on a GPU this is the "every config dispatch can pick" check)
SHIPPED = [fk.default_config(64, 77), fk.default_config(64, 4096), fk.default_config(128, 4096),
           fk.default_config(64, 4096, torch.float32)]
CONFIGS = [dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1), *SHIPPED]
CONFIG_IDS = ["small", "cross", "long-d64", "long-d128", "fp32"]


def test_shipped_lists_every_config_dispatch_can_pick():
    picked = {tuple(fk.default_config(d, lk, dt).items()) for d in (40, 64, 80, 96, 128, 160) for lk in (1, 77, 300, 4096)
              for dt in (torch.float16, torch.bfloat16, torch.float32)}
    assert picked == {tuple(c.items()) for c in SHIPPED}


@pytest.fixture(autouse=True)
def nan_empty(monkeypatch):
    """Every torch.empty/empty_like the wrappers make starts as NaN."""
    real_empty, real_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(float("nan")))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: real_like(*a, **k).fill_(float("nan")))


def rel(a, ref):
    return ((a.double() - ref).abs().max() / ref.abs().max()).item()


def rand(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE, dtype)


def key_mask(b, lk, seed):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(b, lk, generator=g) > 0.3
    m[:, 0] = True  # no fully masked row
    return m.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lq,lk,d", [(63, 77, 64), (33, 17, 40), (20, 45, 128), (5, 300, 80)])
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_flash_attention_matches_reference(dtype, lq, lk, d, config):
    q, k, v = rand(2, 3, lq, d, dtype=dtype, seed=0), rand(2, 3, lk, d, dtype=dtype, seed=1), \
        rand(2, 3, lk, d, dtype=dtype, seed=2)
    out = fk.flash_attention(q, k, v, config=config)
    assert out.dtype == dtype and out.shape == q.shape and not out.isnan().any()
    assert rel(out, attention_ref(q, k, v)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_masks_scale_and_strided_views(dtype):
    # (B, L, H·D) projections viewed as [B, H, L, D]: non-contiguous strides, as the processors pass them
    x = rand(2, 63, 2 * 64, dtype=dtype, seed=3).view(2, 63, 2, 64).transpose(1, 2)
    ctx = rand(2, 77, 2 * 64, dtype=dtype, seed=4).view(2, 77, 2, 64).transpose(1, 2)
    mask = key_mask(2, 77, seed=5)
    out = fk.flash_attention(x, ctx, ctx, mask=mask, scale=0.07, config=CONFIGS[0])
    assert rel(out, attention_ref(x, ctx, ctx, mask, scale=0.07)) <= TOL[dtype]
    bias = torch.where(mask, 0.0, -1e4).to(DEVICE)[:, None, None, :]  # additive [B, 1, 1, Lk] as diffusers builds
    out2 = fk.flash_attention(x, ctx, ctx, mask=bias, config=CONFIGS[0])
    assert rel(out2, attention_ref(x, ctx, ctx, mask)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_left_padded_keys_with_whole_masked_tiles(dtype):
    """Left-padded text: the first key tiles are entirely masked (a row max of −inf there must not give NaN)."""
    q, k, v = rand(1, 2, 33, 64, dtype=dtype, seed=6), rand(1, 2, 77, 64, dtype=dtype, seed=7), \
        rand(1, 2, 77, 64, dtype=dtype, seed=8)
    mask = torch.arange(77, device=DEVICE)[None, :] >= 40  # keys 0…39 padding: tiles of 16/32 wholly masked
    out = fk.flash_attention(q, k, v, mask=mask, config=CONFIGS[0])
    assert not out.isnan().any() and rel(out, attention_ref(q, k, v, mask)) <= TOL[dtype]
    out = fk.dual_flash_attention(q, k, v, k, v, None, mask, mask, config=CONFIGS[0])
    assert not out[0].isnan().any() and rel(out[0], attention_ref(q, k, v, mask)) <= TOL[dtype]


# the interpreter is slow: there the small config and the one the wrapper picks for the dtype; every config on a GPU
DUAL_CONFIGS = dict(zip(CONFIG_IDS, CONFIGS)) if torch.cuda.is_available() else {"small": CONFIGS[0], "default": None}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha", [0.2, None])
@pytest.mark.parametrize("config", list(DUAL_CONFIGS.values()), ids=list(DUAL_CONFIGS))
def test_dual_attention_matches_reference(dtype, alpha, config):
    q = rand(2, 2, 63, 64, dtype=dtype, seed=6)
    kp, vp = rand(2, 2, 77, 64, dtype=dtype, seed=7), rand(2, 2, 77, 64, dtype=dtype, seed=8)
    kn, vn = rand(2, 2, 13, 64, dtype=dtype, seed=9), rand(2, 2, 13, 64, dtype=dtype, seed=10)  # other length
    mp, mn = key_mask(2, 77, seed=11), key_mask(2, 13, seed=12)
    out = fk.dual_flash_attention(q, kp, vp, kn, vn, alpha, mp, mn, config=config)
    ref = dual_attention_ref(q, kp, vp, kn, vn, alpha, mp, mn)
    if alpha is None:
        assert rel(out[0], ref[0]) <= TOL[dtype] and rel(out[1], ref[1]) <= TOL[dtype]
    else:
        assert rel(out, ref) <= TOL[dtype]


def test_bad_input_is_refused():
    q = rand(1, 1, 8, 300, dtype=torch.float32, seed=0)
    with pytest.raises(ValueError, match="head_dim ≤ 256"):
        fk.flash_attention(q, q, q)
    q = rand(1, 1, 8, 16, dtype=torch.float32, seed=0)
    with pytest.raises(ValueError, match="per-query mask"):
        fk.flash_attention(q, q, q, mask=torch.ones(1, 1, 8, 8, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="do not match q"):
        fk.flash_attention(q, q.half(), q.half())


def test_long_ragged_sequence_1000_by_300():
    q = rand(1, 1, 1000, 64, dtype=torch.float16, seed=20)
    k, v = rand(1, 1, 300, 64, dtype=torch.float16, seed=21), rand(1, 1, 300, 64, dtype=torch.float16, seed=22)
    assert rel(fk.flash_attention(q, k, v), attention_ref(q, k, v)) <= TOL[torch.float16]
