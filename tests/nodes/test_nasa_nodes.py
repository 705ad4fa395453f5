"""SwiftStepNASA against ComfyUI fakes: a patched clone, the original untouched, the maths of SNOOPI / NAG."""

import math

import pytest
import torch

from .. import comfy_fakes as fakes


@pytest.fixture
def node(monkeypatch):
    fakes.install(monkeypatch)
    from swiftstep.nodes import nasa_nodes

    return nasa_nodes


def make_patcher():
    torch.manual_seed(0)
    base = fakes.FakeBaseModel(None, fakes.model_sampling(), "SD15")
    base.diffusion_model = fakes.UNetModel(context_dim=24, heads=2).double()
    return fakes.FakeModelPatcher(base)


def run(node, patcher, negative, **kw):
    settings = {**dict(mode="nasa", nasa_scale=0.3, nag_scale=3.0, nag_tau=2.5, nag_alpha=0.5), **kw}
    (patched,) = node.SwiftStepNASA.execute(patcher, [[negative, {"pooled_output": None}]], **settings).args
    return patched


def reference(attn2, q, k, v, negative, heads, combine):
    def sdpa(q, k, v):
        b, lq, inner = q.shape
        d = inner // heads
        split = lambda t: t.view(b, -1, heads, d).transpose(1, 2)  # noqa: E731
        w = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(d), dim=-1)
        return (w @ split(v)).transpose(1, 2).reshape(b, lq, inner)

    neg = negative.expand(q.shape[0], -1, -1)
    return combine(sdpa(q, k, v), sdpa(q, attn2.to_k(neg), attn2.to_v(neg)))  # eqs. 7–8 with the layer's W_k, W_v


def test_returns_a_patched_clone_and_leaves_the_input_untouched(node):
    patcher = make_patcher()
    before = patcher.model_options
    patched = run(node, patcher, torch.randn(1, 7, 24, dtype=torch.float64))
    assert patched is not patcher and patcher.model_options is before
    assert "patches_replace" not in patcher.model_options["transformer_options"]
    keys = set(patched.model_options["transformer_options"]["patches_replace"]["attn2"])
    assert keys == {("input", 1, 0), ("input", 3, 0), ("input", 3, 1), ("middle", 0, 0), ("output", 1, 0),
                    ("output", 2, 0)}


@pytest.mark.parametrize("mode", ["nasa", "nag"])
def test_patch_matches_the_papers_equations(node, mode):
    patcher = make_patcher()
    negative = torch.randn(1, 13, 24, dtype=torch.float64)
    patched = run(node, patcher, negative, mode=mode)
    key, patch = next(iter(patched.model_options["transformer_options"]["patches_replace"]["attn2"].items()))
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 63, 32, generator=g, dtype=torch.float64) for _ in range(3))
    k, v = k[:, :77 % 63], v[:, :77 % 63]
    got = patch(q, k, v, {"n_heads": 2, "cond_or_uncond": [0]})

    def nag_ref(zp, zn, s=3.0, tau=2.5, a=0.5):
        zt = zp + (s - 1) * (zp - zn)
        r = zt.abs().sum(-1, keepdim=True) / zp.abs().sum(-1, keepdim=True)
        return a * zt * torch.clamp(r, max=tau) / r + (1 - a) * zp

    combine = (lambda zp, zn: zp - 0.3 * zn) if mode == "nasa" else nag_ref
    ref = reference(patch.attn2, q, k, v, negative, 2, combine)
    assert ((got - ref).abs().max() / ref.abs().max()).item() <= 1e-6


def test_zero_strength_is_exactly_the_unpatched_attention(node):
    patcher = make_patcher()
    for kw in (dict(nasa_scale=0.0), dict(mode="nag", nag_scale=1.0)):
        patched = run(node, patcher, torch.randn(1, 5, 24, dtype=torch.float64), **kw)
        patch = patched.model_options["transformer_options"]["patches_replace"]["attn2"][("middle", 0, 0)]
        q, k, v = (torch.randn(1, 16, 64, dtype=torch.float64) for _ in range(3))
        assert torch.equal(patch(q, k, v, {"n_heads": 2}), fakes.optimized_attention(q, k, v, 2))


def test_only_positive_rows_are_steered(node):
    patched = run(node, make_patcher(), torch.randn(1, 5, 24, dtype=torch.float64))
    patch = patched.model_options["transformer_options"]["patches_replace"]["attn2"][("input", 1, 0)]
    q, k, v = (torch.randn(4, 16, 32, dtype=torch.float64) for _ in range(3))
    plain = fakes.optimized_attention(q, k, v, 2)
    got = patch(q, k, v, {"n_heads": 2, "cond_or_uncond": [1, 0]})  # rows 0–1 uncond, 2–3 cond
    assert torch.equal(got[:2], plain[:2]) and not torch.allclose(got[2:], plain[2:])


def test_bad_input_names_the_node_and_input(node):
    patcher = make_patcher()
    with pytest.raises(ValueError, match=r"`nasa_scale` must be a finite number, got nan"):
        run(node, patcher, torch.randn(1, 5, 24), nasa_scale=float("nan"))
    with pytest.raises(ValueError, match="SwiftStepNASA: input `negative` is empty"):
        node.SwiftStepNASA.execute(patcher, [], "nasa", 0.2, 3.0, 2.5, 0.5)
    dit = make_patcher()
    dit.model.diffusion_model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"SwiftStepNASA: input `model` is a Linear, which has no text "
                                         r"cross-attention blocks NASA can patch"):
        run(node, dit, torch.randn(1, 5, 24))


