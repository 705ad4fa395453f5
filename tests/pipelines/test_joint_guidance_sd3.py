"""NASA/NAG on SD3 / SD3.5 joint attention — one image stream, two text streams (pipelines/nasa_joint_sd3.py) —
against float64 references written here from the official NAG code's SD3.5 algorithm (ChenDarYen's
`NAGJointAttnProcessor2_0` and `Trunc*` norms of its diffusers SD3.5 pipeline; ComfyUI-NAG `sd3/mmdit.py`, which also
gives the negative text stream its own pooled embedding) and from SNOOPI eq. 9 applied the same way.

The references run the same diffusers blocks one by one, in float64, with test-local attention processors that
write attention out as softmax(QKᵀ/√d)V over SD3's [image, text] tokens (the image tiled to the 2B text rows, as the
official processor does) and with the image AdaLN wrapped to take the positive temb rows. Nothing of `nasa_joint` or
`nasa_joint_sd3` is called by them."""

import copy

import pytest
import torch
from diffusers import SD3Transformer2DModel

from swiftstep.core.nasa import NegativeGuidance
from swiftstep.pipelines.nasa_joint import JointGuidanceHandle
from swiftstep.pipelines.nasa_joint_sd3 import SD3JointGuidanceProcessor, apply_sd3_guidance

from ..dit_fixtures.flux_sd3 import _perturb_constants, build_flux, build_sd3
from ..tolerance import assert_close_to_scale
from .joint_reference import TruncNorm, heads, hooks_of, mix_reference, softmax_attention

# the official SD3.5 processor: L1 per-token norm, NAGStableDiffusion3Pipeline defaults τ 2.5, α 0.125
NAG = NegativeGuidance.checked("nag", nag_scale=5.0, nag_tau=2.5, nag_alpha=0.125, nag_norm=1)
NAG_L2_CLIPPING = NegativeGuidance.checked("nag", nag_scale=9.0, nag_tau=1.2, nag_alpha=0.7, nag_norm=2)  # τ binds
NASA = NegativeGuidance.checked("nasa", alpha=0.4)
B, T = 2, 9  # batch, text tokens; the 8×8 latent with patch 2 gives 16 image tokens


# ---------------------------------------------------------------- models and inputs
@pytest.fixture(scope="module")
def sd3_pipe():
    return build_sd3()


@pytest.fixture(scope="module")
def tiny(sd3_pipe):
    """The SD3.5-Large-Turbo fixture's transformer: width 128 (2 heads × 64), RMS QK-norm, 2 blocks (the last
    `context_pre_only`)."""
    return sd3_pipe.transformer.eval()


def variant(tiny, seed=1, **config):
    torch.manual_seed(seed)
    base = {k: v for k, v in tiny.config.items() if not k.startswith("_")}  # `_use_default_values` would win
    model = SD3Transformer2DModel.from_config({**base, **config}).eval()
    _perturb_constants(model)
    return model


@pytest.fixture(scope="module")
def models(tiny):
    """SD3.5-Large-like (the fixture), SD3.5-Medium-like (dual-attention image blocks) and SD3-Medium-like (no QK
    norm)."""
    return {"sd35-large": tiny,
            "sd35-medium": variant(tiny, num_layers=3, dual_attention_layers=(0, 1)),
            "sd3-medium": variant(tiny, seed=2, qk_norm=None)}


