"""SwiftStepAttnProcessor and the NASA processor give the same model output on every attention path."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from swiftstep.attention_kernels import last_path
from swiftstep.pipelines.attention_processor import SwiftStepAttnProcessor, apply_swiftstep_attention
from swiftstep.pipelines.nasa_processor import nasa_attention


@pytest.fixture(scope="module")
def unet(models):
    return UNet2DConditionModel.from_pretrained(models["sd1"]["folder"], subfolder="unet").eval()


def run(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 9, 32, generator=g)
    with torch.no_grad():
        return unet(x, 500, encoder_hidden_states=ctx).sample


def test_sdpa_path_is_bit_identical_and_removal_restores(unet):
    plain = run(unet)
    handle = apply_swiftstep_attention(unet)
    try:
        assert all(isinstance(unet.attn_processors[n], SwiftStepAttnProcessor) for n in handle.names)
        assert any("attn1" in n for n in handle.names) and any("attn2" in n for n in handle.names)
        assert torch.equal(run(unet), plain)
        assert last_path()["path"] == "sdpa"
    finally:
        handle.remove()
    assert not any(isinstance(p, SwiftStepAttnProcessor) for p in unet.attn_processors.values())


def test_triton_path_gives_the_same_output(unet, monkeypatch):
    pytest.importorskip("triton")
    plain = run(unet)
    monkeypatch.setenv("SWIFTSTEP_ATTENTION", "triton")  # on CPU: Triton's interpreter (tests/conftest.py)
    handle = apply_swiftstep_attention(unet)
    try:
        out = run(unet)
        assert last_path()["path"] == "triton"
    finally:
        handle.remove()
    assert (out - plain).abs().max() <= 1e-4 * plain.abs().max()


@pytest.mark.parametrize("mode", ["nasa", "nag"])
def test_nasa_processor_does_not_care_which_path_ran(unet, monkeypatch, mode):
    pytest.importorskip("triton")
    neg = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(3))
    out = {}
    for backend in ("sdpa", "triton"):
        monkeypatch.setenv("SWIFTSTEP_ATTENTION", backend)
        with nasa_attention(unet, neg, mode=mode, alpha=0.4):
            out[backend] = run(unet)
        assert last_path() == {"kind": "dual", "path": backend, "reason": last_path()["reason"]}
    assert (out["triton"] - out["sdpa"]).abs().max() <= 1e-4 * out["sdpa"].abs().max()


def test_model_without_standard_processors_is_refused():
    class Odd(torch.nn.Module):
        attn_processors = {"x.processor": object()}

    with pytest.raises(ValueError, match="Odd has no standard attention processors"):
        apply_swiftstep_attention(Odd())
