"""SwiftStepFastPath against ComfyUI fakes: a patched clone, the same model outputs with channels-last and with the
graph call's static buffers (run eagerly on the CPU), and eager calls where a graph would be wrong."""

import pytest
import torch

from .. import comfy_fakes as fakes
from ..tolerance import assert_close_to_scale


@pytest.fixture
def node(monkeypatch):
    fakes.install(monkeypatch)
    from swiftstep.nodes import fast_path_nodes

    return fast_path_nodes


def apply_model_factory():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    proj = torch.nn.Linear(8, 4)
    calls = []

    def apply_model(x, t, c_crossattn=None, transformer_options=None, **kw):
        calls.append(transformer_options)
        bias = proj(c_crossattn.mean(1))[:, :, None, None]
        return conv(x) * t.view(-1, 1, 1, 1) + bias + transformer_options.get("sigmas", torch.zeros(1)).sum()

    return apply_model, calls


def args(seed, batch=2):
    g = torch.Generator().manual_seed(seed)
    return {"input": torch.randn(batch, 4, 8, 8, generator=g), "timestep": torch.rand(batch, generator=g),
            "c": {"c_crossattn": torch.randn(batch, 7, 8, generator=g),
                  "transformer_options": {"sigmas": torch.rand(1, generator=g), "cond_or_uncond": [0, 1]}},
            "cond_or_uncond": [0, 1]}


def direct(apply_model, a):
    return apply_model(a["input"], a["timestep"], **a["c"])


def test_clone_and_options(node):
    p = fakes.FakeModelPatcher(fakes.FakeBaseModel(None, fakes.model_sampling()))
    (m,) = node.SwiftStepFastPath.execute(p, True, True, "auto").args
    assert "model_function_wrapper" not in p.model_options
    assert isinstance(m.model_options["model_function_wrapper"], node.FastPathWrapper)
    assert "optimized_attention_override" in m.model_options["transformer_options"]
    (off,) = node.SwiftStepFastPath.execute(p, False, False, "off").args
    assert "optimized_attention_override" not in off.model_options.get("transformer_options", {})
    with pytest.raises(ValueError, match="input `attention` must be off or one of"):
        node.SwiftStepFastPath.execute(p, True, True, "sdpa")


def test_graph_buffers_and_channels_last_give_the_same_outputs(node):
    from swiftstep.pipelines.fast_path import GraphedCall

    apply_model, calls = apply_model_factory()
    wrapper = node.FastPathWrapper(channels_last=True, cuda_graph=True, graphs=GraphedCall(capture=False))
    with torch.no_grad():
        for seed in (0, 1, 2):  # the same signature: buffers refilled, sigmas included
            a = args(seed)
            assert_close_to_scale(wrapper(apply_model, a), direct(apply_model, a))
        a = args(3, batch=1)  # another signature
        assert_close_to_scale(wrapper(apply_model, a), direct(apply_model, a))
    assert len(wrapper.graphs._graphs) == 2


def test_patches_controlnets_and_other_wrappers_stay_eager(node):
    from swiftstep.pipelines.fast_path import GraphedCall

    apply_model, _ = apply_model_factory()
    wrapper = node.FastPathWrapper(channels_last=False, cuda_graph=True, graphs=GraphedCall(capture=False))
    a = args(0)
    a["c"]["transformer_options"]["patches_replace"] = {"attn2": {}}
    with torch.no_grad():
        assert_close_to_scale(wrapper(apply_model, a), direct(apply_model, a))
    assert wrapper.graphs._graphs == {}
    seen = []
    previous = lambda f, a_: seen.append(1) or direct(f, a_)  # noqa: E731
    chained = node.FastPathWrapper(channels_last=True, cuda_graph=True, previous=previous)
    with torch.no_grad():
        chained(apply_model, args(1))
    assert seen == [1]
    cpu = node.FastPathWrapper(channels_last=False, cuda_graph=True)  # no CUDA: eager, no graph runner made
    with torch.no_grad():
        cpu(apply_model, args(2))
    assert cpu.graphs is None


def test_lowvram_models_and_moved_weights_are_never_replayed_stale(node):
    from swiftstep.pipelines.fast_path import GraphedCall

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
            self.model_lowvram = False

        def apply_model(self, x, t, c_crossattn=None, transformer_options=None, **kw):
            return self.conv(x) * t.view(-1, 1, 1, 1) + c_crossattn.mean()

    model = Model()
    wrapper = node.FastPathWrapper(channels_last=False, cuda_graph=True, graphs=GraphedCall(capture=False))
    with torch.no_grad():
        wrapper(model.apply_model, args(0))
        first = dict(wrapper.graphs._graphs)
        model.conv.weight.data = model.conv.weight.data.clone()
        a = args(1)
        assert_close_to_scale(wrapper(model.apply_model, a), direct(model.apply_model, a))
        assert wrapper.graphs._graphs.keys() == first.keys() and all(
            wrapper.graphs._graphs[k] is not first[k] for k in first)
        model.model_lowvram = True
        wrapper.graphs.clear()
        wrapper(model.apply_model, args(2))
        assert wrapper.graphs._graphs == {}


def test_release_drops_the_graphs(node):
    from swiftstep.pipelines.fast_path import GraphedCall

    apply_model, _ = apply_model_factory()
    wrapper = node.FastPathWrapper(channels_last=False, cuda_graph=True, graphs=GraphedCall(capture=False))
    with torch.no_grad():
        wrapper(apply_model, args(0))
    assert wrapper.graphs._graphs
    wrapper.release()
    assert wrapper.graphs._graphs == {}
