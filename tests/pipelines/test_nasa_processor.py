"""NASA/NAG processors: float64 references of the papers' equations, exact no-ops, exact removal, every backbone."""

import math

import pytest
import torch
from diffusers import PixArtTransformer2DModel, SanaTransformer2DModel, UNet2DConditionModel, UNet2DModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from swiftstep.pipelines import OneStepPipeline
from swiftstep.pipelines.nasa_processor import NASAAttnProcessor, apply_nasa, make_context, nasa_attention

from ..tolerance import assert_close_to_scale


def sdpa_ref(q, k, v, mask=None):
    """softmax(Q Kᵀ/√d) V per head, float64, masked keys dropped; q [B,H,Lq,D]."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def nag_ref(z_pos, z_neg, scale, tau, alpha):
    phi = scale - 1
    z_tilde = z_pos + phi * (z_pos - z_neg)  # NAG eq. 7
    r = z_tilde.abs().sum(-1, keepdim=True) / z_pos.abs().sum(-1, keepdim=True)  # eq. 8, L1 over heads × dims
    z_hat = z_tilde * torch.minimum(r, torch.full_like(r, tau)) / r  # eq. 9
    return alpha * z_hat + (1 - alpha) * z_pos  # eq. 10


def attention_layer(seed=0, dim=48, heads=4, ctx_dim=24, norm_cross=False):
    torch.manual_seed(seed)
    attn = Attention(query_dim=dim, cross_attention_dim=ctx_dim, heads=heads, dim_head=dim // heads, bias=True,
                     out_bias=True, cross_attention_norm="layer_norm" if norm_cross else None)
    return attn.double().eval()


def reference_output(attn, x, ctx_pos, ctx_neg, mask_pos, mask_neg, combine):
    """SNOOPI eqs. 7–9 with the layer's own W_q/W_k/W_v/W_o, float64."""
    B, L, _ = x.shape
    H = attn.heads
    ctx_neg = ctx_neg.expand(B, -1, -1)  # one negative prompt for the whole batch
    mask_neg = None if mask_neg is None else mask_neg.expand(B, -1)
    if attn.norm_cross:
        ctx_pos, ctx_neg = attn.norm_cross(ctx_pos), attn.norm_cross(ctx_neg)

    def heads(t):
        return t.view(B, -1, H, t.shape[-1] // H).transpose(1, 2)

    q = heads(attn.to_q(x))
    z_pos = sdpa_ref(q, heads(attn.to_k(ctx_pos)), heads(attn.to_v(ctx_pos)), mask_pos)
    z_neg = sdpa_ref(q, heads(attn.to_k(ctx_neg)), heads(attn.to_v(ctx_neg)), mask_neg)
    merge = lambda z: z.transpose(1, 2).reshape(B, L, -1)  # noqa: E731
    return attn.to_out[0](combine(merge(z_pos), merge(z_neg)))  # W_o(Z) + b: the bias is not scaled


def _inputs(B=2, Lq=63, Lp=77, Ln=13, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, Lq, 48, generator=g, dtype=torch.float64)
    ctx_pos = torch.randn(B, Lp, 24, generator=g, dtype=torch.float64)
    ctx_neg = torch.randn(1, Ln, 24, generator=g, dtype=torch.float64)  # one negative for the batch, other length
    mask_pos = (torch.rand(B, Lp, generator=g) > 0.3).long()
    mask_neg = (torch.rand(1, Ln, generator=g) > 0.3).long()
    mask_pos[:, 0] = mask_neg[:, 0] = 1
    return x, ctx_pos, ctx_neg, mask_pos, mask_neg


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("norm_cross", [False, True])
@pytest.mark.parametrize("alpha", [0.1, 1.0, -0.5])
def test_nasa_processor_matches_eqs_7_to_9(alpha, norm_cross):
    attn = attention_layer(norm_cross=norm_cross)
    x, ctx_pos, ctx_neg, mask_pos, mask_neg = _inputs()
    context = make_context("nasa", alpha=alpha)
    context.set_negative(ctx_neg, mask_neg)
    attn.set_processor(NASAAttnProcessor(context))
    bias = ((1 - mask_pos.double()) * -10000.0).unsqueeze(1)  # how diffusers' models pass the positive mask
    got = attn(x, encoder_hidden_states=ctx_pos, attention_mask=bias)
    ref = reference_output(attn, x, ctx_pos, ctx_neg, mask_pos, mask_neg, lambda zp, zn: zp - alpha * zn)
    assert _rel(got, ref) <= 1e-6


@pytest.mark.parametrize("scale,tau,alpha", [(3.0, 2.5, 0.5), (5.0, 1.2, 0.375), (2.0, 1e9, 1.0)])
def test_nag_processor_matches_nag_eqs_7_to_10(scale, tau, alpha):
    attn = attention_layer(seed=3)
    x, ctx_pos, ctx_neg, mask_pos, mask_neg = _inputs(seed=4)
    context = make_context("nag", nag_scale=scale, nag_tau=tau, nag_alpha=alpha)
    context.set_negative(ctx_neg, mask_neg)
    attn.set_processor(NASAAttnProcessor(context))
    got = attn(x, encoder_hidden_states=ctx_pos, attention_mask=((1 - mask_pos.double()) * -10000.0).unsqueeze(1))
    ref = reference_output(attn, x, ctx_pos, ctx_neg, mask_pos, mask_neg,
                           lambda zp, zn: nag_ref(zp, zn, scale, tau, alpha))
    assert _rel(got, ref) <= 1e-6


def test_unclipped_nag_is_rescaled_nasa():
    """τ = ∞, α_NAG = 1: (1+φ)Z+ − φZ− (notes §2)."""
    attn = attention_layer(seed=5)
    x, ctx_pos, ctx_neg, _, _ = _inputs(seed=6)
    out = {}
    for mode, kw in (("nag", dict(nag_scale=3.0, nag_tau=1e12, nag_alpha=1.0)), ("nasa", dict(alpha=2.0 / 3.0))):
        context = make_context(mode, **kw)
        context.set_negative(ctx_neg)
        attn.set_processor(NASAAttnProcessor(context))
        out[mode] = attn(x, encoder_hidden_states=ctx_pos) - attn.to_out[0].bias
    torch.testing.assert_close(out["nag"], 3.0 * out["nasa"], rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------------------------- whole models

def tiny_models(models):
    out = {}
    for family in ("sd1", "sd2", "sdxl"):
        out[family] = UNet2DConditionModel.from_pretrained(models[family]["folder"], subfolder="unet")
    torch.manual_seed(0)
    out["pixart"] = PixArtTransformer2DModel(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8,
                                             num_attention_heads=3, caption_channels=32, in_channels=4,
                                             cross_attention_dim=24, out_channels=8, norm_type="ada_norm_single",
                                             use_additional_conditions=False)
    out["sana"] = SanaTransformer2DModel(patch_size=1, in_channels=4, out_channels=4, num_layers=2,
                                         num_attention_heads=2, attention_head_dim=4, num_cross_attention_heads=2,
                                         cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
                                         sample_size=8)
    return {k: m.eval() for k, m in out.items()}


@pytest.fixture(scope="module")
def nets(models):
    return tiny_models(models)


def forward(family, net, ctx, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        if family == "sdxl":
            added = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.randn(2, 6, generator=g)}
            return net(x, 500, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
        if family in ("sd1", "sd2"):
            return net(x, 500, encoder_hidden_states=ctx).sample
        if family == "pixart":
            return net(x, encoder_hidden_states=ctx, timestep=torch.tensor([500, 500]),
                       added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        return net(x, encoder_hidden_states=ctx, timestep=torch.tensor([500, 500])).sample


CTX_DIM = {"sd1": 32, "sd2": 32, "sdxl": 80, "pixart": 32, "sana": 8}
FAMILIES = list(CTX_DIM)


def contexts(family, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 9, CTX_DIM[family], generator=g), torch.randn(1, 5, CTX_DIM[family], generator=g)


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_strength_is_bit_identical_and_removal_restores(nets, family):
    net = nets[family]
    pos, neg = contexts(family)
    plain = forward(family, net, pos)
    originals = dict(net.attn_processors)
    for settings in (dict(mode="nasa", alpha=0.0), dict(mode="nag", nag_scale=1.0)):
        with nasa_attention(net, neg, **settings) as handle:
            assert handle.names and all("attn2" in n for n in handle.names)
            assert torch.equal(forward(family, net, pos), plain)
    assert all(net.attn_processors[k] is v for k, v in originals.items())
    assert torch.equal(forward(family, net, pos), plain)


@pytest.mark.parametrize("family", FAMILIES)
def test_negative_equal_to_positive_at_alpha_one_removes_the_text(nets, family):
    """Z+ − 1·Z+ = 0 in every cross-attention: only the output bias is left, as if the layers saw no text."""
    net = nets[family]
    pos, _ = contexts(family)
    with nasa_attention(net, pos, alpha=1.0):
        got = forward(family, net, pos)
    originals = dict(net.attn_processors)

    class BiasOnly(AttnProcessor2_0):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
            shape = hidden_states.shape
            out = attn.to_out[0](torch.zeros(*shape[:-1], attn.to_out[0].in_features, dtype=hidden_states.dtype))
            return out / attn.rescale_output_factor

    net.set_attn_processor({k: BiasOnly() if k.endswith("attn2.processor") else v for k, v in originals.items()})
    try:
        expected = forward(family, net, pos)
    finally:
        net.set_attn_processor(originals)
    assert_close_to_scale(got, expected)
    assert (got - forward(family, net, pos)).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_negative_prompt_lowers_the_projection_on_z_neg(nets, family, monkeypatch):
    """In every patched layer the attention output moves away from the negative branch: ⟨Z, Z−⟩ < ⟨Z+, Z−⟩."""
    from swiftstep import attention_kernels

    net = nets[family]
    pos, neg = contexts(family)
    seen = []
    real = attention_kernels.dual_attention

    def record(q, k_pos, v_pos, k_neg, v_neg, alpha=None, **kw):
        z = real(q, k_pos, v_pos, k_neg, v_neg, alpha=alpha, **kw)
        z_pos, z_neg = real(q, k_pos, v_pos, k_neg, v_neg, **kw)
        seen.append(((z * z_neg).sum().item(), (z_pos * z_neg).sum().item()))
        return z

    monkeypatch.setattr(attention_kernels, "dual_attention", record)
    handle = apply_nasa(net, alpha=0.5).set_negative(neg)
    try:
        out = forward(family, net, pos)
    finally:
        handle.remove()
    assert len(seen) == len(handle.names)
    assert all(after < before for after, before in seen)
    assert (out - forward(family, net, pos)).abs().max() > 1e-4  # and the model output changes


def test_errors_name_the_problem(nets):
    with pytest.raises(ValueError, match="UNet2DModel has no text cross-attention layers"):
        apply_nasa(UNet2DModel(block_out_channels=(32, 64), norm_num_groups=8, sample_size=8,
                               down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                               up_block_types=("AttnUpBlock2D", "UpBlock2D")))
    with pytest.raises(ValueError, match=r"`nasa_scale` must be a finite number, got nan"):
        apply_nasa(nets["sd1"], alpha=float("nan"))
    with pytest.raises(ValueError, match=r"`guidance` must be one of \('nasa', 'nag'\)"):
        apply_nasa(nets["sd1"], mode="cfg")
    with pytest.raises(ValueError, match=r"`nag_scale` \(= φ \+ 1\) must be ≥ 1"):
        apply_nasa(nets["sd1"], mode="nag", nag_scale=0.5)

    class SD3Transformer2DModel(torch.nn.Module):
        attn_processors = {}

    with pytest.raises(ValueError, match="do not support SD3Transformer2DModel yet: it mixes text and image"):
        apply_nasa(SD3Transformer2DModel())
    assert all(not isinstance(p, NASAAttnProcessor) for p in nets["sd1"].attn_processors.values())


def test_negative_batch_must_divide_the_model_batch(nets):
    pos, _ = contexts("sd1")
    with nasa_attention(nets["sd1"], torch.randn(3, 5, 32)):
        with pytest.raises(ValueError, match="batch 3, which does not divide the model batch 2"):
            forward("sd1", nets["sd1"], pos)


def test_pipeline_negative_prompt_changes_the_image_and_zero_alpha_does_not(models):
    pipe = OneStepPipeline.from_pretrained(models["sd2"]["folder"])
    pipe.set_progress_bar_config(disable=True)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    plain = pipe("a red fox", generator=g(), output_type="latent").images
    zero = pipe("a red fox", negative_prompt="blurry", nasa_scale=0.0, generator=g(), output_type="latent").images
    assert torch.equal(plain, zero)
    for guidance in ("nasa", "nag"):
        neg = pipe("a red fox", negative_prompt="blurry, watermark", guidance=guidance, generator=g(),
                   output_type="latent").images
        assert (neg - plain).abs().max() > 1e-3, guidance
    assert all(not isinstance(p, NASAAttnProcessor) for p in pipe.unet.attn_processors.values())  # restored
