"""`apply_nasa` on FLUX (joint attention) routes to pipelines/nasa_joint.py's one-image-stream, two-text-stream
construction with the cross-attention API (`set_negative(encoder_hidden_states)`, the negative text stream modulated
by the positive pooled embedding). The official NAG comparisons live in test_joint_guidance_flux.py."""

import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from swiftstep.pipelines.nasa_joint import FluxJointGuidanceProcessor, JointNASAHandle
from swiftstep.pipelines.nasa_processor import apply_nasa

from ..tolerance import assert_close_to_scale

TEXT = 7


@pytest.fixture(scope="module")
def flux():
    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                  axes_dims_rope=[4, 4, 8]).eval()


def inputs(seed=0, b=2, n=16, t=TEXT):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(b, n, 4, generator=g), encoder_hidden_states=torch.randn(b, t, 32, generator=g),
                pooled_projections=torch.randn(b, 32, generator=g), timestep=torch.full((b,), 0.7),
                img_ids=torch.randn(n, 3, generator=g), txt_ids=torch.zeros(t, 3))


def run(flux, **kw):
    with torch.no_grad():
        return flux(**kw).sample


def test_zero_strength_is_bit_identical_and_removal_restores(flux):
    x = inputs()
    plain = run(flux, **x)
    neg = torch.randn(1, TEXT, 32)
    for settings in (dict(alpha=0.0), dict(mode="nag", nag_scale=1.0)):
        handle = apply_nasa(flux, **settings).set_negative(neg)
        try:
            assert isinstance(handle, JointNASAHandle) and not handle.installed
            assert torch.equal(run(flux, **x), plain)  # nothing installed
        finally:
            handle.remove()
    handle = apply_nasa(flux, alpha=0.5).set_negative(neg)
    try:
        assert handle.installed and not torch.equal(run(flux, **x), plain)
    finally:
        handle.remove()
    assert torch.equal(run(flux, **x), plain)
    assert not any(isinstance(p, FluxJointGuidanceProcessor) for p in flux.attn_processors.values())


class ZeroImageAttention(FluxAttnProcessor):
    """diffusers' FLUX attention with the image tokens' attention output (before `to_out`) set to zero."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        out = super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if encoder_hidden_states is not None:
            image, text = out
            return attn.to_out[0].bias.expand_as(image), text
        return torch.cat([out[:, :TEXT], torch.zeros_like(out[:, TEXT:])], dim=1)


def test_negative_equal_to_positive_at_alpha_one_zeroes_the_image_attention(flux):
    """NASA α = 1 with the positive prompt as the negative: Z+ − Z− = 0 for every image token in every block (the
    two text streams are the same), so only `to_out`'s bias is left; the text streams are the plain ones."""
    x = inputs(seed=1)
    handle = apply_nasa(flux, alpha=1.0).set_negative(x["encoder_hidden_states"])
    try:
        got = run(flux, **x)
    finally:
        handle.remove()
    original = dict(flux.attn_processors)
    flux.set_attn_processor({n: ZeroImageAttention() for n in original})
    try:
        expected = run(flux, **x)
    finally:
        flux.set_attn_processor(original)
    assert_close_to_scale(got, expected)
    assert (got - run(flux, **x)).abs().max() > 1e-3


def test_negative_prompt_changes_the_output_and_bad_inputs_fail(flux):
    x = inputs(seed=2)
    plain = run(flux, **x)
    for settings in (dict(alpha=0.5), dict(mode="nag", nag_scale=3.0, nag_tau=2.5, nag_alpha=0.5)):
        handle = apply_nasa(flux, **settings).set_negative(torch.randn(1, TEXT, 32))
        try:
            assert (run(flux, **x) - plain).abs().max() > 1e-3
        finally:
            handle.remove()
    handle = apply_nasa(flux, alpha=0.5).set_negative(torch.randn(1, 9, 32))
    try:
        with pytest.raises(ValueError, match=r"negative `prompt_embeds` is \(9, 32\) \(tokens, width\), the positive "
                                             r"\(7, 32\)"):
            run(flux, **x)
    finally:
        handle.remove()
    with pytest.raises(ValueError, match="takes no negative `attention_mask`"):
        apply_nasa(flux, alpha=0.5).set_negative(torch.randn(1, TEXT, 32), torch.ones(1, TEXT))
    assert not any(isinstance(p, FluxJointGuidanceProcessor) for p in flux.attn_processors.values())


def test_joint_and_cross_attention_processors_do_not_import_each_other_at_module_level():
    """The shared negative-context type lives in negative_context.py; a circle between the two processor modules
    broke imports whenever one was loaded first (issue 17)."""
    import ast
    from pathlib import Path

    import swiftstep.pipelines as pipelines

    root = Path(pipelines.__file__).parent

    def module_imports(name):
        tree = ast.parse((root / f"{name}.py").read_text())
        return {n.module for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}

    assert "nasa_processor" not in module_imports("nasa_joint")
    assert "nasa_joint" not in module_imports("nasa_processor")
    assert "negative_context" in module_imports("nasa_joint") & module_imports("nasa_processor")
