"""The `swiftstep` CLI: images with their parameters embedded, both model formats, clear errors."""

import json

import numpy as np
import torch
from PIL import Image

from swiftstep.cli import main
from swiftstep.pipelines import OneStepPipeline


def test_generate_writes_png_with_parameters_and_matches_the_pipeline(models, tmp_path):
    out = tmp_path / "fox.png"
    rc = main(["generate", "--model", str(models["sdxl"]["folder"]), "--prompt", "a red fox", "--preset",
               "dmd2-sdxl-4step", "--seed", "7", "--out", str(out), "--device", "cpu"])
    assert rc == 0
    image = Image.open(out)
    meta = json.loads(image.text["swiftstep"])
    assert meta["preset"] == "dmd2-sdxl-4step" and meta["timesteps"] == [999, 749, 499, 249] and meta["seed"] == 7
    assert "Seed: 7" in image.text["parameters"] and image.text["parameters"].startswith("a red fox")
    pipe = OneStepPipeline.from_pretrained(models["sdxl"]["folder"])
    ref = pipe("a red fox", preset="dmd2-sdxl-4step", generator=torch.Generator().manual_seed(7)).images[0]
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(ref))


def test_generate_from_single_file_with_local_config(models, tmp_path):
    out = tmp_path / "one.png"
    rc = main(["generate", "--model", str(models["sd1"]["single_file"]), "--config", str(models["sd1"]["folder"]),
               "--prompt", "a boat", "--timesteps", "999", "--num-images", "2", "--out", str(out), "--device", "cpu"])
    assert rc == 0
    assert (tmp_path / "one_0.png").is_file() and (tmp_path / "one_1.png").is_file()


def test_bad_preset_exits_with_a_message(models, tmp_path, capsys):
    rc = main(["generate", "--model", str(models["sd1"]["folder"]), "--prompt", "x", "--preset", "turbo",
               "--out", str(tmp_path / "x.png"), "--device", "cpu"])
    assert rc == 2
    assert "Unknown preset 'turbo'; valid presets: sd-turbo" in capsys.readouterr().err


def test_missing_model_exits_with_a_message(tmp_path, capsys):
    rc = main(["generate", "--model", str(tmp_path / "nope.safetensors"), "--prompt", "x", "--device", "cpu"])
    assert rc == 2
    assert "No checkpoint file at" in capsys.readouterr().err


def test_selftest_runs_offline(tmp_path, capsys):
    assert main(["selftest", "--out", str(tmp_path / "s.png")]) == 0
    assert "selftest OK" in capsys.readouterr().out


def test_upscale_writes_x4_pngs_with_parameters(models, tmp_path):
    from swiftstep.pipelines import OneStepPipeline

    from .sr_fixtures import make_pisa_pkl

    base = OneStepPipeline.from_pretrained(models["sd2"]["folder"]).components
    weights = tmp_path / "pisa_sr.pkl"
    make_pisa_pkl(base["unet"], weights)
    src = tmp_path / "small.png"
    Image.fromarray((np.random.default_rng(0).random((20, 22, 3)) * 255).astype(np.uint8)).save(src)
    rc = main(["upscale", str(src), "--base", str(models["sd2"]["folder"]), "--weights", str(weights),
               "--out", str(tmp_path / "up"), "--device", "cpu", "--lambda-sem", "0.5", "--min-side", "64"])
    assert rc == 0
    out = Image.open(tmp_path / "up" / "small_x4.png")
    assert out.size == (88, 80)
    meta = json.loads(out.text["swiftstep"])
    assert meta["method"] == "pisa-sr" and meta["lambda_sem"] == 0.5


def test_upscale_with_unknown_weights_exits_with_the_known_layouts(models, tmp_path, capsys):
    import torch

    bad = tmp_path / "x.pkl"
    torch.save({"weights": {}}, bad)
    src = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(src)
    rc = main(["upscale", str(src), "--base", str(models["sd2"]["folder"]), "--weights", str(bad), "--device", "cpu"])
    assert rc == 2 and "known layouts" in capsys.readouterr().err