def inputs(model, seed=0, b=B):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    return dict(hidden_states=torch.randn(b, c.in_channels, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(b, T, c.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(b, c.pooled_projection_dim, generator=g),
                timestep=torch.tensor([900.0, 400.0][:b]))


def negatives(model, seed=5, b=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, T, model.config.joint_attention_dim, generator=g),
            torch.randn(b, model.config.pooled_projection_dim, generator=g))


def run(model, x):
    with torch.no_grad():
        return model(**x).sample


def guided(model, x, guidance, neg):
    handle = apply_sd3_guidance(model, guidance).set_negative(*neg)
    try:
        return run(model, x)
    finally:
        handle.remove()


# ---------------------------------------------------------------- the reference (float64)
class OfficialJoint:
    """The official joint attention with NAG rows only: image q/k/v tiled ×2 against the 2B text rows, full
    attention per row over [img, txt±], the image output of the positive row replaced by the mix, the text outputs
    kept."""

    def __init__(self, mix):
        self.mix = mix

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        b, n = hidden_states.shape[:2]
        q, k, v = (heads(attn, f(hidden_states)).repeat(2, 1, 1, 1) for f in (attn.to_q, attn.to_k, attn.to_v))
        eq, ek, ev = (heads(attn, f(encoder_hidden_states)) for f in (attn.add_q_proj, attn.add_k_proj,
                                                                        attn.add_v_proj))
        if attn.norm_q is not None:
            q, k, eq, ek = attn.norm_q(q), attn.norm_k(k), attn.norm_added_q(eq), attn.norm_added_k(ek)
        q, k, v = (torch.cat([a, c], dim=1) for a, c in ((q, eq), (k, ek), (v, ev)))  # SD3's order: image first
        z = softmax_attention(q, k, v)  # [2B, N + T, C]
        image = attn.to_out[0](self.mix(z[:b, :n], z[b:, :n]))
        return image, (z[:, n:] if attn.context_pre_only else attn.to_add_out(z[:, n:]))


class ImageSelfAttention:
    """SD3.5's `attn2`: the image tokens alone."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        q, k, v = (heads(attn, f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        return attn.to_out[0](softmax_attention(q, k, v))


@torch.no_grad()
def reference(model, x, neg, guidance):
    """The whole SD3 forward with a negative prompt, in float64, block by block (see the module docstring);
    `neg = (embeds, None)` stacks the positive pooled embedding twice, as the diffusers NAG SD3.5 pipeline."""
    m = copy.deepcopy(model).double()
    x = {k: v.double() for k, v in x.items()}
    b = x["hidden_states"].shape[0]
    neg_embeds = neg[0].double().repeat_interleave(b // neg[0].shape[0], dim=0)
    neg_pooled = (x["pooled_projections"] if neg[1] is None
                  else neg[1].double().repeat_interleave(b // neg[1].shape[0], dim=0))
    mix = mix_reference(guidance)
    # the official pipeline's concatenation: text and pooled [pos; neg], timestep for 2B rows, latents once
    temb = m.time_text_embed(torch.cat([x["timestep"]] * 2), torch.cat([x["pooled_projections"], neg_pooled]))
    text = m.context_embedder(torch.cat([x["encoder_hidden_states"], neg_embeds]))
    image = m.pos_embed(x["hidden_states"])
    for block in m.transformer_blocks:
        block.norm1 = TruncNorm(block.norm1)
        block.attn.set_processor(OfficialJoint(mix))
        if block.attn2 is not None:
            block.attn2.set_processor(ImageSelfAttention())
        text, image = block(hidden_states=image, encoder_hidden_states=text, temb=temb)
    out = m.proj_out(m.norm_out(image, temb[:b]))  # [B, h·w, p·p·C]
    p, c = m.config.patch_size, m.out_channels
    h, w = (s // p for s in x["hidden_states"].shape[-2:])
    return out.reshape(b, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h * p, w * p)


# ---------------------------------------------------------------- tests
def test_the_reference_without_guidance_is_the_plain_transformer(models):
    """Checks the reference's plumbing (doubling, truncated norms, attention, attn2, unpatchify) against diffusers'
    own forward: with the mix = Z+ the negative stream cannot reach the image."""
    assert [b.attn2 is not None for b in models["sd35-medium"].transformer_blocks] == [True, True, False]
    assert [b.attn.norm_q is None for b in models["sd3-medium"].transformer_blocks] == [True, True]
    for name, model in models.items():
        x = inputs(model)
        for neg in (negatives(model), (negatives(model)[0], None)):
            assert_close_to_scale(run(model, x), reference(model, x, neg, None), rel=2e-6, what=name)


@pytest.mark.parametrize("guidance", [NAG, NAG_L2_CLIPPING], ids=["nag-official-sd35", "nag-l2-tau-binding"])
def test_nag_equals_the_official_nag_computation(models, guidance):
    for (name, model), neg_batch in zip(models.items(), (1, 2, 1)):
        x = inputs(model, seed=1)
        embeds, pooled = negatives(model, b=neg_batch)
        plain = run(model, x)
        for neg in ((embeds, pooled), (embeds, None)):  # own pooled (ComfyUI-NAG), positive pooled (diffusers NAG)
            expected = reference(model, x, neg, guidance)
            got = guided(model, x, guidance, neg)
            assert_close_to_scale(got, expected, rel=1e-4, what=f"{name} NAG")
            assert (got - plain).abs().max() > 3e-3 * expected.abs().max()  # ≫ the tolerance: visible


def test_nasa_equals_snoopi_eq9_applied_the_same_way(models):
    for name, model in models.items():
        x, neg = inputs(model, seed=3), negatives(model, seed=4, b=2)
        assert_close_to_scale(guided(model, x, NASA, neg), reference(model, x, neg, NASA), rel=1e-4, what=name)


def test_the_negative_pooled_embedding_reaches_the_image(tiny):
    """Its own temb for the negative stream (ComfyUI-NAG) is not the positive's (diffusers NAG pipeline)."""
    x, (embeds, pooled) = inputs(tiny, seed=6), negatives(tiny, seed=7)
    own, shared = guided(tiny, x, NAG, (embeds, pooled)), guided(tiny, x, NAG, (embeds, None))
    assert (own - shared).abs().max() > 1e-3 * shared.abs().max()
    assert torch.equal(guided(tiny, x, NAG, (embeds.repeat(B, 1, 1), x["pooled_projections"])), shared)


def test_a_batch_of_two_with_one_negative_per_sample(models):
    model = models["sd35-medium"]
    x, neg = inputs(model, seed=10), negatives(model, b=2)
    expected = reference(model, x, neg, NAG)
    assert_close_to_scale(guided(model, x, NAG, neg), expected, rel=1e-4)


def test_guidance_off_is_bit_identical_and_remove_restores(models):
    model = models["sd35-medium"]
    x, neg = inputs(model, seed=9), negatives(model)
    plain = run(model, x)
    original = dict(model.attn_processors)
    assert any(".attn2." in name for name in original)
    for off in (NegativeGuidance.checked("nasa", alpha=0.0), NegativeGuidance.checked("nag", nag_scale=1.0)):
        handle = apply_sd3_guidance(model, off).set_negative(*neg)
        assert not handle.installed and hooks_of(model) == 0
        assert all(model.attn_processors[n] is p for n, p in original.items())
        assert torch.equal(run(model, x), plain)
        handle.remove()
    with apply_sd3_guidance(model, NAG).set_negative(*neg) as handle:
        assert isinstance(handle, JointGuidanceHandle) and handle.installed and hooks_of(model) > 0
        procs = model.attn_processors
        assert all(isinstance(procs[n], SD3JointGuidanceProcessor) == (".attn." in n) for n in procs)
        assert all(procs[n] is original[n] for n in procs if ".attn2." in n)  # image-only attention untouched
        assert not torch.equal(run(model, x), plain)
    assert handle.original is None and not handle.installed and hooks_of(model) == 0
    assert all(model.attn_processors[n] is p for n, p in original.items())
    assert torch.equal(run(model, x), plain)


def test_bad_negatives_name_the_argument(tiny):
    x = inputs(tiny)
    embeds, pooled = negatives(tiny)
    cases = [((torch.randn(1, T + 2, 64), pooled), r"negative `prompt_embeds` is \(11, 64\).*positive \(9, 64\).*"
                                                   r"same max_sequence_length"),
             ((torch.randn(1, T, 32), pooled), r"negative `prompt_embeds` is \(9, 32\)"),
             ((torch.randn(3, T, 64), torch.randn(3, 48)), r"negative `prompt_embeds` has batch 3, which does not "
                                                          r"divide the model batch 2"),
             ((embeds, torch.randn(1, 8)), r"negative `pooled_embeds` has width 8, the positive 48")]
    for neg, match in cases:
        with apply_sd3_guidance(tiny, NAG).set_negative(*neg), pytest.raises(ValueError, match=match):
            run(tiny, x)
        assert hooks_of(tiny) == 0
    rejected = [((torch.randn(T, 64), pooled), r"negative `prompt_embeds` must be a \[B, T, C\] tensor, got \(9, 64\)"),
                ((embeds, torch.randn(2, 48)), r"negative `pooled_embeds` must be \[1, P\]"),
                ((embeds, torch.randn(48)), r"negative `pooled_embeds` must be \[1, P\]")]
    nan = embeds.clone()
    nan[0, 3, 1] = float("nan")
    rejected.append(((nan, pooled), r"`prompt_embeds` must be finite .*1 NaN/inf"))
    for neg, match in rejected:
        with pytest.raises(ValueError, match=match):
            apply_sd3_guidance(tiny, NAG).set_negative(*neg)
        assert hooks_of(tiny) == 0  # a rejected negative leaves nothing installed
    with apply_sd3_guidance(tiny, NAG), pytest.raises(ValueError, match=r"call `set_negative"):
        run(tiny, x)
    with apply_sd3_guidance(tiny, NAG).set_negative(embeds, pooled), \
            pytest.raises(ValueError, match=r"`encoder_hidden_states` has batch 1, `hidden_states` 2"):
        run(tiny, {**x, "encoder_hidden_states": x["encoder_hidden_states"][:1]})
    assert hooks_of(tiny) == 0


def test_other_models_and_patched_attention_are_refused(tiny):
    with pytest.raises(ValueError, match="supports SD3Transformer2DModel; got FluxTransformer2DModel"):
        apply_sd3_guidance(build_flux().transformer, NAG)
    with pytest.raises(TypeError, match="NegativeGuidance"):
        apply_sd3_guidance(tiny, {"mode": "nag"})
    fused = copy.deepcopy(tiny)
    fused.fuse_qkv_projections()
    with pytest.raises(ValueError, match=r"replaces JointAttnProcessor2_0; transformer_blocks\.0\.attn\.processor "
                                         r"has FusedJointAttnProcessor2_0"):
        apply_sd3_guidance(fused, NAG)
    assert hooks_of(fused) == 0 and not any(isinstance(p, SD3JointGuidanceProcessor)
                                            for p in fused.attn_processors.values())


# ---------------------------------------------------------------- the stock StableDiffusion3Pipeline
def sample(pipe, max_sequence_length=16):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a lighthouse at dusk", height=32, width=32, num_inference_steps=2, guidance_scale=0.0,
                max_sequence_length=max_sequence_length, generator=torch.Generator().manual_seed(0),
                output_type="pt").images


