"""SwiftStepTritonAttention: a reversible per-model override that falls back to ComfyUI's own attention."""

import pytest
import torch

from .. import comfy_fakes as fakes


@pytest.fixture
def node(monkeypatch):
    fakes.install(monkeypatch)
    from swiftstep.nodes import attention_nodes

    return attention_nodes


def patcher():
    return fakes.FakeModelPatcher(fakes.FakeBaseModel(None, fakes.model_sampling()))


def qkv(b=2, lq=37, lk=21, heads=2, d=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, heads * d, generator=g) for n in (lq, lk, lk)]


def test_clone_gets_the_override_and_the_input_keeps_none(node):
    p = patcher()
    (m,) = node.SwiftStepTritonAttention.execute(p, "auto").args
    assert "optimized_attention_override" not in p.model_options["transformer_options"]
    assert isinstance(m.model_options["transformer_options"]["optimized_attention_override"],
                      node.TritonAttentionOverride)


def test_auto_on_cpu_runs_comfyuis_own_attention(node):
    calls = []

    def original(*args, **kwargs):
        calls.append(kwargs)
        return fakes.optimized_attention(*args, **kwargs)

    q, k, v = qkv()
    out = node.TritonAttentionOverride("auto")(original, q, k, v, 2)
    assert calls and torch.equal(out, fakes.optimized_attention(q, k, v, 2))


@pytest.mark.parametrize("skip", [False, True])
def test_forced_triton_matches_comfyuis_attention(node, skip):
    pytest.importorskip("triton")
    q, k, v = qkv(seed=1)
    ref = fakes.optimized_attention(q, k, v, 2)
    if skip:  # [B, H, L, D] in and out, as DiTs call it
        q, k, v = (t.view(2, -1, 2, 40).transpose(1, 2) for t in (q, k, v))
    out = node.TritonAttentionOverride("triton")(lambda *a, **kw: pytest.fail("original ran"), q, k, v, 2,
                                                 skip_reshape=skip, skip_output_reshape=skip)
    if skip:
        out = out.transpose(1, 2).reshape(2, -1, 80)
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_masks_and_upcasts_stay_with_comfyui(node):
    q, k, v = qkv()
    ran = []
    original = lambda *a, **kw: ran.append(kw) or fakes.optimized_attention(*a[:4])  # noqa: E731
    node.TritonAttentionOverride("triton")(original, q, k, v, 2, mask=torch.zeros(37, 21))
    node.TritonAttentionOverride("triton")(original, q.half(), k.half(), v.half(), 2, attn_precision=torch.float32)
    assert len(ran) == 2


def test_8bit_self_attention_is_opt_in_and_self_only(node, monkeypatch):
    pytest.importorskip("triton")
    from swiftstep import attention_kernels

    ran = []
    real = attention_kernels.attention_8bit
    monkeypatch.setattr(attention_kernels, "attention_8bit", lambda *a, **kw: ran.append(kw["qk_format"]) or real(*a, **kw))
    q, k, v = qkv(lq=40, lk=40, d=64, seed=2)
    ref = fakes.optimized_attention(q, k, v, 2)
    fail = lambda *a, **kw: pytest.fail("original ran")  # noqa: E731
    out = node.TritonAttentionOverride("triton", "int8")(fail, q, k, v, 2)
    assert ran == ["int8"] and out.shape == ref.shape
    cos = torch.nn.functional.cosine_similarity(out.flatten().double(), ref.flatten().double(), dim=0)
    assert cos >= 0.999
    qc, kc, vc = qkv(lq=40, lk=21, d=64, seed=3)  # cross-attention: the exact kernel
    node.TritonAttentionOverride("triton", "int8")(fail, qc, kc, vc, 2)
    node.TritonAttentionOverride("triton")(fail, q, k, v, 2)  # off by default
    assert ran == ["int8"]
    (m,) = node.SwiftStepTritonAttention.execute(patcher(), "auto", "e4m3").args
    assert m.model_options["transformer_options"]["optimized_attention_override"].self_attention_8bit == "e4m3"
    with pytest.raises(ValueError, match="input `self_attention_8bit` must be one of"):
        node.SwiftStepTritonAttention.execute(patcher(), "auto", "fp4")
