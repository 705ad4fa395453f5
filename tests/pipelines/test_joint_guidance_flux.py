"""NASA/NAG on FLUX.1 joint attention — one image stream, two text streams (pipelines/nasa_joint.py) — against
float64 references written here from the official NAG code's algorithm (ChenDarYen/Normalized-Attention-Guidance
src/transformer_flux.py, attention_flux_nag.py, normalization.py) and from SNOOPI eq. 9 applied the same way.

The references run the same diffusers blocks one by one, in float64, with test-local attention processors that
write attention out as softmax(QKᵀ/√d)V and RoPE out from its formula, and with the image AdaLN wrapped to take the
positive temb rows as the official `Trunc*` norms do. Nothing of `nasa_joint` is called by them."""

import copy

import pytest
import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

from swiftstep.core.nasa import NegativeGuidance
from swiftstep.pipelines import load_one_step
from swiftstep.pipelines.nasa_joint import FluxJointGuidanceProcessor, apply_joint_guidance

from ..dit_fixtures import write_folder
from ..dit_fixtures.flux_sd3 import _perturb_constants, build_flux
from ..tolerance import assert_close_to_scale
from .joint_reference import TruncNorm, heads, hooks_of, mix_reference, rope, softmax_attention

NAG = NegativeGuidance.checked("nag", nag_scale=5.0, nag_tau=2.5, nag_alpha=0.25, nag_norm=2)  # official FLUX example
NAG_CLIPPING = NegativeGuidance.checked("nag", nag_scale=9.0, nag_tau=1.2, nag_alpha=0.7, nag_norm=2)  # τ binds
NASA = NegativeGuidance.checked("nasa", alpha=0.4)
B, N_SIDE, T = 2, 4, 9  # batch, image grid side (N = 16 tokens), text tokens


# ---------------------------------------------------------------- models and inputs
@pytest.fixture(scope="module")
def tiny():
    """The FLUX.1-schnell fixture's transformer: width 256 (2 heads × 128), 1 double + 1 single block."""
    return build_flux().transformer.eval()


def variant(tiny, layers, single_layers, seed=1):
    torch.manual_seed(seed)
    model = FluxTransformer2DModel.from_config({**tiny.config, "num_layers": layers,
                                                "num_single_layers": single_layers}).eval()
    _perturb_constants(model)
    return model


@pytest.fixture(scope="module")
def deep(tiny):
    return variant(tiny, 2, 2)


def inputs(model, seed=0, b=B):
    g = torch.Generator().manual_seed(seed)
    rows, cols = torch.meshgrid(torch.arange(N_SIDE), torch.arange(N_SIDE), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).flatten(0, 1).float()
    c = model.config
    return dict(hidden_states=torch.randn(b, N_SIDE ** 2, c.in_channels, generator=g),
                encoder_hidden_states=torch.randn(b, T, c.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(b, c.pooled_projection_dim, generator=g),
                timestep=torch.tensor([0.9, 0.4][:b]), img_ids=img_ids, txt_ids=torch.zeros(T, 3))


def negatives(model, seed=5, b=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, T, model.config.joint_attention_dim, generator=g),
            torch.randn(b, model.config.pooled_projection_dim, generator=g))


def run(model, x):
    with torch.no_grad():
        return model(**x).sample


def guided(model, x, guidance, neg, construction="shared"):
    handle = apply_joint_guidance(model, guidance, construction).set_negative(*neg)
    try:
        return run(model, x)
    finally:
        handle.remove()