def test_pixart_gets_per_clone_object_patches_matching_nasa(node):
    torch.manual_seed(0)
    base = fakes.FakeBaseModel(None, fakes.model_sampling(), "PixArtAlpha")
    base.diffusion_model = fakes.PixArtMS().double()
    patcher = fakes.FakeModelPatcher(base)
    negative = torch.randn(1, 11, 40, dtype=torch.float64)  # raw T5 features, before the caption MLP
    patched = run(node, patcher, negative, nasa_scale=0.4)
    assert not getattr(patcher, "object_patches", {})  # the input MODEL carries no patch
    assert set(patched.object_patches) == {"diffusion_model.blocks.0.cross_attn.forward",
                                           "diffusion_model.blocks.1.cross_attn.forward"}
    module = base.diffusion_model.blocks[0].cross_attn
    forward = patched.object_patches["diffusion_model.blocks.0.cross_attn.forward"]
    g = torch.Generator().manual_seed(2)
    x, cond = torch.randn(2, 16, 32, generator=g, dtype=torch.float64), torch.randn(1, 2 * 9, 32, generator=g,
                                                                                      dtype=torch.float64)
    neg = base.diffusion_model.y_embedder.y_proj(negative).expand(2, -1, -1)
    ref = module.proj(reference(module_as_attn2(module), module.q_linear(x), *module.kv_linear(cond).view(
        2, 9, 2, 32).unbind(2), neg, 2, lambda zp, zn: zp - 0.4 * zn))
    got = forward(x, cond)
    assert ((got - ref).abs().max() / ref.abs().max()).item() <= 1e-6
    off = run(node, patcher, negative, nasa_scale=0.0).object_patches["diffusion_model.blocks.0.cross_attn.forward"]
    assert torch.equal(off(x, cond), module(x, cond))  # α = 0: the original forward, bit for bit


def module_as_attn2(module):
    """PixArt packs K and V in one `kv_linear`; expose them as to_k / to_v for the reference."""
    c = module.d_model
    shim = torch.nn.Module()
    shim.to_k = lambda t: module.kv_linear(t).view(*t.shape[:-1], 2, c)[..., 0, :]
    shim.to_v = lambda t: module.kv_linear(t).view(*t.shape[:-1], 2, c)[..., 1, :]
    return shim


def test_fused_kernel_path_gives_the_same_attention(node, monkeypatch):
    pytest.importorskip("triton")
    patched = run(node, make_patcher(), torch.randn(1, 9, 24, dtype=torch.float64), nasa_scale=0.3)
    patch = patched.model_options["transformer_options"]["patches_replace"]["attn2"][("input", 1, 0)]
    q, k, v = (torch.randn(2, 20, 32) for _ in range(3))
    patch.attn2.float()
    patch._kv.clear()
    monkeypatch.setenv("SWIFTSTEP_ATTENTION", "sdpa")
    ref = patch(q, k, v, {"n_heads": 2})
    monkeypatch.setenv("SWIFTSTEP_ATTENTION", "triton")  # CPU: Triton's interpreter
    from swiftstep.attention_kernels import last_path

    got = patch(q, k, v, {"n_heads": 2})
    assert last_path()["path"] == "triton"
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_cached_negative_keys_follow_weight_patches(node):
    """A LoRA applied after SwiftStepNASA patches to_k/to_v of the same module (in place or with new storage); the
    cached negative K/V must follow, also when ComfyUI ≥ 0.33 shares the patch object between clones."""
    negative = torch.randn(1, 7, 24, dtype=torch.float64)
    patched = run(node, make_patcher(), negative)
    patch = patched.model_options["transformer_options"]["patches_replace"]["attn2"][("middle", 0, 0)]
    q, k, v = (torch.randn(2, 10, 32, dtype=torch.float64) for _ in range(3))
    before = patch(q, k, v, {"n_heads": 2})
    with torch.no_grad():
        patch.attn2.to_k.weight.add_(0.5)                                    # in place, as a weight patch does
    got = patch(q, k, v, {"n_heads": 2})
    ref = reference(patch.attn2, q, k, v, negative, 2, lambda zp, zn: zp - 0.3 * zn)
    assert (got - before).abs().max() > 1e-3 and (got - ref).abs().max() <= 1e-9 * ref.abs().max()
    patch.attn2.to_v.weight = torch.nn.Parameter(patch.attn2.to_v.weight * 2)  # new storage
    ref = reference(patch.attn2, q, k, v, negative, 2, lambda zp, zn: zp - 0.3 * zn)
    assert (patch(q, k, v, {"n_heads": 2}) - ref).abs().max() <= 1e-9 * ref.abs().max()
    patch.cleanup()
    assert patch._kv == {}


def test_weights_loaded_in_inference_mode_are_supported(node):
    """ComfyUI loads models under torch.inference_mode: such weights have no version counter."""
    with torch.inference_mode():
        patched = run(node, make_patcher(), torch.randn(1, 7, 24, dtype=torch.float64))
        patch = patched.model_options["transformer_options"]["patches_replace"]["attn2"][("middle", 0, 0)]
        q, k, v = (torch.randn(2, 10, 32, dtype=torch.float64) for _ in range(3))
        assert patch(q, k, v, {"n_heads": 2}).isfinite().all()
