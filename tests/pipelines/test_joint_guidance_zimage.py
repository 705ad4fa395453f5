"""NASA/NAG on Z-Image — one image stream, two caption streams (pipelines/nasa_joint_zimage.py) — against a
float64 reference of the construction written here: per sample, with no batch padding, the diffusers modules of
the model run one by one (patchify, embedders, refiners, main layers, final layer, unpatchify) on [img, cap+, cap−],
with a test-local attention that writes softmax(QKᵀ/√d)V and Z-Image's RoPE out from their formulas, masks each
query's keys (image queries: Z+ over [img, cap+], Z− over [img, cap−]; cap± over [img, cap±]) and mixes the image
rows by the formula of SNOOPI eq. 9 or of the official NAG code. Nothing of `nasa_joint_zimage` is called by it."""

import copy

import pytest
import torch

from swiftstep.core.nasa import NegativeGuidance
from swiftstep.pipelines.nasa_joint_zimage import ZImageJointGuidanceProcessor, apply_zimage_guidance

from ..dit_fixtures.qwen_family import build_zimage
from ..tolerance import assert_close_to_scale
from .joint_reference import heads, hooks_of, recording, rope, softmax_attention

NAG = NegativeGuidance.checked("nag", nag_scale=5.0, nag_tau=2.5, nag_alpha=0.25, nag_norm=2)  # official FLUX example
NAG_CLIPPING = NegativeGuidance.checked("nag", nag_scale=9.0, nag_tau=1.2, nag_alpha=0.7, nag_norm=2)  # τ binds
NASA = NegativeGuidance.checked("nasa", alpha=0.4)
WIDTH = 32  # the fixture's cap_feat_dim (Qwen3 hidden size)
# caption lengths (tokens, before Z-Image pads each to a multiple of 32): positives, negatives. Positives 7 and 40
# pad to 32 and 64, so the stock [img, cap] rows are batch-padded and masked; negatives 45 and 3 likewise; one
# negative serves every sample; in the single-sample case the negative is longer than the positive and nothing is
# masked.
CASES = {"two-samples-one-negative": ((7, 40), (9,)),
         "two-samples-two-negatives": ((7, 40), (45, 3)),
         "one-sample-longer-negative": ((5,), (50,))}


# ---------------------------------------------------------------- model and inputs
@pytest.fixture(scope="module")
def pipe():
    """The Z-Image-Turbo fixture: width 128 (1 head × 128), 2 main layers, 2 refiner layers of each kind."""
    return build_zimage()


@pytest.fixture(scope="module")
def tiny(pipe):
    return pipe.transformer.eval()


def inputs(case, seed=0, latent=(8, 12)):
    """Latents [16, 1, 8, 12] (24 patches, padded by Z-Image to 32), timesteps, positive and negative captions."""
    g = torch.Generator().manual_seed(seed)
    lengths, neg_lengths = CASES[case]
    x = [torch.randn(16, 1, *latent, generator=g) for _ in lengths]
    caps = [torch.randn(n, WIDTH, generator=g) for n in lengths]
    negs = [torch.randn(n, WIDTH, generator=g) for n in neg_lengths]
    return x, torch.tensor([0.3, 0.8][: len(lengths)]), caps, negs


def run(model, x, t, caps):
    with torch.no_grad():
        return torch.stack(model(x, t, caps).sample)


def guided(model, x, t, caps, guidance, negs):
    with apply_zimage_guidance(model, guidance).set_negative(negs):
        return run(model, x, t, caps)


# ---------------------------------------------------------------- the reference (float64, per sample)
class ReferenceAttention:
    """Z-Image attention from its formulas: q, k after the QK RMS norms rotated pairwise by the complex RoPE table
    ((a + ib)·e^{iθ}), softmax(QKᵀ/√d)V. With `kind` (0 img, 1 cap+, 2 cap− per token, image first): caption
    queries see their own caption and the image, image queries give Z+ (keys img, cap+) and Z− (keys img, cap−),
    mixed by `mix`."""

    def __init__(self, mix=None, kind=None):
        self.mix, self.kind = mix, kind

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        assert attention_mask is None  # one sample at a time: nothing padded
        q, k, v = (heads(attn, f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v))
        cos, sin = (part.repeat_interleave(2, dim=-1) for part in (freqs_cis[0].real, freqs_cis[0].imag))
        q, k = rope(attn.norm_q(q), cos, sin), rope(attn.norm_k(k), cos, sin)
        if self.kind is None:
            return attn.to_out[0](softmax_attention(q, k, v))
        kind, img = self.kind, self.kind == 0
        z_text = softmax_attention(q, k, v, (kind[:, None] == kind[None, :]) | (kind[None, :] == 0))
        z_pos = softmax_attention(q[:, img], k, v, (kind != 2)[None, :])
        z_neg = softmax_attention(q[:, img], k, v, (kind != 1)[None, :])
        return attn.to_out[0](torch.cat([self.mix(z_pos, z_neg), z_text[:, ~img]], dim=1))


