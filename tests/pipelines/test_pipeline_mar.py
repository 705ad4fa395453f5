"""MARPipeline: DiSA schedules, official-compatible mode, official checkpoint formats, folders, errors."""

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from swiftstep.core import disa
from swiftstep.pipelines import MARPipeline
from swiftstep.pipelines.mar_checkpoint import KL16_CONFIG, convert_kl16, read_checkpoint

from ..ldm_layout import vae_to_ldm
from ..models.test_mar import tiny
from ..tolerance import assert_close_to_scale

SMALL_KL = {**KL16_CONFIG, "block_out_channels": (16, 16, 32, 32, 64), "norm_num_groups": 8}


def tiny_vae(seed=0):
    torch.manual_seed(seed)
    return AutoencoderKL(**SMALL_KL).eval()


@pytest.fixture(scope="module")
def pipe():
    p = MARPipeline(mar=tiny(), vae=tiny_vae())
    p.set_progress_bar_config(disable=True)
    return p


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_images_and_latents(pipe):
    out = pipe([1, 3], num_iter=4, steps_start=8, steps_end=2, generator=gen(), output_type="np").images
    assert out.shape == (2, 64, 64, 3) and np.isfinite(out).all()
    lat = pipe(5, num_iter=4, steps_start=8, steps_end=2, generator=gen(), output_type="latent").images
    assert lat.shape == (1, 16, 4, 4)
    again = pipe(5, num_iter=4, steps_start=8, steps_end=2, generator=gen(), output_type="latent").images
    assert torch.equal(lat, again)  # same seed, same image