# ---------------------------------------------------------------- the references (float64, written from the papers)
class OfficialDouble:
    """The official dual-stream attention: image q/k/v tiled ×2 against the 2B text rows, full attention per row
    over [txt±, img], the image output of the positive row replaced by the mix, both text outputs kept."""

    def __init__(self, mix, freqs):
        self.mix, self.freqs = mix, freqs

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        b, t = hidden_states.shape[0], encoder_hidden_states.shape[1]
        q, k, v = (heads(attn, f(hidden_states)).repeat(2, 1, 1, 1) for f in (attn.to_q, attn.to_k, attn.to_v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        eq, ek, ev = (heads(attn, f(encoder_hidden_states)) for f in (attn.add_q_proj, attn.add_k_proj,
                                                                        attn.add_v_proj))
        eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
        q, k, v = (torch.cat([a, c], dim=1) for a, c in ((eq, q), (ek, k), (ev, v)))
        q, k = rope(q, *self.freqs), rope(k, *self.freqs)
        z = softmax_attention(q, k, v)  # [2B, T + N, C]
        image = self.mix(z[:b, t:], z[b:, t:])
        return attn.to_out[0](image), attn.to_add_out(z[:, :t])


class OfficialSingle:
    """The official single-stream attention on 2B rows [txt, img]: full attention per row, then the image part of
    both rows replaced by the mix of (row+, row−)."""

    def __init__(self, mix, freqs, t):
        self.mix, self.freqs, self.t = mix, freqs, t

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        b, t = hidden_states.shape[0] // 2, self.t
        q, k, v = (heads(attn, f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v))
        q, k = rope(attn.norm_q(q), *self.freqs), rope(attn.norm_k(k), *self.freqs)
        z = softmax_attention(q, k, v)
        image = self.mix(z[:b, t:], z[b:, t:])
        return torch.cat([z[:, :t], torch.cat([image, image])], dim=1)


class SharedSingle:
    """The shared single block on B rows [txt+, txt−, img], by masking one attention over all 2T + N tokens: txt+
    sees [txt+, img], txt− sees [txt−, img]; the image queries run twice, once hiding txt−, once hiding txt+."""

    def __init__(self, mix, freqs, t):
        self.mix, self.freqs, self.t = mix, freqs, t

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        t, s = self.t, hidden_states.shape[1]
        q, k, v = (heads(attn, f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v))
        q, k = rope(attn.norm_q(q), *self.freqs), rope(attn.norm_k(k), *self.freqs)
        kind = torch.zeros(s, dtype=torch.long)
        kind[t:2 * t], kind[2 * t:] = 1, 2  # 0 txt+, 1 txt−, 2 img
        text_rows = (kind[:, None] == kind[None, :]) | (kind[None, :] == 2)  # own text prefix + image keys
        z_text = softmax_attention(q, k, v, text_rows)
        z_pos = softmax_attention(q, k, v, (kind[None, :] != 1).expand(s, s))
        z_neg = softmax_attention(q, k, v, (kind[None, :] != 0).expand(s, s))
        return torch.cat([z_text[:, :2 * t], self.mix(z_pos[:, 2 * t:], z_neg[:, 2 * t:])], dim=1)


@torch.no_grad()
def reference(model, x, neg, guidance, construction="official"):
    """The whole FLUX forward with a negative prompt, in float64, block by block (see the module docstring)."""
    m = copy.deepcopy(model).double()
    x = {k: v.double() for k, v in x.items()}
    neg_embeds, neg_pooled = (t.double().repeat_interleave(B // t.shape[0], dim=0) for t in neg)
    mix = mix_reference(guidance)
    t = x["encoder_hidden_states"].shape[1]
    # the pipeline's concatenation: text and pooled [pos; neg], timestep doubled, latents once
    temb = m.time_text_embed(torch.cat([x["timestep"]] * 2) * 1000,
                             torch.cat([x["pooled_projections"], neg_pooled]))
    text = m.context_embedder(torch.cat([x["encoder_hidden_states"], neg_embeds]))
    image = m.x_embedder(x["hidden_states"])
    cos, sin = (f.double() for f in m.pos_embed(torch.cat([x["txt_ids"], x["img_ids"]])))
    for block in m.transformer_blocks:
        block.norm1 = TruncNorm(block.norm1)
        block.attn.set_processor(OfficialDouble(mix, (cos, sin)))
        text, image = block(hidden_states=image, encoder_hidden_states=text, temb=temb)
    if construction == "official":
        image = torch.cat([image, image])
        for block in m.single_transformer_blocks:
            block.attn.set_processor(OfficialSingle(mix, (cos, sin), t))
            text, image = block(hidden_states=image, encoder_hidden_states=text, temb=temb)
        image = image[:B]
    else:  # shared: one row [txt+, txt−, img] with the positive temb; the rotary table repeats the text positions
        text = torch.cat([text[:B], text[B:]], dim=1)
        cos2, sin2 = (torch.cat([f[:t], f[:t], f[t:]]) for f in (cos, sin))
        for block in m.single_transformer_blocks:
            block.attn.set_processor(SharedSingle(mix, (cos2, sin2), t))
            text, image = block(hidden_states=image, encoder_hidden_states=text, temb=temb[:B])
    return m.proj_out(m.norm_out(image, temb[:B]))


# ---------------------------------------------------------------- tests
def test_the_reference_without_guidance_is_the_plain_transformer(tiny, deep):
    """Checks the reference's plumbing (doubling, truncated norms, RoPE, attention) against diffusers' own forward:
    with the mix = Z+ the negative stream cannot reach the image."""
    for model in (tiny, deep):
        x = inputs(model)
        for construction in ("official", "shared"):
            assert_close_to_scale(run(model, x), reference(model, x, negatives(model), None, construction), rel=2e-6)


@pytest.mark.parametrize("guidance", [NAG, NAG_CLIPPING], ids=["nag-official-example", "nag-tau-binding"])
def test_official_construction_equals_the_official_nag_computation(tiny, deep, guidance):
    for model, neg_batch in ((tiny, 1), (deep, 2)):
        x, neg = inputs(model), negatives(model, b=neg_batch)
        expected = reference(model, x, neg, guidance, "official")
        got = guided(model, x, guidance, neg, "official")
        assert_close_to_scale(got, expected, rel=1e-4, what="official NAG")
        assert (got - run(model, x)).abs().max() > 3e-3 * expected.abs().max()  # ≫ the tolerance: visible


def test_nasa_equals_snoopi_eq9_applied_the_same_way(deep):
    x, neg = inputs(deep, seed=3), negatives(deep, seed=4, b=2)
    for construction in ("official", "shared"):
        expected = reference(deep, x, neg, NASA, construction)
        assert_close_to_scale(guided(deep, x, NASA, neg, construction), expected, rel=1e-4, what=construction)


def test_shared_construction_equals_its_reference_and_official_where_no_approximation_applies(tiny, deep):
    x, neg = inputs(deep, seed=6), negatives(deep, seed=7)
    shared = guided(deep, x, NAG, neg, "shared")
    assert_close_to_scale(shared, reference(deep, x, neg, NAG, "shared"), rel=1e-4, what="shared NAG")
    # the single-block approximation (positive temb for the negative tokens) is the only difference: it is visible
    # with different pooled embeddings, and gone when the negative prompt has the positive's pooled embedding ...
    official = guided(deep, x, NAG, neg, "official")
    assert (shared - official).abs().max() > 1e-3 * official.abs().max()
    same_pooled = (neg[0].repeat(B, 1, 1), x["pooled_projections"])
    assert_close_to_scale(guided(deep, x, NAG, same_pooled, "shared"),
                          guided(deep, x, NAG, same_pooled, "official"), what="same pooled")
    # ... or when the model has no single blocks
    double_only = variant(tiny, 2, 0)
    x = inputs(double_only, seed=8)
    assert_close_to_scale(guided(double_only, x, NAG, neg, "shared"), guided(double_only, x, NAG, neg, "official"),
                          what="no single blocks")
    assert_close_to_scale(guided(double_only, x, NAG, neg), reference(double_only, x, neg, NAG), rel=1e-4)


def test_guidance_off_is_bit_identical_and_remove_restores(deep):
    x, neg = inputs(deep, seed=9), negatives(deep)
    plain = run(deep, x)
    original = dict(deep.attn_processors)
    for off in (NegativeGuidance.checked("nasa", alpha=0.0), NegativeGuidance.checked("nag", nag_scale=1.0)):
        for construction in ("shared", "official"):
            handle = apply_joint_guidance(deep, off, construction).set_negative(*neg)
            assert not handle.installed and hooks_of(deep) == 0
            assert torch.equal(run(deep, x), plain)
            handle.remove()
    for construction in ("shared", "official"):
        with apply_joint_guidance(deep, NAG, construction).set_negative(*neg) as handle:
            assert hooks_of(deep) > 0 and any(isinstance(p, FluxJointGuidanceProcessor)
                                              for p in deep.attn_processors.values())
            assert not torch.equal(run(deep, x), plain)
        assert handle.original is None and hooks_of(deep) == 0
        assert all(deep.attn_processors[n] is p for n, p in original.items())
        assert torch.equal(run(deep, x), plain)


def test_bad_negatives_name_the_argument(tiny):
    x = inputs(tiny)
    embeds, pooled = negatives(tiny)
    cases = [((torch.randn(1, T + 2, 32), pooled), r"negative `prompt_embeds` is \(11, 32\).*positive \(9, 32\)"),
             ((torch.randn(3, T, 32), torch.randn(3, 32)), r"negative `prompt_embeds` has batch 3, which does not "
                                                          r"divide the model batch 2"),
             ((embeds, torch.randn(1, 8)), r"negative `pooled_embeds` has width 8, the positive 32")]
    for neg, match in cases:
        with apply_joint_guidance(tiny, NAG).set_negative(*neg), pytest.raises(ValueError, match=match):
            run(tiny, x)
    nan = embeds.clone()
    nan[0, 3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"`prompt_embeds` must be finite .*1 NaN/inf"):
        apply_joint_guidance(tiny, NAG).set_negative(nan, pooled)
    assert hooks_of(tiny) == 0  # a rejected negative leaves nothing installed
    with pytest.raises(ValueError, match=r"negative `pooled_embeds` must be \[1, P\]"):
        apply_joint_guidance(tiny, NAG).set_negative(embeds, torch.randn(2, 32))
    with apply_joint_guidance(tiny, NAG), pytest.raises(ValueError, match=r"call `set_negative"):
        run(tiny, x)
    with pytest.raises(ValueError, match=r"`construction` must be one of \('shared', 'official'\)"):
        apply_joint_guidance(tiny, NAG, "cheap")
    with pytest.raises(ValueError, match="supports FluxTransformer2DModel; got SD3Transformer2DModel"):
        apply_joint_guidance(SD3Transformer2DModel(num_layers=1, attention_head_dim=8, num_attention_heads=1,
                                                   joint_attention_dim=8, caption_projection_dim=8,
                                                   pooled_projection_dim=8, sample_size=8), NAG)
    with pytest.raises(TypeError, match="NegativeGuidance"):
        apply_joint_guidance(tiny, {"mode": "nag"})
    assert hooks_of(tiny) == 0


# ---------------------------------------------------------------- DistilledDiTPipeline(negative_prompt=...)
@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    return write_folder("flux", tmp_path_factory.mktemp("flux"))


def sample(pipe, **kw):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a lighthouse at dusk", height=32, width=32, generator=torch.Generator().manual_seed(0),
                output_type="pt", **kw).images


def test_flux_pipeline_negative_prompt_is_the_handle_applied_for_the_call(flux_folder):
    pipe = load_one_step(flux_folder)
    original = dict(pipe.transformer.attn_processors)
    plain = sample(pipe)
    nag = sample(pipe, negative_prompt="blurry, watermark", guidance="nag")
    assert (nag - plain).abs().max() > 1e-3
    assert torch.equal(sample(pipe, negative_prompt="blurry, watermark", guidance="nag", nag_scale=1.0), plain)
    assert hooks_of(pipe.transformer) == 0 and all(pipe.transformer.attn_processors[n] is p
                                                   for n, p in original.items())
    # by hand: the stock encoder at the preset's text length, the official FLUX NAG settings
    embeds, pooled, _ = pipe.encode_prompt("blurry, watermark", prompt_2=None, max_sequence_length=256)
    with apply_joint_guidance(pipe.transformer, NAG).set_negative(embeds, pooled):
        assert torch.equal(sample(pipe), nag)
    nasa = sample(pipe, negative_prompt="blurry, watermark", guidance="nasa", nasa_scale=0.3)
    with apply_joint_guidance(pipe.transformer, NegativeGuidance.checked("nasa", 0.3)).set_negative(embeds, pooled):
        assert torch.equal(sample(pipe), nasa)


def test_flux_pipeline_removes_the_guidance_on_errors_and_checks_its_arguments(flux_folder):
    pipe = load_one_step(flux_folder)

    def fail(*args):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        sample(pipe, negative_prompt="blurry", callback_on_step_end=fail)
    assert hooks_of(pipe.transformer) == 0
    assert not any(isinstance(p, FluxJointGuidanceProcessor) for p in pipe.transformer.attn_processors.values())
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and pipe.scheduler is not \
        pipe._grid_scheduler
    with pytest.raises(ValueError, match=r"`nag_scale` \(= φ \+ 1\) must be ≥ 1"):
        sample(pipe, negative_prompt="blurry", nag_scale=0.5)
    with pytest.raises(ValueError, match=r"`guidance` must be one of \('nasa', 'nag'\)"):
        sample(pipe, negative_prompt="blurry", guidance="cfg")
    with pytest.raises(ValueError, match=r"`negative_prompt` has 2 entries; expected 1 or one per prompt \(1\)"):
        sample(pipe, negative_prompt=["blurry", "dark"])