@torch.no_grad()
def reference(model, x, t, caps, negs, guidance):
    """The Z-Image forward with a negative caption stream, in float64, one sample at a time (see the docstring).
    Returns (output [B, 16, 1, H, W], whether NAG clipped)."""
    m = copy.deepcopy(model).double()
    negs = negs * len(x) if len(negs) == 1 else negs
    mix, seen = recording(guidance)
    temb = m.t_embedder(t.double() * m.t_scale)
    for layer in [*m.noise_refiner, *m.context_refiner]:
        layer.attention.set_processor(ReferenceAttention())

    def rope_table(pos, n):  # Z-Image's position ids can outrun the padded caption: its first n rows
        return m.rope_embedder(pos[:n]).to(torch.complex128)

    def caption(cap, pos, pad):  # Z-Image pads the caption to a multiple of 32 with its pad token; own positions
        c = torch.where(pad[:, None], m.cap_pad_token, m.cap_embedder(cap))
        f = rope_table(pos, len(c))
        for layer in m.context_refiner:
            c = layer(c[None], None, f[None])[0]
        return c, f

    out = []
    for i in range(len(x)):
        (img,), (cap_p,), size, (img_pos,), (cap_p_pos,), (img_pad,), (cap_p_pad,) = m.patchify_and_embed(
            [x[i].double()], [caps[i].double()], 2, 1)
        _, (cap_n,), _, _, (cap_n_pos,), _, (cap_n_pad,) = m.patchify_and_embed([x[i].double()], [negs[i].double()],
                                                                                  2, 1)
        e = torch.where(img_pad[:, None], m.x_pad_token, m.all_x_embedder["2-1"](img))
        f = rope_table(img_pos, len(e))  # the image's first axis starts after the positive caption
        for layer in m.noise_refiner:
            e = layer(e[None], None, f[None], temb[i:i + 1])[0]
        (cp, fp), (cn, fn) = caption(cap_p, cap_p_pos, cap_p_pad), caption(cap_n, cap_n_pos, cap_n_pad)
        seq, freqs = torch.cat([e, cp, cn]), torch.cat([f, fp, fn])
        kind = torch.tensor([0] * len(e) + [1] * len(cp) + [2] * len(cn))
        for layer in m.layers:
            layer.attention.set_processor(ReferenceAttention(mix, kind))
            seq = layer(seq[None], None, freqs[None], temb[i:i + 1])[0]
        y = m.all_final_layer["2-1"](seq[None, : len(e) + len(cp)], c=temb[i:i + 1])  # cap− dropped
        out.append(m.unpatchify(list(y), size, 2, 1)[0])
    return torch.stack(out), seen["clipped"]


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("case", CASES)
def test_the_reference_without_guidance_is_the_plain_transformer(tiny, case):
    """Checks the reference's plumbing (per-sample sequences, RoPE, refiners, dropping cap−) against diffusers' own
    batched forward: with the mix = Z+ the negative stream cannot reach the image."""
    x, t, caps, negs = inputs(case)
    assert_close_to_scale(run(tiny, x, t, caps), reference(tiny, x, t, caps, negs, None)[0], rel=2e-6)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("guidance", [NAG, NAG_CLIPPING, NASA], ids=["nag-flux-example", "nag-tau-binding", "nasa"])
def test_guidance_equals_the_float64_reference(tiny, guidance, case):
    x, t, caps, negs = inputs(case, seed=1)
    expected, clipped = reference(tiny, x, t, caps, negs, guidance)
    got = guided(tiny, x, t, caps, guidance, negs)
    assert_close_to_scale(got, expected, rel=1e-4, what=f"{guidance.mode} {case}")
    assert (got - run(tiny, x, t, caps)).abs().max() > 3e-3 * expected.abs().max()  # ≫ the tolerance: visible
    if guidance is NAG_CLIPPING:
        assert clipped


def test_guidance_off_is_bit_identical_and_remove_restores(tiny):
    x, t, caps, negs = inputs("two-samples-two-negatives", seed=2)
    plain = run(tiny, x, t, caps)
    original = [layer.attention.processor for layer in tiny.layers]
    for off in (NegativeGuidance.checked("nasa", alpha=0.0), NegativeGuidance.checked("nag", nag_scale=1.0)):
        handle = apply_zimage_guidance(tiny, off).set_negative(negs)
        assert not handle.installed and hooks_of(tiny) == 0
        assert torch.equal(run(tiny, x, t, caps), plain)
        handle.remove()
    with apply_zimage_guidance(tiny, NAG).set_negative(negs) as handle:
        assert hooks_of(tiny) > 0 and all(isinstance(layer.attention.processor, ZImageJointGuidanceProcessor)
                                          for layer in tiny.layers)
        assert not torch.equal(run(tiny, x, t, caps), plain)
    assert handle.original is None and hooks_of(tiny) == 0 and not handle.installed
    assert all(layer.attention.processor is p for layer, p in zip(tiny.layers, original))
    assert torch.equal(run(tiny, x, t, caps), plain)