def test_stock_sd3_pipeline_with_the_handle(sd3_pipe):
    """The integration DistilledDiTPipeline needs: the negative encoded by the stock `encode_prompt` without CFG
    (outputs 0 and 2: embeds and pooled), the handle installed around an unchanged stock call."""
    pipe = sd3_pipe
    negative = "blurry, watermark"
    embeds, _, pooled, _ = pipe.encode_prompt(negative, negative, negative, do_classifier_free_guidance=False,
                                              max_sequence_length=16)
    assert embeds.shape == (1, 77 + 16, 64) and pooled.shape == (1, 48)
    original = dict(pipe.transformer.attn_processors)
    plain = sample(pipe)
    with apply_sd3_guidance(pipe.transformer, NAG).set_negative(embeds, pooled):
        nag = sample(pipe)
        with pytest.raises(ValueError, match=r"is \(93, 64\) .*the positive \(109, 64\)"):  # T = 77 + 32
            sample(pipe, max_sequence_length=32)
    assert (nag - plain).abs().max() > 1e-3
    with apply_sd3_guidance(pipe.transformer, NegativeGuidance.checked("nag", nag_scale=1.0)).set_negative(embeds,
                                                                                                          pooled):
        assert torch.equal(sample(pipe), plain)
    with apply_sd3_guidance(pipe.transformer, NASA).set_negative(embeds, pooled):
        assert (sample(pipe) - plain).abs().max() > 1e-3
    assert hooks_of(pipe.transformer) == 0 and all(pipe.transformer.attn_processors[n] is p
                                                   for n, p in original.items())
    assert torch.equal(sample(pipe), plain)
