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
    with pytest.raises(ValueError, match=r"SwiftStepNASA: input `model` is a Linear \(SD15 model\), which has no text "
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


# ----------------------------------------------------------------------------- FLUX.1 and Z-Image (joint attention)
# References written from the construction (the official NAG code's: one image stream, two text streams), on the
# fakes' miniature nets, in float64; the code under test runs the two text streams as batch rows instead.


def attend(q, k, v):  # [B, H, L, D] → [B, L, H·D]
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return (w @ v).transpose(1, 2).flatten(2)


def joint_combine(mode, alpha=0.3, s=5.0, tau=2.5, a=0.25, p=2):
    if mode == "nasa":
        return lambda zp, zn: zp - alpha * zn  # SNOOPI eq. 9

    def nag(zp, zn):  # NAG eqs. 7–10 with the official joint-attention code's per-token ratio (L2; SD3: L1)
        zt = zp * s - zn * (s - 1)
        r = zt.norm(p=p, dim=-1, keepdim=True) / zp.norm(p=p, dim=-1, keepdim=True)
        return a * zt * torch.clamp(r, max=tau) / r + (1 - a) * zp

    return nag


def flux_reference(net, x, t, y, pos, neg, combine):
    """One image stream; text streams ± each over its own [txt, img] (each of its own length); image queries →
    combine(Z+, Z−). Both text streams are modulated with the positive pooled `y`."""
    img, vec = net.img_in(fakes.patchify(x)), net.vec(t, y)
    txt = [net.txt_in(pos), net.txt_in(neg)]
    blk = net.double_block
    qi, ki, vi = blk.img.qkv_of(img, vec)
    qkv = [blk.txt.qkv_of(s, vec) for s in txt]
    z = [attend(qi, torch.cat([kt, ki], 2), torch.cat([vt, vi], 2)) for _, kt, vt in qkv]
    txt = [blk.txt.finish(s, attend(qt, torch.cat([kt, ki], 2), torch.cat([vt, vi], 2)))
           for s, (qt, kt, vt) in zip(txt, qkv)]
    img = blk.img.finish(img, combine(*z))
    rows = [torch.cat([s, img], 1) for s in txt]  # single block: the same image in both rows
    qkv = [net.single_block.qkv_of(r, vec) for r in rows]
    z = [attend(*p)[:, s.shape[1]:] for p, s in zip(qkv, txt)]
    img = net.single_block.finish(rows[0], torch.cat([attend(*qkv[0])[:, :pos.shape[1]], combine(*z)], 1))
    return fakes.unpatchify(net.final(img[:, pos.shape[1]:]), x.shape)


def zimage_reference(net, x, t, pos, neg, combine):
    """Captions ± refined alone, the image refined once; main layer: image queries → combine(Z+, Z−) over [cap±, img],
    each caption over its own [cap, img]."""
    temb = net.t_embedder((1.0 - t)[:, None].to(x))
    caps = [net.context_refiner[0](net.pad(net.cap_embedder(c), net.cap_pad_token), None, {}) for c in (pos, neg)]
    n = x.shape[-2] * x.shape[-1] // 4
    img = net.noise_refiner(net.pad(net.x_embedder(fakes.patchify(x)), net.x_pad_token), temb, {})
    rows = [torch.cat([c, img], 1) for c in caps]
    qkv = [net.layer.qkv_of(r, temb) for r in rows]
    tp = caps[0].shape[1]
    z = [attend(*p)[:, c.shape[1]:] for p, c in zip(qkv, caps)]  # each caption its own padded length
    out = net.layer.finish(rows[0], torch.cat([attend(*qkv[0])[:, :tp], combine(*z)], 1))
    return fakes.unpatchify(net.final(out[:, tp:tp + n]), x.shape)


def dit_inputs(family, batch=1, text_len=5, seed=3, negative_len=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 4, 6, generator=g, dtype=torch.float64)  # 2×3 = 6 image tokens
    t = torch.rand(batch, generator=g, dtype=torch.float64)
    pos = torch.randn(batch, text_len, 12, generator=g, dtype=torch.float64)
    neg = torch.randn(1, negative_len or text_len, 12, generator=g, dtype=torch.float64)
    c = {"c_crossattn": pos}
    if family == "flux":
        c["y"] = torch.randn(batch, 6, generator=g, dtype=torch.float64)
        c["guidance"] = torch.full((batch,), 3.5, dtype=torch.float64)
    else:
        c["num_tokens"] = text_len
    return x, t, pos, neg, c


def joint_settings(mode):
    return dict(mode=mode, nasa_scale=0.3, nag_scale=5.0, nag_tau=2.5, nag_alpha=0.25)


@pytest.mark.parametrize("family", ["flux", "zimage"])
def test_dit_gets_a_wrapper_and_an_attention_override_on_a_clone(node, family):
    patcher = fakes.dit_patcher(family)
    before = patcher.model_options
    patched = run(node, patcher, dit_inputs(family)[3])
    assert patched is not patcher and patcher.model_options is before
    assert "model_function_wrapper" not in patcher.model_options
    assert "optimized_attention_override" not in patcher.model_options["transformer_options"]
    wrapper = patched.model_options["model_function_wrapper"]
    assert patched.model_options["transformer_options"]["optimized_attention_override"] is wrapper.override
    assert wrapper.guidance.nag_norm == 2  # the official joint-attention code's per-token L2 ratio


@pytest.mark.parametrize("mode", ["nasa", "nag"])
@pytest.mark.parametrize("batch", [1, 2])
def test_flux_equals_one_image_stream_two_text_streams(node, mode, batch):
    patcher = fakes.dit_patcher("flux")
    x, t, pos, neg, c = dit_inputs("flux", batch)
    patched = run(node, patcher, neg, **joint_settings(mode))
    got = fakes.calc_cond_batch(patched, x, t, c, [0])
    ref = flux_reference(patcher.model.diffusion_model, x, t, c["y"], pos, neg.expand(batch, -1, -1),
                         joint_combine(mode))
    plain = fakes.calc_cond_batch(patcher, x, t, c, [0])
    assert ((got - ref).abs().max() / ref.abs().max()).item() <= 1e-12
    assert (got - plain).abs().max() > 1e-3  # the negative prompt changed the output


@pytest.mark.parametrize("family,negative_len", [("sd3", 3), ("sd3", 8), ("flux2", 3), ("flux2", 515)])
def test_texts_of_different_lengths_see_only_their_own_tokens(node, family, negative_len):
    """FLUX.2 and SD3 (on the FLUX-shaped fake): the shorter text is padded at its end, its padding masked, so each
    text stream is exactly its own; a FLUX.2 negative under 512 tokens is first left-padded with zeros to 512, as
    ComfyUI pads every FLUX.2 conditioning (the fake's positive, 5 tokens, is not)."""
    patcher = fakes.dit_patcher(family)
    x, t, pos, neg, c = dit_inputs("flux", text_len=5, negative_len=negative_len)
    patched = run(node, patcher, neg, **joint_settings("nag"))
    got = fakes.calc_cond_batch(patched, x, t, c, [0])
    if family == "flux2" and negative_len < 512:
        neg = torch.nn.functional.pad(neg, (0, 0, 512 - negative_len, 0))
    combine = joint_combine("nag", p=1 if family == "sd3" else 2)  # the official SD3.5 code's L1 ratio
    ref = flux_reference(patcher.model.diffusion_model, x, t, c["y"], pos, neg, combine)
    assert ((got - ref).abs().max() / ref.abs().max()).item() <= 1e-12


@pytest.mark.parametrize("mode", ["nasa", "nag"])
@pytest.mark.parametrize("text_len", [5, 11])  # padded captions: 8 (= the padded image, 8) and 12 tokens
def test_zimage_equals_one_image_stream_two_caption_streams(node, mode, text_len):
    patcher = fakes.dit_patcher("zimage")
    x, t, pos, neg, c = dit_inputs("zimage", text_len=text_len)
    patched = run(node, patcher, neg, **joint_settings(mode))
    seen = []
    net = patcher.model.diffusion_model
    hook = net.layer.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
    got = fakes.calc_cond_batch(patched, x, t, c, [0])
    hook.remove()
    ref = zimage_reference(net, x, t, pos, neg, joint_combine(mode))
    assert seen == [(2, 8 + (8 if text_len == 5 else 12), 16)]  # [cap, img] rows [pos; neg] in one call
    assert ((got - ref).abs().max() / ref.abs().max()).item() <= 1e-12


@pytest.mark.parametrize("mode", ["nasa", "nag"])
@pytest.mark.parametrize("text_len,negative_len", [
    (5, 3),   # padded 8 and 4 (the fakes pad to 4): the negative's positions 3…4 become the pad token, keys 4…7 masked
    (6, 7),   # same padded length 8, the positive shorter: its position 6 becomes the pad token
    (11, 3),  # padded 12 and 4: the negative's keys 4…11 masked (context refiner and main layer)
    (7, 2),   # padded 8 and 4: masked in the context refiner, whose length 8 is also the noise refiner's
])
def test_zimage_captions_of_different_lengths_see_their_own_tokens(node, mode, text_len, negative_len):
    patcher = fakes.dit_patcher("zimage")
    x, t, pos, neg, c = dit_inputs("zimage", text_len=text_len, negative_len=negative_len)
    patched = run(node, patcher, neg, **joint_settings(mode))
    got = fakes.calc_cond_batch(patched, x, t, c, [0])
    ref = zimage_reference(patcher.model.diffusion_model, x, t, pos, neg, joint_combine(mode))
    assert ((got - ref).abs().max() / ref.abs().max()).item() <= 1e-12
    net = patcher.model.diffusion_model
    assert set(patched.object_patches) == {"diffusion_model.cap_embedder.forward",
                                           "diffusion_model.context_refiner.0.forward"}
    assert not isinstance(net.cap_embedder.forward, node.CaptionPadForward)  # applied only while the clone samples


def test_zimage_negative_longer_than_the_positive_block_is_refused(node):
    patcher = fakes.dit_patcher("zimage")
    x, t, pos, neg, c = dit_inputs("zimage", text_len=3, negative_len=5)  # padded 4 and 8
    with pytest.raises(ValueError, match=r"SwiftStepNASA on Z-Image: the negative prompt has 5 tokens, more than "
                                         r"the positive's caption block holds \(3 tokens padded to 4\); shorten"):
        fakes.calc_cond_batch(run(node, patcher, neg), x, t, c, [0])


@pytest.mark.parametrize("family", ["flux", "zimage"])
def test_guidance_off_installs_nothing_and_the_batched_rows_change_nothing(node, family):
    patcher = fakes.dit_patcher(family)
    x, t, pos, neg, c = dit_inputs(family)
    plain = fakes.calc_cond_batch(patcher, x, t, c, [0])
    for kw in (dict(nasa_scale=0.0), dict(mode="nag", nag_scale=1.0)):
        off = run(node, patcher, neg, **kw)
        assert "model_function_wrapper" not in off.model_options
        assert torch.equal(fakes.calc_cond_batch(off, x, t, c, [0]), plain)
    # installed anyway (α = 0): the positive row of the two-row call is the plain model's output
    forced = node.patch_joint_model(patcher, neg, node.nasa.NegativeGuidance.checked("nasa", 0.0))
    assert ((fakes.calc_cond_batch(forced, x, t, c, [0]) - plain).abs().max() / plain.abs().max()).item() <= 1e-12


@pytest.mark.parametrize("family", ["flux", "zimage"])
def test_cfg_batches_guide_only_the_positive_rows(node, family):
    patcher = fakes.dit_patcher(family)
    x, t, pos, neg, c = dit_inputs(family, batch=1)
    patched = run(node, patcher, neg)
    uncond = {**c, "c_crossattn": torch.randn_like(pos)}
    both = {k: torch.cat([uncond[k], c[k]]) if torch.is_tensor(c[k]) else c[k] for k in c}
    got = fakes.calc_cond_batch(patched, torch.cat([x, x]), torch.cat([t, t]), both, [1, 0])  # rows: uncond, cond
    assert torch.equal(got[:1], fakes.calc_cond_batch(patcher, x, t, uncond, [1]))
    assert ((got[1:] - fakes.calc_cond_batch(patched, x, t, c, [0])).abs().max()).item() <= 1e-12


def test_existing_wrapper_and_override_are_chained(node):
    patcher = fakes.dit_patcher("flux")
    calls = {"wrapper": 0, "override": 0}

    def wrapper(apply_model, args):
        calls["wrapper"] += 1
        return apply_model(args["input"], args["timestep"], **args["c"])

    def override(func, *args, **kwargs):
        calls["override"] += 1
        return func(*args, **kwargs)

    patcher.model_options = {"transformer_options": {"optimized_attention_override": override},
                             "model_function_wrapper": wrapper}
    x, t, pos, neg, c = dit_inputs("flux")
    got = fakes.calc_cond_batch(run(node, patcher, neg), x, t, c, [0])
    assert calls == {"wrapper": 1, "override": 2}  # one model call, two joint attentions
    ref = flux_reference(patcher.model.diffusion_model, x, t, c["y"], pos, neg, joint_combine("nasa"))
    assert (got - ref).abs().max() <= 1e-12 * ref.abs().max()


def test_joint_errors_name_the_node_the_input_and_the_fix(node):
    patcher = fakes.dit_patcher("flux")
    x, t, pos, neg, c = dit_inputs("flux")
    patched = run(node, patcher, neg[:, :4])
    with pytest.raises(ValueError, match=r"SwiftStepNASA on FLUX.1: the negative prompt has 4 tokens, the positive 5; "
                                         r".*pads FLUX's T5 conditioning to 256 tokens"):
        fakes.calc_cond_batch(patched, x, t, c, [0])
    with pytest.raises(ValueError, match="SwiftStepNASA is already applied to this model"):
        run(node, run(node, patcher, neg), neg)
    replaced = run(node, patcher, neg)
    replaced.model_options["transformer_options"] = {"optimized_attention_override": lambda f, *a, **k: f(*a, **k)}
    with pytest.raises(ValueError, match="a node applied after it replaced its attention override"):
        fakes.calc_cond_batch(replaced, x, t, c, [0])
    with pytest.raises(ValueError, match="does not combine with a ControlNet yet"):
        fakes.calc_cond_batch(run(node, patcher, neg), x, t, {**c, "control": {"output": []}}, [0])
    with pytest.raises(ValueError, match=r"input `model` is a ZImageDiT \(Lumina2 model\), which has no text "
                                         r"cross-attention blocks NASA can patch; supported: .*FLUX.1 .*FLUX.2 .*"
                                         r"Qwen-Image and SD3/SD3.5"):
        run(node, fakes.dit_patcher("lumina2"), neg)  # Lumina 2.0 shares Z-Image's model_base class, not its config
    # recognised by ComfyUI's model_base and config class names (the fakes' nets are FLUX-shaped)
    assert [node.joint_family(fakes.dit_patcher(f)) for f in ("flux", "flux2", "sd3", "zimage")] == \
        ["flux", "flux2", "sd3", "zimage"]