def test_a_tensor_negative_is_the_list_it_holds(tiny):
    x, t, caps, negs = inputs("two-samples-one-negative", seed=3)
    expected = guided(tiny, x, t, caps, NASA, negs)
    assert torch.equal(guided(tiny, x, t, caps, NASA, negs[0]), expected)  # [L, C]
    assert torch.equal(guided(tiny, x, t, caps, NASA, negs[0][None].expand(2, -1, -1)), expected)  # [B, L, C]


def test_bad_input_names_the_argument(tiny):
    x, t, caps, negs = inputs("two-samples-one-negative")
    original = [layer.attention.processor for layer in tiny.layers]
    nan = negs[0].clone()
    nan[2, 5] = float("nan")
    for neg, match in [(torch.randn(9, 16), r"negative `cap_feats\[0\]` must be \[L ≥ 1, 32\].*got \(9, 16\)"),
                       ([negs[0], torch.randn(0, WIDTH)], r"`cap_feats\[1\]` must be \[L ≥ 1, 32\].*got \(0, 32\)"),
                       (torch.randn(WIDTH), r"negative `cap_feats` must be a list of \[L, 32\] tensors"),
                       ([], r"negative `cap_feats` must be a non-empty list"),
                       ([nan], r"`cap_feats\[0\]` must be finite .*1 NaN/inf")]:
        with pytest.raises(ValueError, match=match):
            apply_zimage_guidance(tiny, NAG).set_negative(neg)
        assert hooks_of(tiny) == 0  # a rejected negative leaves nothing installed
    assert all(layer.attention.processor is p for layer, p in zip(tiny.layers, original))
    with apply_zimage_guidance(tiny, NAG).set_negative(negs * 3), \
            pytest.raises(ValueError, match=r"negative `cap_feats` has 3 prompts; expected 1 or one per sample \(2\)"):
        run(tiny, x, t, caps)
    with apply_zimage_guidance(tiny, NAG), pytest.raises(ValueError, match=r"call `set_negative\(cap_feats\)`"):
        run(tiny, x, t, caps)
    with apply_zimage_guidance(tiny, NAG).set_negative(negs), pytest.raises(ValueError, match=r"one size .*`x`"):
        run(tiny, [x[0], torch.randn(16, 1, 8, 32)], t, caps)
    with apply_zimage_guidance(tiny, NAG).set_negative(negs), \
            pytest.raises(ValueError, match="`controlnet_block_samples`"):
        tiny(x, t, caps, controlnet_block_samples={0: torch.zeros(1)})
    with pytest.raises(ValueError, match="supports ZImageTransformer2DModel; got Linear"):
        apply_zimage_guidance(torch.nn.Linear(2, 2), NAG)
    with pytest.raises(TypeError, match="NegativeGuidance"):
        apply_zimage_guidance(tiny, {"mode": "nag"})
    assert hooks_of(tiny) == 0
    with apply_zimage_guidance(tiny, NAG), pytest.raises(ValueError, match="remove other attention patches first"):
        apply_zimage_guidance(tiny, NASA)
    assert hooks_of(tiny) == 0 and all(layer.attention.processor is p for layer, p in zip(tiny.layers, original))


# ---------------------------------------------------------------- the stock ZImagePipeline (guidance_scale = 0)
def sample(pipe, prompt="a lighthouse at dusk"):
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, height=32, width=32, num_inference_steps=2, guidance_scale=0.0, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images


def test_stock_pipeline_with_a_negative_prompt(pipe):
    plain = sample(pipe)
    negative, _ = pipe.encode_prompt("blurry, watermark", do_classifier_free_guidance=False)  # [[L−, 32]]
    with apply_zimage_guidance(pipe.transformer, NAG).set_negative(negative):
        nag = sample(pipe)
    assert (nag - plain).abs().max() > 1e-3
    with apply_zimage_guidance(pipe.transformer, NegativeGuidance.checked("nag", nag_scale=1.0)).set_negative(negative):
        assert torch.equal(sample(pipe), plain)
    with apply_zimage_guidance(pipe.transformer, NASA).set_negative(negative):
        assert (sample(pipe) - plain).abs().max() > 1e-3
    assert hooks_of(pipe.transformer) == 0 and torch.equal(sample(pipe), plain)
