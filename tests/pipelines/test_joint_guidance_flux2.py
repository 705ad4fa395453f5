"""NASA/NAG on FLUX.2 / FLUX.2-klein — one image stream, two text streams (pipelines/nasa_joint_flux2.py) — against
a float64 reference of the construction written here: the diffusers modules of the model run one by one (embedders,
modulations, dual-stream blocks on B image rows and 2B text rows [pos; neg], single-stream blocks on one row
[txt+, txt−, img] per sample, output layers), with test-local attention processors that write softmax(QKᵀ/√d)V, RoPE
and the SwiGLU of the fused single-block MLP out from their formulas, mask each query's keys (image queries: Z+ over
[txt+, img], Z− over [txt−, img]; txt± over [txt±, img]) and mix the image rows by the formula of SNOOPI eq. 9 or of
the official NAG code. Nothing of `nasa_joint_flux2` is called by it."""

import contextlib
import copy

import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel, FluxTransformer2DModel

from swiftstep.core.nasa import NegativeGuidance
from swiftstep.pipelines.nasa_joint import FluxJointGuidanceProcessor
from swiftstep.pipelines.nasa_joint_flux2 import Flux2SharedSingleProcessor, apply_flux2_guidance

from ..dit_fixtures.qwen_family import _perturb_constants, build_flux2_klein
from ..tolerance import assert_close_to_scale
from .joint_reference import heads, hooks_of, recording, rope, softmax_attention
from .test_joint_guidance_flux import OfficialDouble

# no published FLUX.2 setting: the FLUX.1 defaults (the official NAG code's FLUX example, L2 ratio)
NAG = NegativeGuidance.for_family("flux", "nag")
NAG_CLIPPING = NegativeGuidance.checked("nag", nag_scale=9.0, nag_tau=1.2, nag_alpha=0.7, nag_norm=2)  # τ binds
NASA = NegativeGuidance.for_family("flux", "nasa", alpha=0.4)
B, GRID, T = 2, (3, 5), 9  # batch, latent grid (N = 15 image tokens), text tokens


# ---------------------------------------------------------------- models and inputs
@pytest.fixture(scope="module")
def pipe():
    """The FLUX.2-klein-4B fixture: width 128 (1 head × 128), 1 dual-stream + 1 single-stream block."""
    return build_flux2_klein()


@pytest.fixture(scope="module")
def tiny(pipe):
    return pipe.transformer.eval()


def variant(tiny, layers, single_layers, seed=1, heads=1):
    torch.manual_seed(seed)
    config = {**tiny.config, "num_layers": layers, "num_single_layers": single_layers, "num_attention_heads": heads}
    model = Flux2Transformer2DModel.from_config(config).eval()
    _perturb_constants(model)
    return model


@pytest.fixture(scope="module")
def deep(tiny):
    """2 dual-stream + 2 single-stream blocks, 2 heads × 128 (NAG's norm runs over the merged heads)."""
    return variant(tiny, 2, 2, heads=2)


@pytest.fixture(scope="module")
def double_only(tiny):
    return variant(tiny, 2, 0, seed=2)


