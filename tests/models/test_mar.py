"""MAR re-implementation: official parameter names, the head's CFG, and the sampler's behaviour with DiSA.

(Checked once against LTH14/mar fe470ac on a tiny random model: `core.disa.sample_tokens` with this module gave
bit-identical tokens to the official `sample_tokens` — cfg 2.0, 4 iterations, 4 head steps, same seeds.)"""

import math

import pytest
import torch

from swiftstep.core import disa
from swiftstep.models.mar import MAR, timestep_embedding

from ..tolerance import assert_close_to_scale


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
    assert_close_to_scale(out[:2, :16], uncond + 3.0 * (cond - uncond))
    assert_close_to_scale(out[:, 16:], plain[:, 16:])  # each half keeps its variance channels


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


def reference_sample(model, labels, num_iter, cfg, steps, orders, randn):
    """MAR's sampler written out from the paper/IDDPM in float64 (model in float64), independent of core.disa."""
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    base_ac = []
    acc = 1.0
    for i in range(1000):
        acc *= 1 - min(1 - alpha_bar((i + 1) / 1000) / alpha_bar(i / 1000), 0.999)
        base_ac.append(acc)
    bsz, seq_len, c = len(labels), model.seq_len, model.token_embed_dim
    tokens = torch.zeros(bsz, seq_len, c, dtype=torch.float64)
    masked = torch.ones(bsz, seq_len, dtype=torch.bool)
    for step in range(num_iter):
        remaining = int(masked[0].sum())
        mask_len = max(1, min(remaining - 1, math.floor(seq_len * math.cos(math.pi / 2 * (step + 1) / num_iter))))
        nxt = torch.zeros(bsz, seq_len, dtype=torch.bool)
        for b in range(bsz):
            nxt[b, orders[b, :mask_len]] = True
        pred = masked.clone() if step == num_iter - 1 else masked & ~nxt
        ce = torch.cat([model.class_emb(labels), model.fake_latent.repeat(bsz, 1)])
        m2 = torch.cat([masked, masked]).double()
        z = model.decode(model.encode(torch.cat([tokens, tokens]), m2, ce), m2)
        rows = z[torch.cat([pred, pred])]
        scale = 1 + (cfg - 1) * (seq_len - mask_len) / seq_len
        kept = sorted({round(i * 999 / (steps[step] - 1)) for i in range(steps[step])})
        ac = [base_ac[t] for t in kept]
        half = randn((rows.shape[0] // 2, c)).double()
        x = torch.cat([half, half])
        for i in reversed(range(len(kept))):
            a, a_prev = ac[i], (ac[i - 1] if i > 0 else 1.0)
            beta = 1 - a / a_prev
            out = model.diffloss.net.forward_with_cfg(x, torch.full((x.shape[0],), kept[i]), rows, scale)
            eps, v = out[:, :c], out[:, c:]
            x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
            mean = beta * math.sqrt(a_prev) / (1 - a) * x0 + (1 - a_prev) * math.sqrt(1 - beta) / (1 - a) * x
            post = [(1 - (ac[j] / (ac[j - 1] if j else 1.0))) * (1 - (ac[j - 1] if j else 1.0)) / (1 - ac[j])
                    for j in range(len(kept))]
            log_post = math.log(post[i] if i > 0 else post[1])
            log_var = (v + 1) / 2 * math.log(beta) + (1 - (v + 1) / 2) * log_post
            noise = randn(tuple(x.shape)).double()
            x = mean if i == 0 else mean + torch.exp(0.5 * log_var) * noise
        tokens[pred] = x[: x.shape[0] // 2]
        masked = nxt if step < num_iter - 1 else torch.zeros_like(masked)
    return tokens


def test_full_tiny_run_matches_a_float64_reference():
    model = tiny()
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    orders = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(k)) for k in range(2)])
    labels = torch.tensor([1, 3])
    with torch.no_grad():
        ours = disa.sample_tokens(model, 2, labels, 4, 2.0, "linear", 1.0, [4, 3, 3, 2], None,
                                  lambda shape: torch.randn(shape, generator=g1), orders)
        ref = reference_sample(model.double(), labels, 4, 2.0, [4, 3, 3, 2], orders,
                               lambda shape: torch.randn(shape, generator=g2))
    model.float()
    err = ((ours.double() - ref).abs() / ref.abs().clamp_min(1.0)).max().item()
    assert err <= 1e-4, err  # random weights blow up near t=999 (|x| ~ 1e4): relative tolerance per token
