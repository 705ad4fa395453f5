"""Experimental NASA/NAG on FLUX (joint attention): exact wiring on a tiny random FluxTransformer2DModel."""

import pytest
import torch
from diffusers import FluxTransformer2DModel

from swiftstep.pipelines.nasa_joint import JointNASAProcessor
from swiftstep.pipelines.nasa_processor import apply_nasa

from ..tolerance import assert_close_to_scale

pytestmark = pytest.mark.filterwarnings("ignore:NASA/NAG on FLUX is experimental")


@pytest.fixture(scope="module")
def flux():
    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                  axes_dims_rope=[4, 4, 8]).eval()


def inputs(seed=0, b=2, n=16, t=7):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(b, n, 4, generator=g), encoder_hidden_states=torch.randn(b, t, 32, generator=g),
                pooled_projections=torch.randn(b, 32, generator=g), timestep=torch.full((b,), 0.7),
                img_ids=torch.randn(n, 3, generator=g), txt_ids=torch.zeros(t, 3))


def run(flux, **kw):
    with torch.no_grad():
        return flux(**kw).sample


def test_zero_strength_matches_and_removal_restores(flux):
    x = inputs()
    plain = run(flux, **x)
    neg = torch.randn(1, 7, 32)
    for settings in (dict(alpha=0.0), dict(mode="nag", nag_scale=1.0)):
        handle = apply_nasa(flux, **settings).set_negative(neg)
        try:
            out = run(flux, **x)
        finally:
            handle.remove()
        assert out.shape == plain.shape
        assert_close_to_scale(out, plain)  # same maths, batch of 2B instead of B
    assert torch.equal(run(flux, **x), plain)
    assert not any(isinstance(p, JointNASAProcessor) for p in flux.attn_processors.values())


def test_negative_equal_to_positive_at_alpha_one_zeroes_the_image_attention(flux):
    x = inputs(seed=1)
    handle = apply_nasa(flux, alpha=1.0).set_negative(x["encoder_hidden_states"])
    try:
        got = run(flux, **x)
    finally:
        handle.remove()

    class ZeroImageAttention(JointNASAProcessor):  # the same computation with combine ≡ 0 and no batch doubling
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     image_rotary_emb=None):
            out = super().__call__(attn, torch.cat([hidden_states] * 2), None if encoder_hidden_states is None
                                   else torch.cat([encoder_hidden_states] * 2), attention_mask, image_rotary_emb)
            return tuple(o[: len(o) // 2] for o in out) if isinstance(out, tuple) else out[: len(out) // 2]

    from swiftstep.pipelines.nasa_processor import make_context

    ctx = make_context(alpha=1.0)
    ctx.combine = lambda zp, zn: torch.zeros_like(zp)
    state = {"text_len": 7}
    original = dict(flux.attn_processors)
    flux.set_attn_processor({n: ZeroImageAttention(ctx, state) for n in original})
    try:
        expected = run(flux, **x)
    finally:
        flux.set_attn_processor(original)
    assert_close_to_scale(got, expected)
    assert (got - run(flux, **x)).abs().max() > 1e-3


def test_negative_prompt_changes_the_output_and_bad_lengths_fail(flux):
    x = inputs(seed=2)
    plain = run(flux, **x)
    for settings in (dict(alpha=0.5), dict(mode="nag", nag_scale=3.0, nag_tau=2.5, nag_alpha=0.5)):
        handle = apply_nasa(flux, **settings).set_negative(torch.randn(1, 7, 32))
        try:
            assert (run(flux, **x) - plain).abs().max() > 1e-3
        finally:
            handle.remove()
    handle = apply_nasa(flux, alpha=0.5).set_negative(torch.randn(1, 9, 32))
    try:
        with pytest.raises(ValueError, match="negative prompt has 9 tokens and the positive 7"):
            run(flux, **x)
    finally:
        handle.remove()


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