def test_mar_writes_one_png_per_class(tmp_path):
    from swiftstep.pipelines import MARPipeline

    from .models.test_mar import tiny
    from .pipelines.test_pipeline_mar import tiny_vae

    MARPipeline(mar=tiny(), vae=tiny_vae()).save_pretrained(tmp_path / "mar")
    rc = main(["mar", "--model", str(tmp_path / "mar"), "--class", "1", "Electric_Ray", "--num-iter", "4", "--steps-start", "6",
               "--steps-end", "2", "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert rc == 0
    image = Image.open(tmp_path / "out" / "mar_class5_seed0.png")  # class 5 = electric ray
    params = json.loads(image.text["swiftstep"])
    assert image.size == (64, 64) and params["schedule"] == "disa-linear" and params["class_name"] == "electric ray"
    assert main(["mar", "--class", "1", "--device", "cpu"]) == 2  # neither --model nor the official files


def _write_video(path, frames=3, fps=12, audio=True):
    import av

    rng = np.random.default_rng(0)
    scene = (rng.random((128, 128 + 4 * frames, 3)) * 255).astype(np.uint8)
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = 128, 128, "yuv420p"
        sound = container.add_stream("aac", rate=8000) if audio else None
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(scene[:, 4 * i:4 * i + 128]), format="rgb24")
            container.mux(video.encode(frame))
        container.mux(video.encode())
        if sound is not None:
            samples = (np.sin(np.arange(8000 * frames // fps) / 5) * 0.3).astype(np.float32)[None]
            block = av.AudioFrame.from_ndarray(samples, format="flt", layout="mono")
            block.sample_rate = 8000
            container.mux(sound.encode(block))
            container.mux(sound.encode())


def test_upscale_video_keeps_every_frame_the_frame_rate_and_the_audio(tmp_path):
    import av

    from swiftstep.pipelines import OneStepSRPipeline

    from .video_fixtures import make_dloral_pkl, tiny_cfr, video_components

    comps = video_components()
    OneStepSRPipeline(**comps).save_pretrained(tmp_path / "sd21")
    make_dloral_pkl(comps["unet"], tiny_cfr(), tmp_path / "model.pkl")
    _write_video(tmp_path / "in.mp4")
    rc = main(["upscale-video", str(tmp_path / "in.mp4"), "--out", str(tmp_path / "out.mp4"), "--base",
               str(tmp_path / "sd21"), "--weights", str(tmp_path / "model.pkl"), "--device", "cpu", "--seed", "3"])
    assert rc == 0
    with av.open(str(tmp_path / "out.mp4")) as container:
        video = container.streams.video[0]
        assert video.average_rate == 12 and (video.width, video.height) == (512, 512)
        assert container.streams.audio and container.streams.audio[0].sample_rate == 8000
        assert sum(1 for _ in container.decode(video=0)) == 3  # every input frame, the first included
        params = json.loads(container.metadata["comment"])
    assert params["method"] == "dloral" and params["seed"] == 3 and params["fps"] == "12"
    assert main(["upscale-video", str(tmp_path / "nope.mp4"), "--out", str(tmp_path / "o.mp4"), "--base",
                 str(tmp_path / "sd21"), "--weights", str(tmp_path / "model.pkl"), "--device", "cpu"]) == 2
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    assert main(["upscale-video", str(tmp_path / "bad.mp4"), "--out", str(tmp_path / "o.mp4"), "--base",
                 str(tmp_path / "sd21"), "--weights", str(tmp_path / "model.pkl"), "--device", "cpu"]) == 2


def test_upscale_names_a_bad_input_file_weights_file_base_file_and_lambda(models, tmp_path, capsys):
    from .sr_fixtures import make_pisa_pkl

    base = OneStepPipeline.from_pretrained(models["sd2"]["folder"]).components
    weights = tmp_path / "pisa_sr.pkl"
    make_pisa_pkl(base["unet"], weights)
    good, bad = tmp_path / "good.png", tmp_path / "notes.png"
    Image.new("RGB", (8, 8)).save(good)
    bad.write_text("not an image")
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(tmp_path / "big.png")
    cut = tmp_path / "cut.png"
    cut.write_bytes((tmp_path / "big.png").read_bytes()[:6000])
    folder = str(models["sd2"]["folder"])
    run = lambda *extra: main(["upscale", *extra, "--device", "cpu", "--out", str(tmp_path / "up")])  # noqa: E731
    for src, found in [(bad, "cannot identify image file"), (cut, "image file is truncated")]:
        assert run(str(src), "--base", folder, "--weights", str(weights)) == 1  # a failed item: the job went on
        assert f"failed: {src}: input: {src.name}: expected an image file PIL reads (PNG, JPEG, WebP, …); found: " \
               f"{found}" in capsys.readouterr().err
    assert run(str(good), "--base", folder, "--weights", str(weights), "--lambda-pix", "nan") == 2
    assert "`lambda_pix` must be a finite number, got nan" in capsys.readouterr().err
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    assert run(str(good), "--base", folder, "--weights", str(tmp_path / "cut.safetensors")) == 2
    assert "cut.safetensors: expected SR weights exported by save_sr_weights" in capsys.readouterr().err
    assert run(str(good), "--base", str(bad.rename(tmp_path / "base.safetensors")), "--weights", str(weights)) == 2
    assert "base.safetensors: expected an SD1.x/SD2.x/SDXL checkpoint in the original (Stability/LDM) key layout in " \
           "the safetensors format; the safetensors parser found: Error while deserializing header" in \
           capsys.readouterr().err


def test_generate_runs_a_dit_preset_and_records_its_sigmas(tmp_path, capsys):
    from swiftstep.pipelines import load_one_step

    from .dit_fixtures import write_folder

    folder = write_folder("flux", tmp_path)
    out = tmp_path / "flux.png"
    rc = main(["generate", "--model", str(folder), "--prompt", "a red fox", "--preset", "flux-schnell", "--steps",
               "2", "--height", "32", "--width", "32", "--seed", "3", "--out", str(out), "--device", "cpu"])
    assert rc == 0
    image = Image.open(out)
    meta = json.loads(image.text["swiftstep"])
    assert meta["preset"] == "flux-schnell" and meta["steps"] == 2 and meta["sigmas"] == [1.0, 0.5]
    ref = load_one_step(folder)("a red fox", num_inference_steps=2, height=32, width=32,
                                generator=torch.Generator().manual_seed(3)).images[0]
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(ref))
    assert main(["generate", "--model", str(folder), "--prompt", "x", "--preset", "sd35-large-turbo",
                 "--device", "cpu", "--out", str(out)]) == 2
    assert "presets that fit: flux-schnell" in capsys.readouterr().err
    assert main(["generate", "--model", str(folder), "--prompt", "x", "--gamma", "0.3", "--device", "cpu"]) == 2
    assert "--gamma applies to SD/SDXL UNet models only" in capsys.readouterr().err
