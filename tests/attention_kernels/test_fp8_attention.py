"""The opt-in 8-bit self-attention kernel (int8/e4m3 Q·Kᵀ, e4m3 P·V) under Triton's CPU interpreter or on a GPU:
against the same quantisation written in torch (tight) and against exact attention (the accuracy users trade)."""

import pytest
import torch

triton = pytest.importorskip("triton")

from swiftstep import attention_kernels  # noqa: E402
from swiftstep.attention_kernels import flash_attn_triton as fk  # noqa: E402
from swiftstep.attention_kernels.attention_ref import attention_ref, fp8_attention_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP8_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
CONFIGS = [dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1), fk.fp8_config(64), fk.fp8_config(128)]
pytestmark = pytest.mark.skipif(torch.cuda.is_available() and not FP8_GPU, reason="e4m3 MMA needs sm89+")


@pytest.fixture(autouse=True)
def nan_empty(monkeypatch):
    """Every output the wrapper allocates starts as NaN, so a tile the kernel never writes fails the checks."""
    real_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: real_like(*a, **k).fill_(float("nan")))


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.double().flatten().cpu(), b.double().flatten().cpu(), dim=0).item()


def qkv(lq, lk, d, dtype, seed=0, heads=2):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, n, d, generator=g) for n in (lq, lk, lk))
    return q, k + 3.0, v  # a key offset: smoothing must remove it, or int8 keys lose their resolution


@pytest.mark.parametrize("config", CONFIGS, ids=["small", "d64", "d128"])
@pytest.mark.parametrize("qk_format, min_cos", [("int8", 0.999), ("e4m3", 0.998)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("lq, lk, d", [(63, 77, 40), (200, 200, 64), (130, 130, 128)])
def test_matches_its_quantisation_and_stays_close_to_exact(config, qk_format, min_cos, dtype, lq, lk, d):
    q, k, v = qkv(lq, lk, d, dtype)
    out = fk.flash_attention_fp8(q.to(DEVICE, dtype), k.to(DEVICE, dtype), v.to(DEVICE, dtype),
                                 qk_format=qk_format, config=config)
    assert out.dtype == dtype and out.shape == q.shape and torch.isfinite(out).all()
    exact = attention_ref(q, k, v)
    quantised = fp8_attention_ref(q.to(dtype), k.to(dtype), v.to(dtype), qk_format, block_n=config["BLOCK_N"])
    err = ((out.double().cpu() - quantised).abs().max() / quantised.abs().max()).item()
    assert err <= 5e-3, err  # the same algorithm: fp32 order (a P value may round one e4m3 step apart), output dtype
    assert cosine(out, exact) >= min_cos
    assert cosine(quantised, exact) >= min_cos


def test_dispatch_is_opt_in_and_says_why(caplog):
    q, k, v = (t.to(DEVICE) for t in qkv(40, 40, 64, torch.float32))
    out = attention_kernels.attention_8bit(q, k, v)
    if DEVICE == "cpu":  # auto on the CPU: exact SDPA, with the reason
        assert attention_kernels.last_path() == {"kind": "8bit", "path": "sdpa", "reason": "inputs on cpu (Triton needs CUDA)"}
        torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
    forced = attention_kernels.attention_8bit(q, k, v, backend="triton")
    assert attention_kernels.last_path()["path"] == "triton" and cosine(forced, attention_ref(q, k, v)) >= 0.999
    exact = attention_kernels.attention_8bit(q, k, v, backend="sdpa")
    torch.testing.assert_close(exact, torch.nn.functional.scaled_dot_product_attention(q, k, v))
    with pytest.raises(ValueError, match="qk_format must be one of"):
        fk.flash_attention_fp8(q, k, v, qk_format="int4")


def test_processor_routes_only_unmasked_self_attention(monkeypatch):
    from diffusers.models.attention_processor import Attention

    from swiftstep.pipelines.attention_processor import SwiftStepAttnProcessor

    seen = []
    real = attention_kernels.attention_8bit
    monkeypatch.setattr(attention_kernels, "attention_8bit", lambda *a, **kw: seen.append(kw["qk_format"]) or real(*a, **kw))
    attn = Attention(64, heads=2, dim_head=32, cross_attention_dim=48)
    attn.set_processor(SwiftStepAttnProcessor(self_attention_8bit="int8"))
    x, ctx = torch.randn(1, 50, 64), torch.randn(1, 7, 48)
    with torch.no_grad():
        attn(x, encoder_hidden_states=ctx)  # cross-attention: the exact path
        assert seen == []
        self_attn = Attention(64, heads=2, dim_head=32)
        self_attn.set_processor(SwiftStepAttnProcessor(self_attention_8bit="int8"))
        self_attn(x)
    assert seen == ["int8"]