def test_disa_runs_fewer_head_steps_than_constant(pipe, monkeypatch):
    calls = []
    real = disa.HeadDiffusion.p_sample
    monkeypatch.setattr(disa.HeadDiffusion, "p_sample", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    pipe(1, num_iter=8, step_schedule="disa-linear", steps_start=20, steps_end=4, generator=gen(), output_type="latent")
    annealed = len(calls)
    calls.clear()
    pipe(1, num_iter=8, step_schedule="constant", steps_start=20, steps_end=20, generator=gen(), output_type="latent")
    assert annealed < len(calls) == 8 * 20


def test_official_compat_uses_numpy_orders_and_the_950_clip(pipe, monkeypatch):
    seen = {}
    real = disa.sample_tokens

    def spy(model, bsz, labels, num_iter, cfg, cfg_schedule, temperature, steps, clip, randn, orders, **kw):
        seen.update(clip=clip, orders=orders.clone())
        return real(model, bsz, labels, num_iter, cfg, cfg_schedule, temperature, steps, clip, randn, orders, **kw)

    monkeypatch.setattr(disa, "sample_tokens", spy)
    pipe([1, 2], num_iter=4, steps_start=8, steps_end=2, generator=gen(11), official_compat=True,
         output_type="latent")
    rng = np.random.RandomState(11)
    expected = []
    for _ in range(2):
        order = np.arange(16)
        rng.shuffle(order)
        expected.append(order)
    assert seen["clip"] == 950 and torch.equal(seen["orders"], torch.from_numpy(np.stack(expected)))
    pipe([1, 2], num_iter=4, steps_start=8, steps_end=2, generator=gen(11), output_type="latent")
    assert seen["clip"] is None


def test_kl16_converter_round_trip():
    vae = tiny_vae()
    ldm = vae_to_ldm(vae.state_dict(), 5, prefix="")
    assert "encoder.down.4.attn.1.q.weight" in ldm and "decoder.up.4.block.2.conv1.weight" in ldm
    back = convert_kl16(ldm)
    assert set(back) == set(vae.state_dict())
    for k, v in vae.state_dict().items():
        assert torch.equal(back[k], v), k


def test_save_and_load_folder(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "mar")
    loaded = MARPipeline.from_pretrained(tmp_path / "mar")
    loaded.set_progress_bar_config(disable=True)
    a = pipe(7, num_iter=4, steps_start=6, steps_end=2, generator=gen(1), output_type="latent").images
    b = loaded(7, num_iter=4, steps_start=6, steps_end=2, generator=gen(1), output_type="latent").images
    torch.testing.assert_close(a, b)


def test_checkpoint_errors(tmp_path):
    torch.save({"model": {}}, tmp_path / "ckpt.pth")
    with pytest.raises(ValueError, match="expected a MAR checkpoint holding 'model_ema', found keys"):
        read_checkpoint(tmp_path / "ckpt.pth", "model_ema", "MAR")
    with pytest.raises(FileNotFoundError, match="No KL-16 VAE checkpoint"):
        read_checkpoint(tmp_path / "nope.ckpt", "model", "KL-16 VAE")
    import argparse

    torch.save({"model_ema": {}, "args": argparse.Namespace(lr=1)}, tmp_path / "train.pth")  # training pickles
    with pytest.raises(ValueError, match="weights_only"):
        read_checkpoint(tmp_path / "train.pth", "model_ema", "MAR")


def test_class_names_select_the_same_class_as_ids(pipe):
    kw = dict(num_iter=2, steps_start=3, steps_end=2, output_type="latent")
    by_id = pipe([1, 2], generator=torch.Generator().manual_seed(5), **kw).images
    by_name = pipe(["Goldfish", "great_white_shark"], generator=torch.Generator().manual_seed(5), **kw).images
    torch.testing.assert_close(by_name, by_id, rtol=0, atol=0)
    with pytest.raises(ValueError, match="'golden retreiver' is not an ImageNet class name. Did you mean "
                                         "'golden retriever'"):
        pipe("golden retreiver", num_iter=2)
    with pytest.raises(ValueError, match="class id 207 is out of range"):  # the tiny model has 10 classes
        pipe("golden retriever", num_iter=2)


def test_bad_input(pipe):
    with pytest.raises(ValueError, match=r"class id .* out of range: expected 0 … 9"):
        pipe(10, num_iter=2)
    with pytest.raises(ValueError, match="is empty"):
        pipe([], num_iter=2)
    with pytest.raises(ValueError, match="must be one of"):
        pipe(1, num_iter=2, step_schedule="fast")
    with pytest.raises(ValueError, match="cfg_schedule"):
        pipe(1, num_iter=2, cfg_schedule="cosine")
    for name, value in [("cfg", float("nan")), ("cfg", float("inf")), ("temperature", float("nan")),
                        ("temperature", -float("inf")), ("temperature", None)]:
        with pytest.raises(ValueError, match=rf"`{name}` must be a finite number, got {value!r}"):
            pipe(1, num_iter=2, **{name: value})


def test_wrong_size_checkpoint_and_too_many_iterations(pipe, tmp_path):
    torch.save({"model_ema": tiny().state_dict()}, tmp_path / "checkpoint-last.pth")
    torch.save({"model": vae_to_ldm(tiny_vae().state_dict(), 5, prefix="")}, tmp_path / "kl16.ckpt")
    with pytest.raises(ValueError, match=r"checkpoint-last.pth does not fit MAR-base \(it looks like MAR-width 32\)"):
        MARPipeline.from_official(tmp_path / "checkpoint-last.pth", tmp_path / "kl16.ckpt", size="base")
    with pytest.raises(ValueError, match=r"`num_iter` \(17\) cannot exceed the number of tokens \(16\)"):
        pipe(1, num_iter=17)
    with pytest.raises(ValueError, match="steps_start ≥ steps_end"):
        pipe(1, num_iter=4, steps_start=2, steps_end=8)


def test_graphed_head_gives_the_same_images(pipe):
    """head_graphs=True on CPU runs GraphedHead's static-buffer path (captured graphs need CUDA): same tokens."""
    kw = dict(num_iter=6, steps_start=9, steps_end=2, cfg=2.5, output_type="latent")
    eager = pipe([1, 4, 4], generator=gen(3), head_graphs=False, **kw).images
    graphed = pipe([1, 4, 4], generator=gen(3), head_graphs=True, **kw).images
    assert_close_to_scale(graphed, eager)
    compat = dict(kw, step_schedule="disa-cosine", official_compat=True)
    assert_close_to_scale(pipe(7, generator=gen(4), head_graphs=True, **compat).images,
                          pipe(7, generator=gen(4), head_graphs=False, **compat).images)