def inputs(model, seed=0, b=B):
    """The transformer's arguments as Flux2KleinPipeline builds them: packed latents, the stock position ids
    (image (0, h, w, 0), text (0, 0, 0, l)) with a batch axis, timesteps in [0, 1], no guidance embedding."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    embeds = torch.randn(b, T, c.joint_attention_dim, generator=g)
    latents = torch.randn(b, c.in_channels, *GRID, generator=g)
    return dict(hidden_states=latents.flatten(2).transpose(1, 2), encoder_hidden_states=embeds,
                timestep=torch.tensor([0.9, 0.4][:b]), img_ids=Flux2KleinPipeline._prepare_latent_ids(latents),
                txt_ids=Flux2KleinPipeline._prepare_text_ids(embeds), guidance=None)


def negative(model, seed=5, b=1, length=T):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, length, model.config.joint_attention_dim, generator=g)


def run(model, x):
    with torch.no_grad():
        return model(**x).sample


def guided(model, x, guidance, neg, text_ids=None):
    with apply_flux2_guidance(model, guidance).set_negative(neg, text_ids):
        return run(model, x)


@contextlib.contextmanager
def block_streams(model):
    """Every block's (text, image) output as the block returns it, before any hook of the guidance: dual-stream
    blocks (text [2B, T], image [B, N]), single-stream blocks [B, 2T + N] split after the 2T text tokens."""
    streams = []

    def record(block, args, output):
        if torch.is_tensor(output):
            output = (output[:, :-x_len[-1]], output[:, -x_len[-1]:])
        streams.append(tuple(o.clone() for o in output))

    x_len = []
    pre = model.register_forward_pre_hook(lambda m, a, kw: x_len.append(kw["hidden_states"].shape[1]),
                                          with_kwargs=True)
    hooks = [block.register_forward_hook(record) for block in [*model.transformer_blocks,
                                                               *model.single_transformer_blocks]]
    try:
        yield streams
    finally:
        for hook in [pre, *hooks]:
            hook.remove()


# ---------------------------------------------------------------- the reference (float64)
class SharedParallel:
    """The single-stream block's fused attention + MLP on one row [txt+, txt−, img] per sample: q, k, v and the MLP
    input from `to_qkv_mlp_proj` ([q, k, v, gate, linear]), QK RMS norms, RoPE from the extended table; one masked
    attention (txt± see [txt±, img]; the image queries once hiding txt−, once hiding txt+, mixed); SwiGLU
    gate·σ(gate)·linear; `to_out` over [attention, MLP]."""

    def __init__(self, mix, freqs, t):
        self.mix, self.freqs, self.t = mix, freqs, t

    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None):
        t, s, inner = self.t, hidden_states.shape[1], attn.inner_dim
        proj = attn.to_qkv_mlp_proj(hidden_states)
        q, k, v = (heads(attn, proj[..., i * inner:(i + 1) * inner]) for i in range(3))
        gate, linear = proj[..., 3 * inner:].chunk(2, dim=-1)
        q, k = rope(attn.norm_q(q), *self.freqs), rope(attn.norm_k(k), *self.freqs)
        kind = torch.zeros(s, dtype=torch.long)
        kind[t:2 * t], kind[2 * t:] = 1, 2  # 0 txt+, 1 txt−, 2 img
        z_text = softmax_attention(q, k, v, (kind[:, None] == kind[None, :]) | (kind[None, :] == 2))
        z_pos = softmax_attention(q, k, v, (kind[None, :] != 1).expand(s, s))
        z_neg = softmax_attention(q, k, v, (kind[None, :] != 0).expand(s, s))
        z = torch.cat([z_text[:, :2 * t], self.mix(z_pos[:, 2 * t:], z_neg[:, 2 * t:])], dim=1)
        return attn.to_out(torch.cat([z, gate * torch.sigmoid(gate) * linear], dim=-1))


@torch.no_grad()
def reference(model, x, neg, guidance):
    """The FLUX.2 forward with a negative text stream, in float64 (see the module docstring). Returns (output,
    whether NAG clipped, every block's (text, image) output)."""
    m = copy.deepcopy(model).double()
    b, t = x["hidden_states"].shape[0], x["encoder_hidden_states"].shape[1]
    neg = neg.double().repeat_interleave(b // neg.shape[0], dim=0)
    mix, seen = recording(guidance)
    streams = []
    temb = m.time_guidance_embed(x["timestep"].double() * 1000, None)  # timestep only: the same for both prompts
    mod_txt = m.double_stream_modulation_txt(temb)
    text = m.context_embedder(torch.cat([x["encoder_hidden_states"].double(), neg]))  # [pos; neg], 2B rows
    image = m.x_embedder(x["hidden_states"].double())
    cos, sin = (f.double() for f in m.pos_embed(torch.cat([x["txt_ids"][0], x["img_ids"][0]])))
    for block in m.transformer_blocks:
        block.attn.set_processor(OfficialDouble(mix, (cos, sin)))
        text, image = block(image, text, m.double_stream_modulation_img(temb), torch.cat([mod_txt, mod_txt]))
        streams.append((text, image))
    if len(m.single_transformer_blocks):  # one row [txt+, txt−, img]; the text positions repeat for txt−
        text = torch.cat([text[:b], text[b:]], dim=1)
        freqs = tuple(torch.cat([f[:t], f[:t], f[t:]]) for f in (cos, sin))
        for block in m.single_transformer_blocks:
            block.attn.set_processor(SharedParallel(mix, freqs, t))
            text, image = block(image, text, m.single_stream_modulation(temb), split_hidden_states=True)
            streams.append((text, image))
    return m.proj_out(m.norm_out(image, temb)), seen["clipped"], streams


# ---------------------------------------------------------------- tests
def test_the_reference_without_guidance_is_the_plain_transformer(tiny, deep, double_only):
    """Checks the reference's plumbing (2B text rows, one [txt+, txt−, img] row, RoPE, fused MLP) against diffusers'
    own forward: with the mix = Z+ the negative stream cannot reach the image."""
    for model in (tiny, deep, double_only):
        x = inputs(model)
        with block_streams(model) as streams:
            plain = run(model, x)
        expected, _, expected_streams = reference(model, x, negative(model), None)
        assert_close_to_scale(plain, expected, rel=2e-6)
        for got_block, expected_block in zip(streams, expected_streams):  # the positive rows of the text stream
            assert_close_to_scale(got_block[1], expected_block[1], rel=2e-6)
            t = got_block[0].shape[1]
            assert_close_to_scale(got_block[0], expected_block[0][:B, :t], rel=2e-6)


@pytest.mark.parametrize("guidance", [NAG, NAG_CLIPPING, NASA], ids=["nag-flux-defaults", "nag-tau-binding", "nasa"])
def test_guidance_equals_the_float64_reference(tiny, deep, guidance):
    for model, neg_batch in ((tiny, 1), (deep, 2)):
        x, neg = inputs(model, seed=1), negative(model, b=neg_batch)
        expected, clipped, expected_streams = reference(model, x, neg, guidance)
        with block_streams(model) as streams:
            got = guided(model, x, guidance, neg)
        assert_close_to_scale(got, expected, rel=1e-4, what=f"{guidance.mode} output")
        assert (got - run(model, x)).abs().max() > 3e-3 * expected.abs().max()  # ≫ the tolerance: visible
        if guidance is NAG_CLIPPING:
            assert clipped
        # block by block, both text streams included: the random gates are small (|modulation| ≈ 0.03), so an error
        # in the txt− stream of a middle block moves the output by only ~5e-6 of its scale, but its block by ~1e-2
        assert len(streams) == len(expected_streams)
        for i, (got_block, expected_block) in enumerate(zip(streams, expected_streams)):
            for name, a, e in zip(("text", "image"), got_block, expected_block):
                assert_close_to_scale(a, e, rel=1e-4, what=f"{guidance.mode} block {i} {name}")


def test_without_single_blocks_and_with_a_batch_of_two(double_only, deep):
    """The negative text is dropped after the last dual-stream block when no single block follows; a batch of two
    with one negative per sample."""
    x, neg = inputs(double_only, seed=3), negative(double_only, seed=4)
    assert_close_to_scale(guided(double_only, x, NAG, neg), reference(double_only, x, neg, NAG)[0], rel=1e-4)
    x, neg = inputs(deep, seed=10), negative(deep, b=2)
    expected = reference(deep, x, neg, NAG)[0]
    assert_close_to_scale(guided(deep, x, NAG, neg), expected, rel=1e-4)


def test_text_ids_of_the_negative_are_checked_against_the_positive(deep):
    x, neg = inputs(deep, seed=6), negative(deep)
    expected = guided(deep, x, NASA, neg)
    ids = Flux2KleinPipeline._prepare_text_ids(neg)  # what encode_prompt returns beside the embeddings
    assert torch.equal(guided(deep, x, NASA, neg, ids), expected)
    assert torch.equal(guided(deep, x, NASA, neg, ids[0]), expected)  # [T, 4]
    shifted = ids.clone()
    shifted[..., 0] = 1  # another time coordinate
    with apply_flux2_guidance(deep, NASA).set_negative(neg, shifted), \
            pytest.raises(ValueError, match="negative `text_ids` differ from the positive `txt_ids`"):
        run(deep, x)
    assert hooks_of(deep) == 0


def test_guidance_off_is_bit_identical_and_remove_restores(deep):
    x, neg = inputs(deep, seed=9), negative(deep)
    plain = run(deep, x)
    original = dict(deep.attn_processors)
    for off in (NegativeGuidance.checked("nasa", alpha=0.0), NegativeGuidance.checked("nag", nag_scale=1.0)):
        handle = apply_flux2_guidance(deep, off).set_negative(neg)
        assert not handle.installed and hooks_of(deep) == 0
        assert torch.equal(run(deep, x), plain)
        handle.remove()
    with apply_flux2_guidance(deep, NAG).set_negative(neg) as handle:
        procs = deep.attn_processors
        assert hooks_of(deep) > 0
        assert all(isinstance(procs[f"transformer_blocks.{i}.attn.processor"], FluxJointGuidanceProcessor)
                   and isinstance(procs[f"single_transformer_blocks.{i}.attn.processor"], Flux2SharedSingleProcessor)
                   for i in range(2))
        assert not torch.equal(run(deep, x), plain)
    assert handle.original is None and hooks_of(deep) == 0 and not handle.installed
    assert all(deep.attn_processors[n] is p for n, p in original.items())
    assert torch.equal(run(deep, x), plain)


def test_bad_input_names_the_argument(tiny):
    x, neg = inputs(tiny), negative(tiny)
    original = dict(tiny.attn_processors)
    for bad, match in [(negative(tiny, length=T + 2), r"negative `prompt_embeds` is \(11, 48\).*positive \(9, 48\)"),
                       (torch.randn(1, T, 32), r"negative `prompt_embeds` is \(9, 32\).*positive \(9, 48\)"),
                       (negative(tiny, b=3), r"negative `prompt_embeds` has batch 3, which does not divide the "
                                             r"model batch 2")]:
        with apply_flux2_guidance(tiny, NAG).set_negative(bad), pytest.raises(ValueError, match=match):
            run(tiny, x)
    nan = neg.clone()
    nan[0, 3, 1] = float("nan")
    for args, match in [((nan,), r"`prompt_embeds` must be finite .*1 NaN/inf"),
                        ((neg[0],), r"negative `prompt_embeds` must be a \[B, T, C\] tensor, got \(9, 48\)"),
                        ((neg, torch.zeros(1, T + 1, 4)), r"negative `text_ids` must be .*T = 9.*got \(1, 10, 4\)")]:
        with pytest.raises(ValueError, match=match):
            apply_flux2_guidance(tiny, NAG).set_negative(*args)
        assert hooks_of(tiny) == 0  # a rejected negative leaves nothing installed
    with apply_flux2_guidance(tiny, NAG), pytest.raises(ValueError, match=r"call `set_negative\(prompt_embeds\)`"):
        run(tiny, x)
    with apply_flux2_guidance(tiny, NAG).set_negative(neg), pytest.raises(ValueError, match="`kv_cache_mode`"):
        tiny(**x, kv_cache_mode="extract", num_ref_tokens=1)
    with pytest.raises(ValueError, match="supports Flux2Transformer2DModel; got FluxTransformer2DModel"):
        apply_flux2_guidance(FluxTransformer2DModel(num_layers=1, num_single_layers=0, attention_head_dim=8,
                                                    num_attention_heads=1, joint_attention_dim=8,
                                                    pooled_projection_dim=8, axes_dims_rope=(2, 2, 4)), NAG)
    with pytest.raises(ValueError, match=r"at least one dual-stream block \(`num_layers` ≥ 1\)"):
        apply_flux2_guidance(variant(tiny, 0, 1), NAG)
    with pytest.raises(TypeError, match="NegativeGuidance"):
        apply_flux2_guidance(tiny, {"mode": "nag"})
    with apply_flux2_guidance(tiny, NAG), pytest.raises(ValueError, match="remove other attention patches first"):
        apply_flux2_guidance(tiny, NASA)
    assert hooks_of(tiny) == 0 and all(tiny.attn_processors[n] is p for n, p in original.items())


# ---------------------------------------------------------------- the stock Flux2KleinPipeline (guidance 1)
def sample(pipe, prompt="a lighthouse at dusk"):
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt=prompt, height=64, width=64, num_inference_steps=2, guidance_scale=1.0, max_sequence_length=32,
                output_type="pt", generator=torch.Generator().manual_seed(0)).images


def test_stock_pipeline_with_a_negative_prompt(pipe):
    plain = sample(pipe)
    embeds, text_ids = pipe.encode_prompt("blurry, watermark", max_sequence_length=32)  # [1, 32, 48], [1, 32, 4]
    with apply_flux2_guidance(pipe.transformer, NAG).set_negative(embeds, text_ids):
        nag = sample(pipe)
    assert (nag - plain).abs().max() > 1e-3
    off = NegativeGuidance.for_family("flux", "nag", nag_scale=1.0)
    with apply_flux2_guidance(pipe.transformer, off).set_negative(embeds, text_ids):
        assert torch.equal(sample(pipe), plain)
    with apply_flux2_guidance(pipe.transformer, NASA).set_negative(embeds, text_ids):
        assert (sample(pipe) - plain).abs().max() > 1e-3
    assert hooks_of(pipe.transformer) == 0 and torch.equal(sample(pipe), plain)
