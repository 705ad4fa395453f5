"""MAR re-implementation: official parameter names, the head's CFG, and the sampler's behaviour with DiSA.

(Checked once against LTH14/mar fe470ac on a tiny random model: `core.disa.sample_tokens` with this module gave
bit-identical tokens to the official `sample_tokens` — cfg 2.0, 4 iterations, 4 head steps, same seeds.)"""

import math

import pytest
import torch

from swiftstep.core import disa
from swiftstep.models.mar import MAR, timestep_embedding


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    m = MAR(img_size=64, vae_stride=16, encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2,
            decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, class_num=10, buffer_size=4, diffloss_d=2,
            diffloss_w=32, **kw)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in m.parameters():  # official init zeroes adaLN/final layers: randomise everything
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return m.eval()


def test_mar_base_has_the_official_364_keys():
    keys = MAR.from_size("base").state_dict().keys()
    assert len(keys) == 364
    for k in ("fake_latent", "encoder_pos_embed_learned", "mask_token", "decoder_pos_embed_learned",
              "diffusion_pos_embed_learned", "class_emb.weight", "z_proj.weight", "z_proj_ln.bias",
              "encoder_blocks.11.attn.qkv.weight", "encoder_blocks.0.mlp.fc2.bias", "decoder_norm.weight",
              "diffloss.net.time_embed.mlp.2.weight", "diffloss.net.res_blocks.5.adaLN_modulation.1.weight",
              "diffloss.net.final_layer.linear.bias", "diffloss.net.input_proj.weight", "diffloss.net.cond_embed.bias"):
        assert k in keys, k
    assert not any(k.startswith("diffloss.net.final_layer.norm_final") for k in keys)  # no affine
    with pytest.raises(ValueError, match="size"):
        MAR.from_size("giant")


def test_timestep_embedding_is_dit_style():
    t = torch.tensor([0.0, 333.0])
    emb = timestep_embedding(t, 8)
    freqs = torch.exp(-math.log(10000) * torch.arange(4) / 4)
    torch.testing.assert_close(emb[1], torch.cat([torch.cos(333 * freqs), torch.sin(333 * freqs)]))


def test_head_cfg_guides_eps_only():
    net = tiny().diffloss.net
    x, z = torch.randn(4, 16), torch.randn(4, 32)
    t = torch.full((4,), 333)
    out = net.forward_with_cfg(x, t, z, 3.0)
    plain = net(torch.cat([x[:2], x[:2]]), t, z)
    cond, uncond = plain[:2, :16], plain[2:, :16]
    torch.testing.assert_close(out[:2, :16], uncond + 3.0 * (cond - uncond))
    torch.testing.assert_close(out[:, 16:], plain[:, 16:])  # each half keeps its variance channels


def run(model, steps, clip, cfg=2.0, seed=7):
    g = torch.Generator().manual_seed(seed)
    orders = torch.stack([torch.randperm(model.seq_len, generator=g) for _ in range(2)])
    with torch.no_grad():
        return disa.sample_tokens(model, 2, torch.tensor([1, 3]), len(steps), cfg, "linear", 1.0, steps, clip,
                                  lambda shape: torch.randn(shape, generator=g), orders)


def test_sampler_uses_disa_steps_per_iteration_and_fills_every_token(monkeypatch):
    model = tiny()
    calls = []
    real = disa.HeadDiffusion.p_sample

    def count(self, *args, **kwargs):
        calls.append(len(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(disa.HeadDiffusion, "p_sample", count)
    steps = disa.step_schedule("disa-linear", 4, 8, 2)
    tokens = run(model, steps, clip=disa.OFFICIAL_CLIP)
    assert tokens.shape == (2, 16, 16) and (tokens != 0).all() and torch.isfinite(tokens).all()
    per_iteration = [len(disa.HeadDiffusion(t, disa.OFFICIAL_CLIP)) for t in steps]
    assert calls == [n for n in per_iteration for _ in range(n)]  # one p_sample per head step, T steps per iteration


def test_sampler_is_deterministic_and_cfg_matters():
    model = tiny()
    a, b = run(model, [4] * 4, None), run(model, [4] * 4, None)
    assert torch.equal(a, b)
    assert (run(model, [4] * 4, None, cfg=1.0) - a).abs().max() > 1e-3


def test_unpatchify_layout():
    model = tiny()
    tokens = torch.arange(2 * 16 * 16, dtype=torch.float32).reshape(2, 16, 16)
    img = model.unpatchify(tokens)
    assert img.shape == (2, 16, 4, 4) and img[1, 5, 2, 3] == tokens[1, 2 * 4 + 3, 5]
