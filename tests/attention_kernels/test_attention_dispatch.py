"""Dispatch: which path runs, why, and that every path gives the same result."""

import logging

import pytest
import torch

from swiftstep.attention_kernels import attention, dual_attention, last_path
from swiftstep.attention_kernels.attention import auto_choice
from swiftstep.attention_kernels.attention_ref import attention_ref, dual_attention_ref


def qkv(lq=40, lk=77, d=64, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, 2, n, d, generator=g).to(dtype) for n in (lq, lk, lk))


def test_auto_keeps_sdpa_for_single_attention_and_says_why(caplog):
    q, k, v = qkv()
    with caplog.at_level(logging.INFO, logger="swiftstep.attention_kernels"):
        out = attention(q, k, v)
    assert torch.equal(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))  # exact fallback
    assert last_path()["path"] == "sdpa"
    assert "cuDNN" in last_path()["reason"] or "CUDA" in last_path()["reason"]


@pytest.mark.parametrize("interpret", ["1", None])
def test_cpu_tensors_use_sdpa_in_auto_and_triton_only_when_interpreting(monkeypatch, interpret):
    if interpret is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
    q, k, v = qkv()
    dual_attention(q, k, v, k, v, alpha=0.5)
    assert last_path() == {"kind": "dual", "path": "sdpa", "reason": "inputs on cpu (Triton needs CUDA)"}
    if interpret is None:
        with pytest.raises(ValueError, match=r"Triton dual attention was forced but cannot run: inputs on cpu"):
            dual_attention(q, k, v, k, v, alpha=0.5, backend="triton")


@pytest.mark.parametrize("backend", ["triton", "sdpa"])
def test_forced_paths_agree_with_the_reference(backend, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("SWIFTSTEP_ATTENTION", backend)
    q, k, v = qkv(lq=33, lk=20, d=40)
    kn, vn = qkv(lq=1, lk=9, d=40, seed=1)[1:]
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[:, 15:] = False
    assert ((attention(q, k, v, mask=mask).double() - attention_ref(q, k, v, mask)).abs().max() < 1e-5)
    assert last_path()["path"] == backend
    out = dual_attention(q, k, v, kn, vn, alpha=0.3, mask_pos=mask)
    assert (out.double() - dual_attention_ref(q, k, v, kn, vn, 0.3, mask)).abs().max() < 1e-5
    z_pos, z_neg = dual_attention(q, k, v, kn, vn)
    ref_pos, ref_neg = dual_attention_ref(q, k, v, kn, vn)
    assert (z_pos.double() - ref_pos).abs().max() < 1e-5 and (z_neg.double() - ref_neg).abs().max() < 1e-5


def test_bad_backend_name_lists_the_choices():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"one of \('auto', 'triton', 'sdpa'\)"):
        attention(q, k, v, backend="flash3")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_auto_uses_the_fused_kernel_for_short_contexts_on_cuda():
    q, k, v = (t.cuda().half() for t in qkv(lq=4096, lk=77))
    dual_attention(q, k, v, k, v, alpha=0.2)
    assert last_path()["path"] == "triton"
    q, k, v = (t.cuda().half() for t in qkv(lq=256, lk=512))
    dual_attention(q, k, v, k, v, alpha=0.2)
    assert last_path()["path"] == "sdpa"


def test_auto_choice_on_cuda_is_the_measured_one():
    """What `auto` picks for supported CUDA inputs (the decision itself runs on any machine)."""
    assert auto_choice("dual", torch.float16, 77)[0] == "triton"
    assert auto_choice("dual", torch.bfloat16, 300)[0] == "triton"
    assert auto_choice("dual", torch.float16, 301) == (
        "sdpa", "contexts of 301 keys: two cuDNN calls measured faster than the fused kernel")
    assert auto_choice("single", torch.float16, 77)[0] == "sdpa"
    path, reason = auto_choice("dual", torch.float32, 77)  # fp32: exact SDPA, never an unmeasured kernel
    assert path == "sdpa" and "float32" in reason
