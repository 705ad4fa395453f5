"""NASA/NAG on Qwen-Image — one image stream, two text streams (pipelines/nasa_joint_qwenimage.py) — against a
float64 reference of the construction written here: per sample, with no padding, the diffusers modules of the model
(img_in, txt_norm, txt_in, the timestep embedder, pos_embed, the blocks, norm_out, proj_out) run on one row
[txt+, txt−, img] — each caption its unpadded tokens, its RoPE table from its own length, both modulated by the one
temb as the block does for any text row — with a test-local attention that writes softmax(QKᵀ/√d)V and Qwen-Image's
complex RoPE out from their formulas, masks each query's keys (txt± over [txt±, img]; image queries: Z+ over
[txt+, img], Z− over [txt−, img]) and mixes the image rows by the formula of SNOOPI eq. 9 or of the official NAG code.
Nothing of `nasa_joint_qwenimage` is called by it."""

import copy
from math import prod

import pytest
import torch
from diffusers import QwenImageTransformer2DModel

from swiftstep.core.nasa import NegativeGuidance
from swiftstep.pipelines.nasa_joint import JointGuidanceHandle
from swiftstep.pipelines.nasa_joint_qwenimage import QwenJointGuidanceProcessor, apply_qwenimage_guidance

from ..dit_fixtures.qwen_family import _perturb_constants, build_qwenimage
from ..tolerance import assert_close_to_scale
from .joint_reference import heads, hooks_of, recording, rope, softmax_attention

# no published Qwen-Image setting: FLUX.1's (the official FLUX example, L2 ratio), the closest dual-stream MMDiT
NAG = NegativeGuidance.for_family("flux", "nag")
NAG_CLIPPING = NegativeGuidance.for_family("flux", "nag", nag_scale=9.0, nag_tau=1.2, nag_alpha=0.7)  # τ binds
NASA = NegativeGuidance.for_family("flux", "nasa", alpha=0.4)
WIDTH, GRID = 32, (1, 4, 4)  # the fixture's joint_attention_dim; a 64 px image: 8×8 latents, 4×4 tokens of 2×2
# text lengths, positives then negatives; a batch of different lengths is padded to the longest and masked, as
# QwenImagePipeline.encode_prompt returns it (mask None when nothing is padded)
CASES = {"two-samples-one-shorter-negative": ((7, 12), (5,)),  # positives masked, negative unmasked and shorter
         "two-samples-two-negatives-longer": ((7, 12), (15, 3)),  # negatives masked, the batch longer: pads txt+
         "one-sample-longer-negative": ((6,), (11,)),  # no mask given: the handle makes them
         "one-sample-same-length": ((9,), (9,))}  # no mask at all


# ---------------------------------------------------------------- models and inputs
@pytest.fixture(scope="module")
def pipe():
    return build_qwenimage()


@pytest.fixture(scope="module")
def tiny(pipe):
    """The Qwen-Image fixture's transformer: width 128 (1 head × 128), 1 block."""
    return pipe.transformer.eval()


def variant(tiny, seed=1, **config):
    torch.manual_seed(seed)
    base = {k: v for k, v in tiny.config.items() if not k.startswith("_")}  # `_use_default_values` would win
    model = QwenImageTransformer2DModel.from_config({**base, **config}).eval()
    _perturb_constants(model)
    return model


@pytest.fixture(scope="module")
def models(tiny):
    """The fixture; two blocks of 2 heads (the negative text stream carried from block to block, NAG's norm over
    merged heads); `zero_cond_t` (Qwen-Image-Edit-2511: a condition image modulated by t = 0, text by the first
    temb chunk)."""
    return {"fixture": tiny, "two-blocks": variant(tiny, num_layers=2, num_attention_heads=2),
            "zero-cond-t": variant(tiny, seed=2, num_layers=2, zero_cond_t=True)}


def embeds(lengths, g):
    """[B, max L, WIDTH] with random values in the padding too (it must not matter), mask [B, max L] or None."""
    t = max(lengths)
    x = torch.randn(len(lengths), t, WIDTH, generator=g)
    mask = (torch.arange(t)[None] < torch.tensor(lengths)[:, None]).long()
    return x, (None if mask.all() else mask)


