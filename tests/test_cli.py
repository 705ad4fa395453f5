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
