"""DLoRAL's CFR module: official parameter names, the attention against a float64 reference, memory per chunk."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from swiftstep.models.dloral import CrossFrameRetrieval

from ..tolerance import assert_close_to_scale
from ..video_fixtures import UNUSED_BPP, ref_cross_frame_attention, ref_flow_warp, tiny_cfr

# read off the official CFR_model(mid_channels=64, num_blocks=7) state_dict (148 keys; 72 used by its forward)
OFFICIAL_SHAPES = {
    "spynet.mean": (1, 3, 1, 1),
    "spynet.basic_module.0.basic_module.0.conv.weight": (32, 8, 7, 7),
    "spynet.basic_module.5.basic_module.4.conv.bias": (2,),
    "cross_attn_module.query_conv.weight": (576, 4, 1, 1),
    "cross_attn_module.value_conv.weight": (576, 4, 1, 1),
    "cross_attn_module.proj_out.weight": (4, 576, 1, 1),
    "cross_attn_module.threshold_fc.weight": (1, 64),
}


def test_official_names_and_shapes():
    sd = CrossFrameRetrieval().state_dict()
    assert len(sd) == 72
    for key, shape in OFFICIAL_SHAPES.items():
        assert tuple(sd[key].shape) == shape, key


def test_attention_matches_the_float64_reference():
    cfr = tiny_cfr(embed_dim=64, heads=9)
    g = torch.Generator().manual_seed(1)
    cur, prev = torch.randn(2, 4, 9, 11, generator=g), torch.randn(2, 4, 9, 11, generator=g)
    ref = ref_cross_frame_attention(cfr.cross_attn_module, cur, prev)
    assert (ref - cur.double()).abs().max() > 1e-3  # the attention contributes
    for chunk in (None, 10, 1024):
        out = cfr.cross_attn_module(cur, prev, chunk=chunk)
        assert_close_to_scale(out.double(), ref)


class LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            self.largest = max(self.largest, out.numel())
        return out


def test_attention_memory_grows_with_the_chunk_not_with_hw_squared():
    cfr = tiny_cfr(embed_dim=8, heads=9)
    cur, prev = torch.randn(1, 4, 48, 48), torch.randn(1, 4, 48, 48)  # HW = 2304
    with torch.no_grad(), LargestTensor() as whole:
        cfr.cross_attn_module(cur, prev, chunk=None)
    with torch.no_grad(), LargestTensor() as chunked:
        cfr.cross_attn_module(cur, prev, chunk=256)
    hw = 48 * 48
    assert whole.largest == 9 * hw * hw  # the official [B, heads, HW, HW]
    assert chunked.largest == 9 * 256 * hw


def test_forward_aligns_with_the_flow_and_fuses():
    cfr = tiny_cfr()
    g = torch.Generator().manual_seed(2)
    frames = torch.rand(2, 3, 512, 528, generator=g) * 2 - 1
    lat = torch.randn(2, 4, 64, 66, generator=g)
    with torch.no_grad():
        aligned, fused = cfr(frames[:1], frames[1:], lat[:1], lat[1:])
        small = torch.nn.functional.interpolate(frames, scale_factor=0.125, mode="bicubic")
        flow = cfr.spynet(small[1:], small[:1])
    assert flow.shape == (1, 2, 64, 66) and flow.abs().max() > 0.05
    torch.testing.assert_close(aligned.double(), ref_flow_warp(lat[:1], flow.permute(0, 2, 3, 1)), rtol=0, atol=5e-5)
    assert_close_to_scale(fused.double(), ref_cross_frame_attention(cfr.cross_attn_module, lat[1:], aligned))
    with pytest.raises(ValueError, match="at least 512×512 px"):
        cfr(frames[:1, :, :256], frames[1:, :, :256], lat[:1], lat[1:])


def test_load_official_drops_unused_layers_and_rejects_other_files():
    cfr = tiny_cfr(embed_dim=64, heads=9)
    state = dict(cfr.state_dict())
    state.update({k: torch.zeros(s) for k, s in UNUSED_BPP.items()})
    loaded = CrossFrameRetrieval.load_official(state)
    assert loaded.config.embed_dim == 64 and loaded.config.heads == 9
    for k, v in cfr.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    with pytest.raises(ValueError, match=r"has no cross_attn_module\. weights; expected DLoRAL's CFR_model"):
        CrossFrameRetrieval.load_official({k: v for k, v in state.items() if "cross_attn" not in k})
    with pytest.raises(ValueError, match=r"1 unknown keys \(e.g. \['spynet.extra.weight'\]\)"):
        CrossFrameRetrieval.load_official({**state, "spynet.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"1 missing \(e.g. \['spynet.basic_module.3.basic_module.0.conv.bias'\]\)"):
        CrossFrameRetrieval.load_official({k: v for k, v in state.items()
                                           if k != "spynet.basic_module.3.basic_module.0.conv.bias"})
    bad = {**state, "cross_attn_module.proj_out.bias": torch.zeros(5)}
    with pytest.raises(ValueError, match="does not fit DLoRAL's CFR"):
        CrossFrameRetrieval.load_official(bad)