def inputs(model, case, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths, neg_lengths = CASES[case]
    b, shapes = len(lengths), [GRID, GRID] if model.zero_cond_t else [GRID]  # zero_cond_t: target + condition
    text, mask = embeds(lengths, g)
    x = dict(hidden_states=torch.randn(b, sum(prod(s) for s in shapes), model.config.in_channels, generator=g),
             encoder_hidden_states=text, encoder_hidden_states_mask=mask,
             timestep=torch.tensor([0.9, 0.4][:b]), img_shapes=[shapes] * b)
    return x, embeds(neg_lengths, g)


def run(model, x):
    with torch.no_grad():
        return model(**x).sample


def guided(model, x, guidance, neg):
    with apply_qwenimage_guidance(model, guidance).set_negative(*neg):
        return run(model, x)


# ---------------------------------------------------------------- the reference (float64, per sample)
class ReferenceAttention:
    """Qwen-Image joint attention from its formulas on one row [txt+, txt−, img] (`kind` 1, 2, 0 per token): q, k
    after the QK RMS norms rotated pairwise by the complex RoPE table ((a + ib)·e^{iθ}), softmax(QKᵀ/√d)V; text
    queries see their own caption and the image, image queries give Z+ and Z−, mixed by `mix`."""

    def __init__(self, mix, kind):
        self.mix, self.kind = mix, kind

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        assert encoder_hidden_states_mask is None and attention_mask is None  # one sample, nothing padded
        img_freqs, txt_freqs = image_rotary_emb
        freqs = torch.cat([txt_freqs, img_freqs]).to(torch.complex128)  # text first, as the stock processor
        cos, sin = (part.repeat_interleave(2, dim=-1) for part in (freqs.real, freqs.imag))
        q, k, v = (torch.cat([heads(attn, g(encoder_hidden_states)), heads(attn, f(hidden_states))], dim=1)
                   for f, g in ((attn.to_q, attn.add_q_proj), (attn.to_k, attn.add_k_proj),
                                (attn.to_v, attn.add_v_proj)))
        t = encoder_hidden_states.shape[1]
        q = rope(torch.cat([attn.norm_added_q(q[:, :t]), attn.norm_q(q[:, t:])], dim=1), cos, sin)
        k = rope(torch.cat([attn.norm_added_k(k[:, :t]), attn.norm_k(k[:, t:])], dim=1), cos, sin)
        kind, text = self.kind, self.kind != 0
        z_text = softmax_attention(q[:, text], k, v, (kind[text][:, None] == kind[None, :]) | (kind[None, :] == 0))
        z_pos = softmax_attention(q[:, ~text], k, v, (kind != 2)[None, :])
        z_neg = softmax_attention(q[:, ~text], k, v, (kind != 1)[None, :])
        return attn.to_out[0](self.mix(z_pos, z_neg)), attn.to_add_out(z_text)


@torch.no_grad()
def reference(model, x, neg, guidance):
    """The Qwen-Image forward with a negative text stream, in float64, one sample at a time (see the docstring).
    Returns (output [B, N, p·p·C], whether NAG clipped)."""
    m = copy.deepcopy(model).double()
    mix, seen = recording(guidance)
    b = x["hidden_states"].shape[0]
    neg_text, neg_mask = neg[0].repeat_interleave(b // neg[0].shape[0], 0), neg[1]
    neg_mask = torch.ones(neg_text.shape[:2]) if neg_mask is None else neg_mask.repeat_interleave(b // len(neg_mask), 0)
    pos_mask = x["encoder_hidden_states_mask"]
    pos_mask = torch.ones(x["encoder_hidden_states"].shape[:2]) if pos_mask is None else pos_mask
    out = []
    for i in range(b):
        shapes = x["img_shapes"][i]
        img = m.img_in(x["hidden_states"][i:i + 1].double())
        t, index = x["timestep"][i:i + 1].double(), None
        if m.zero_cond_t:  # the target image (first shape) at t, the condition images at t = 0; text at t
            t = torch.cat([t, 0 * t])
            index = torch.tensor([[0] * prod(shapes[0]) + [1] * sum(prod(s) for s in shapes[1:])])
        temb = m.time_text_embed(t, img)
        captions = [c[i, mask[i].bool()].double() for c, mask in ((x["encoder_hidden_states"], pos_mask),
                                                                  (neg_text, neg_mask))]
        tables = [m.pos_embed([shapes], max_txt_seq_len=len(c), device=img.device) for c in captions]
        text = torch.cat([m.txt_in(m.txt_norm(c)) for c in captions])[None]
        freqs = (tables[0][0], torch.cat([tables[0][1], tables[1][1]]))  # each caption its own length's table
        kind = torch.tensor([1] * len(captions[0]) + [2] * len(captions[1]) + [0] * img.shape[1])
        for block in m.transformer_blocks:
            block.attn.set_processor(ReferenceAttention(mix, kind))
            text, img = block(img, text, None, temb, freqs, None, index)
        out.append(m.proj_out(m.norm_out(img, temb[:1])))
    return torch.cat(out), seen["clipped"]


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("case", CASES)
def test_the_reference_without_guidance_is_the_plain_transformer(models, case):
    """Checks the reference's plumbing (unpadded captions, per-caption RoPE tables, one temb for both, zero_cond_t)
    against diffusers' own batched, masked forward: with the mix = Z+ the negative stream cannot reach the image."""
    for name, model in models.items():
        x, neg = inputs(model, case)
        assert_close_to_scale(run(model, x), reference(model, x, neg, None)[0], rel=2e-6, what=f"{name} {case}")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("guidance", [NAG, NAG_CLIPPING, NASA], ids=["nag-flux-defaults", "nag-tau-binding", "nasa"])
def test_guidance_equals_the_float64_reference(models, guidance, case):
    clipped_anywhere = False
    for name, model in models.items():
        x, neg = inputs(model, case, seed=1)
        expected, clipped = reference(model, x, neg, guidance)
        got = guided(model, x, guidance, neg)
        assert_close_to_scale(got, expected, rel=1e-4, what=f"{name} {guidance.mode} {case}")
        assert (got - run(model, x)).abs().max() > 1e-3 * expected.abs().max()  # 10× the tolerance: visible
        clipped_anywhere |= clipped
    if guidance is NAG_CLIPPING:
        assert clipped_anywhere


def test_the_negative_padding_is_masked_out(models):
    """The same negative alone and padded within a batch of negatives (garbage behind its mask): the same image."""
    model = models["two-blocks"]
    x, _ = inputs(model, "two-samples-one-shorter-negative", seed=3)
    g = torch.Generator().manual_seed(4)
    short, long = torch.randn(1, 4, WIDTH, generator=g), torch.randn(1, 13, WIDTH, generator=g)
    padded = torch.cat([torch.cat([short, torch.randn(1, 9, WIDTH, generator=g)], dim=1), long])
    mask = torch.tensor([[1] * 4 + [0] * 9, [1] * 13])
    alone = guided(model, x, NAG, (short.expand(2, -1, -1),))
    in_batch = guided(model, x, NAG, (padded, mask))
    assert_close_to_scale(in_batch[0], alone[0])
    assert (in_batch[1] - alone[1]).abs().max() > 1e-3 * alone.abs().max()  # the second sample's negative differs


def test_guidance_off_is_bit_identical_and_remove_restores(models):
    model = models["two-blocks"]
    x, neg = inputs(model, "two-samples-two-negatives-longer", seed=2)
    plain = run(model, x)
    original = dict(model.attn_processors)
    for off in (NegativeGuidance.for_family("flux", "nasa", alpha=0.0),
                NegativeGuidance.for_family("flux", "nag", nag_scale=1.0)):
        handle = apply_qwenimage_guidance(model, off).set_negative(*neg)
        assert not handle.installed and hooks_of(model) == 0
        assert all(model.attn_processors[n] is p for n, p in original.items())
        assert torch.equal(run(model, x), plain)
        handle.remove()
    with apply_qwenimage_guidance(model, NAG).set_negative(*neg) as handle:
        assert isinstance(handle, JointGuidanceHandle) and handle.installed and hooks_of(model) > 0
        assert all(isinstance(p, QwenJointGuidanceProcessor) for p in model.attn_processors.values())
        assert not torch.equal(run(model, x), plain)
    assert handle.original is None and not handle.installed and hooks_of(model) == 0
    assert all(model.attn_processors[n] is p for n, p in original.items())
    assert torch.equal(run(model, x), plain)


def test_bad_input_names_the_argument(tiny):
    x, (neg, neg_mask) = inputs(tiny, "two-samples-two-negatives-longer")
    original = dict(tiny.attn_processors)
    nan = neg.clone()
    nan[0, 2, 5] = float("nan")
    rejected = [((neg[0], None), r"negative `prompt_embeds` must be a \[B, T ≥ 1, C\] tensor, got \(15, 32\)"),
                ((neg[:, :0], None), r"negative `prompt_embeds` must be a \[B, T ≥ 1, C\] tensor, got \(2, 0, 32\)"),
                ((nan, neg_mask), r"`prompt_embeds` must be finite .*1 NaN/inf"),
                ((neg, neg_mask[:, :9]), r"negative `prompt_embeds_mask` must be \[B, T\] = \[2, 15\] like "
                                         r"`prompt_embeds`, got \(2, 9\)"),
                ((neg, neg_mask.float() * 0.5), r"`prompt_embeds_mask` must hold 1 \(attend\) and 0 \(padding\).*"
                                                r"0\.5"),
                ((neg, torch.zeros_like(neg_mask).index_fill(0, torch.tensor([0]), 1)),
                 r"`prompt_embeds_mask` masks every token of row 1")]
    for args, match in rejected:
        with pytest.raises(ValueError, match=match):
            apply_qwenimage_guidance(tiny, NAG).set_negative(*args)
        assert hooks_of(tiny) == 0  # a rejected negative leaves nothing installed
    assert all(tiny.attn_processors[n] is p for n, p in original.items())
    at_call = [((torch.randn(1, 5, 16),), r"negative `prompt_embeds` has width 16, the positive 32"),
               ((torch.randn(3, 5, WIDTH),), r"negative `prompt_embeds` has batch 3, which does not divide the model "
                                             r"batch 2")]
    for args, match in at_call:
        with apply_qwenimage_guidance(tiny, NAG).set_negative(*args), pytest.raises(ValueError, match=match):
            run(tiny, x)
    with apply_qwenimage_guidance(tiny, NAG), pytest.raises(ValueError, match=r"call `set_negative\(prompt_embeds"):
        run(tiny, x)
    with apply_qwenimage_guidance(tiny, NAG).set_negative(neg), \
            pytest.raises(ValueError, match=r"`encoder_hidden_states` has batch 1, `hidden_states` 2"):
        run(tiny, {**x, "encoder_hidden_states": x["encoder_hidden_states"][:1], "encoder_hidden_states_mask": None})
    with apply_qwenimage_guidance(tiny, NAG).set_negative(neg), \
            pytest.raises(ValueError, match=r"`encoder_hidden_states_mask` must be \[2, 12\]"):
        run(tiny, {**x, "encoder_hidden_states_mask": x["encoder_hidden_states_mask"][:, :5]})
    with pytest.raises(ValueError, match="supports QwenImageTransformer2DModel; got Linear"):
        apply_qwenimage_guidance(torch.nn.Linear(2, 2), NAG)
    with pytest.raises(TypeError, match="NegativeGuidance"):
        apply_qwenimage_guidance(tiny, {"mode": "nag"})
    with apply_qwenimage_guidance(tiny, NAG), pytest.raises(ValueError, match=r"replaces "
                                                                            r"QwenDoubleStreamAttnProcessor2_0; "
                                                                            r"transformer_blocks\.0\.attn\.processor "
                                                                            r"has QwenJointGuidanceProcessor \(remove "
                                                                            r"other attention patches first\)"):
        apply_qwenimage_guidance(tiny, NASA)
    assert hooks_of(tiny) == 0 and all(tiny.attn_processors[n] is p for n, p in original.items())


# ---------------------------------------------------------------- the stock QwenImagePipeline (true_cfg_scale = 1)
def sample(pipe, prompt="a lighthouse at dusk"):
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, height=32, width=32, num_inference_steps=2, true_cfg_scale=1.0, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images


def test_stock_pipeline_with_a_negative_prompt(pipe):
    """The integration DistilledDiTPipeline needs: the negative encoded by the stock `encode_prompt` (embeds and
    mask), the handle installed around an unchanged stock call."""
    plain = sample(pipe)
    negative, mask = pipe.encode_prompt("blurry, watermark")
    assert negative.shape[0] == 1 and mask is None  # one prompt: nothing padded
    with apply_qwenimage_guidance(pipe.transformer, NAG).set_negative(negative, mask):
        nag = sample(pipe)
    assert (nag - plain).abs().max() > 1e-3
    with apply_qwenimage_guidance(pipe.transformer, NegativeGuidance.for_family("flux", "nag", nag_scale=1.0)) \
            .set_negative(negative, mask):
        assert torch.equal(sample(pipe), plain)
    with apply_qwenimage_guidance(pipe.transformer, NASA).set_negative(negative, mask):
        assert (sample(pipe) - plain).abs().max() > 1e-3
    # two prompts of different lengths, one negative each: both streams padded and masked by the stock encoder
    prompts = ["a lighthouse at dusk", "a red fox"]
    negatives, masks = pipe.encode_prompt(["blurry", "watermark, text, low quality"])
    assert masks is not None and not masks.all()
    plain_two = sample(pipe, prompts)
    with apply_qwenimage_guidance(pipe.transformer, NAG).set_negative(negatives, masks):
        assert (sample(pipe, prompts) - plain_two).abs().max() > 1e-3
    assert hooks_of(pipe.transformer) == 0 and torch.equal(sample(pipe), plain)
