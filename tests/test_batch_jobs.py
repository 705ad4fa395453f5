"""Batch jobs from the command line (batch_jobs.py, cli.py): a prompt file or a folder of images → one file per
item, named and seeded by index; rerunning finishes only what is missing (a partial, corrupt or differently made
output is redone); bad items are reported with their line or file and every other item is still made; under
`accelerate launch` with two processes the files are byte for byte those of the single-process run."""

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from swiftstep.batch_jobs import Item, file_items, prompt_items, run_job
from swiftstep.cli import main
from swiftstep.pipelines import OneStepPipeline

CALL = OneStepPipeline.__call__  # unpatched, for every counter
PROMPTS = ["a red fox", "a lighthouse at dusk", "a bowl of cherries", "a paper boat", "an owl"]


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def generate(models, *args, family="sd2"):
    return main(["generate", "--model", str(models[family]["folder"]), "--preset", "sd-turbo", "--device", "cpu",
                 *map(str, args)])


class CountingCalls:
    """Counts OneStepPipeline calls; raises KeyboardInterrupt at call `stop_at` (an interrupted job)."""

    def __init__(self, monkeypatch, stop_at=None):
        self.calls, self.stop_at = 0, stop_at

        def counted(pipe, *a, **kw):
            self.calls += 1
            if self.stop_at is not None and self.calls == self.stop_at:
                raise KeyboardInterrupt
            return CALL(pipe, *a, **kw)

        monkeypatch.setattr(OneStepPipeline, "__call__", counted)


def test_a_prompt_file_gives_one_png_per_line_seeded_by_index(models, prompt_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert generate(models, "--prompts", prompt_file, "--out-dir", out, "--seed", 10) == 0
    assert sorted(p.name for p in out.iterdir()) == [f"{i:05d}.png" for i in range(len(PROMPTS))]
    assert "made 5, skipped 0 (already done), failed 0" in capsys.readouterr().out
    pipe = OneStepPipeline.from_pretrained(models["sd2"]["folder"])
    for i in (0, 3):  # each file is the single-image run of its line with seed 10 + index
        image = Image.open(out / f"{i:05d}.png")
        meta = json.loads(image.text["swiftstep"])
        assert meta["prompt"] == PROMPTS[i] and meta["seed"] == 10 + i and meta["job"]["seed"] == 10 + i
        ref = pipe(PROMPTS[i], preset="sd-turbo", generator=torch.Generator().manual_seed(10 + i)).images[0]
        assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(ref))


def test_json_lines_set_prompt_negative_prompt_seed_and_size(models, tmp_path):
    path = tmp_path / "items.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in [
        {"prompt": "a red fox", "seed": 3, "height": 48, "width": 64},
        {"prompt": "a living room", "negative_prompt": "plants"},
    ]))
    out = tmp_path / "out"
    assert generate(models, "--prompts", path, "--out-dir", out, "--seed", 100, "--guidance", "nasa") == 0
    first, second = (json.loads(Image.open(out / f"{i:05d}.png").text["swiftstep"]) for i in (0, 1))
    assert (first["seed"], first["height"], first["width"]) == (3, 48, 64)
    assert Image.open(out / "00000.png").size == (64, 48)
    assert second["seed"] == 101 and second["negative_prompt"] == "plants" and second["guidance"] == "nasa"
    pipe = OneStepPipeline.from_pretrained(models["sd2"]["folder"])
    ref = pipe("a living room", preset="sd-turbo", negative_prompt="plants", guidance="nasa",
               generator=torch.Generator().manual_seed(101)).images[0]
    assert np.array_equal(np.asarray(Image.open(out / "00001.png").convert("RGB")), np.asarray(ref))
    plain = pipe("a living room", preset="sd-turbo", generator=torch.Generator().manual_seed(101)).images[0]
    assert not np.array_equal(np.asarray(plain), np.asarray(ref))  # the negative prompt did act


def test_bad_items_are_reported_with_their_line_and_the_others_are_made(models, tmp_path, capsys):
    path = tmp_path / "items.jsonl"
    path.write_text("\n".join([json.dumps({"prompt": "a red fox"}), "", json.dumps({"prompt": "x", "sampler": "dpm"}),
                               "{not json", json.dumps({"prompt": "an owl", "seed": -1}),
                               json.dumps({"prompt": "a paper boat"})]))
    out = tmp_path / "out"
    assert generate(models, "--prompts", path, "--out-dir", out) == 1
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00005.png"]
    captured = capsys.readouterr()
    assert "made 2, skipped 0 (already done), failed 4" in captured.out
    for line, why in [(2, "empty line"), (3, "unknown key 'sampler'"), (4, "not valid JSON"),
                      (5, "\"seed\" must be a non-negative integer, found -1")]:
        assert f"failed: items.jsonl:{line}: {why}" in captured.err
    text = tmp_path / "prompts.txt"
    text.write_text("a red fox\n\n   \nan owl\n")
    items = prompt_items(text, seed=0)
    assert [(i.index, i.error) for i in items] == [(0, None), (1, "empty prompt line"), (2, "empty prompt line"),
                                                    (3, None)]
    assert items[3].spec["seed"] == 3 and items[3].name == "00003.png"
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes("\ufeff".encode() + json.dumps({"prompt": "a fox"}).encode() + b"\n")  # Windows Notepad
    assert [(i.spec["prompt"], i.error) for i in prompt_items(bom, seed=0)] == [("a fox", None)]
    (tmp_path / "p.json").write_text(json.dumps({"prompt": "a fox"}))
    with pytest.raises(ValueError, match="name JSON Lines .* .jsonl"):
        prompt_items(tmp_path / "p.json", seed=0)
    jsonl = tmp_path / "two.jsonl"
    jsonl.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"prompt": "b", "seed": 50}) + "\n")
    pairs = prompt_items(jsonl, seed=10, per_prompt=2)  # two images a line: names and seeds by line and k
    assert [(i.name, i.index, i.spec["seed"]) for i in pairs] == [("00000_0.png", 0, 10), ("00000_1.png", 1, 11),
                                                                   ("00001_0.png", 2, 50), ("00001_1.png", 3, 51)]


def test_an_interrupted_job_reruns_only_the_missing_items(models, prompt_file, tmp_path, monkeypatch):
    out = tmp_path / "out"
    interrupted = CountingCalls(monkeypatch, stop_at=3)  # two items made, the third interrupted
    with pytest.raises(KeyboardInterrupt):
        generate(models, "--prompts", prompt_file, "--out-dir", out)
    assert sorted(os.listdir(out)) == ["00000.png", "00001.png"]  # no partial file left behind
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    rerun = CountingCalls(monkeypatch)
    assert generate(models, "--prompts", prompt_file, "--out-dir", out) == 0
    assert interrupted.calls == 3 and rerun.calls == len(PROMPTS) - 2
    assert all((out / name).read_bytes() == data for name, data in before.items())
    assert len(os.listdir(out)) == len(PROMPTS)
    again = CountingCalls(monkeypatch)
    assert generate(models, "--prompts", prompt_file, "--out-dir", out) == 0 and again.calls == 0


def test_corrupt_outputs_and_outputs_of_other_parameters_are_redone(models, prompt_file, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert generate(models, "--prompts", prompt_file, "--out-dir", out) == 0
    good = (out / "00001.png").read_bytes()
    (out / "00001.png").write_bytes(good[: len(good) // 2])  # truncated (a copy cut short, a full disk)
    (out / "00003.png").write_bytes(b"")
    counter = CountingCalls(monkeypatch)
    assert generate(models, "--prompts", prompt_file, "--out-dir", out) == 0
    assert counter.calls == 2 and (out / "00001.png").read_bytes() == good
    changed = CountingCalls(monkeypatch)  # another seed: every output differs from what the job would make now
    assert generate(models, "--prompts", prompt_file, "--out-dir", out, "--seed", 1) == 0
    assert changed.calls == len(PROMPTS)
    forced = CountingCalls(monkeypatch)
    assert generate(models, "--prompts", prompt_file, "--out-dir", out, "--seed", 1, "--no-resume") == 0
    assert forced.calls == len(PROMPTS)


def test_run_job_leaves_no_partial_file_when_an_item_fails(tmp_path, capsys):
    def produce(item, path):
        path.write_bytes(b"half")
        if item.index == 1:
            raise RuntimeError("the device fell over")
        Image.new("RGB", (4, 4)).save(path, format="PNG")

    items = [Item(i, f"{i}.png", f"src{i}", {"seed": i}) for i in range(3)]
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / ".2.partial-99999.png").write_bytes(b"left by a killed run")
    (tmp_path / "o" / ".notes.partial-1.txt").write_bytes(b"not this job's")
    summary = run_job(items, tmp_path / "o", produce, lambda item: item.spec)
    assert sorted(os.listdir(tmp_path / "o")) == [".notes.partial-1.txt", "0.png", "2.png"]
    assert summary.failed == [(1, "src1", "RuntimeError: the device fell over")]
    assert "failed: src1: RuntimeError: the device fell over" in capsys.readouterr().err

    def failing_load():
        raise ValueError("--model: no diffusers folder at ./nope")

    made = []
    with pytest.raises(ValueError, match="no diffusers folder"):  # the job's error, not a failed item per item
        run_job(items, tmp_path / "p", lambda item, path: made.append(item), lambda item: item.spec,
                prepare=failing_load)
    assert made == []


def test_file_items_name_by_input_and_refuse_clashing_names(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for folder in ("a", "b"):
        Image.new("RGB", (8, 8)).save(tmp_path / folder / "x.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "y.jpg")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "._x.png", format="PNG")  # macOS metadata: hidden, skipped
    items = file_items([tmp_path / "a", tmp_path / "b", tmp_path / "missing.png"], (".png", ".jpg"),
                       lambda p: f"{p.stem}_x4.png", seed=5, out_dir=tmp_path / "out")
    assert [(i.name, i.spec["seed"], i.error) for i in items] == [  # one seed: outputs independent of the others
        ("x_x4.png", 5, None), ("y_x4.png", 5, None),
        ("x_x4.png", 5, f"its output name x_x4.png is already that of {tmp_path / 'a' / 'x.png'}; rename one of them"),
        ("missing_x4.png", 5, "no such file")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="folder .*empty holds no .png/.jpg file"):
        file_items([tmp_path / "empty"], (".png", ".jpg"), str, 0, tmp_path / "out")
    with pytest.raises(ValueError, match="is also the output folder"):
        file_items([tmp_path / "a"], (".png", ".jpg"), str, 0, tmp_path / "a")


def _lora(pipe, folder, seed):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                        init_lora_weights=False)
    torch.manual_seed(seed)
    unet = copy.deepcopy(pipe.unet)
    unet.add_adapter(config)
    type(pipe).save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet),
                                 unet_lora_adapter_metadata=config.to_dict())
    return folder / "pytorch_lora_weights.safetensors"


def test_generate_takes_several_loras_with_their_scales(models, tmp_path):
    from swiftstep.cli import lora_arg
    from swiftstep.pipelines.load_one_step import load_loras

    pipe = OneStepPipeline.from_pretrained(models["sd2"]["folder"])
    first, second = _lora(pipe, tmp_path / "a", 1), _lora(pipe, tmp_path / "b", 2)
    out = tmp_path / "x.png"
    assert generate(models, "--prompt", "a red fox", "--lora", f"{first}:0.5", "--lora", second, "--out", out) == 0
    meta = json.loads(Image.open(out).text["swiftstep"])
    assert meta["lora"] == [[str(first), 0.5], [str(second), 1.0]]
    plain = pipe("a red fox", preset="sd-turbo", generator=torch.Generator().manual_seed(0)).images[0]
    load_loras(pipe, [(first, 0.5), second])
    ref = pipe("a red fox", preset="sd-turbo", generator=torch.Generator().manual_seed(0)).images[0]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(ref))
    assert not np.array_equal(np.asarray(plain), np.asarray(ref))
    assert lora_arg("C:\\loras\\x.safetensors") == ("C:\\loras\\x.safetensors", 1.0)
    assert lora_arg("x.safetensors:0.8") == ("x.safetensors", 0.8)
    assert generate(models, "--prompt", "x", "--lora", f"{first}:nan", "--out", out) == 2


def test_python_dash_m_swiftstep_is_the_command():
    result = subprocess.run([sys.executable, "-m", "swiftstep", "--version"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("swiftstep ")


# ---------------------------------------------------------------- accelerate: two processes, the same files
def _launch(args, processes: int):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    if processes == 1:
        cmd = [sys.executable, "-m", "swiftstep", *args]
    else:  # torchrun underneath; on a machine without CUDA accelerate's state picks gloo on the CPU
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(29500 + os.getpid() % 1000), "-m", "swiftstep", *args]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.slow
def test_two_accelerate_processes_write_the_same_files_as_one(models, prompt_file, tmp_path):
    common = ["generate", "--model", str(models["sd2"]["folder"]), "--preset", "sd-turbo", "--prompts",
              str(prompt_file), "--device", "cpu", "--seed", "4"]
    one = _launch([*common, "--out-dir", str(tmp_path / "one")], 1)
    two = _launch([*common, "--out-dir", str(tmp_path / "two")], 2)
    assert _files(tmp_path / "one") == _files(tmp_path / "two") and len(_files(tmp_path / "one")) == len(PROMPTS)
    assert one.stdout.count("made 5, skipped 0") == 1
    assert two.stdout.count("made 5 (3 + 2 on 2 processes), skipped 0") == 1  # split, and printed once


@pytest.mark.slow
def test_two_accelerate_processes_upscale_a_folder_like_one(models, tmp_path):
    from .sr_fixtures import make_pisa_pkl

    base = OneStepPipeline.from_pretrained(models["sd2"]["folder"]).components
    weights = tmp_path / "pisa_sr.pkl"
    make_pisa_pkl(base["unet"], weights)
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(photos / f"p{i}.png")
    common = ["upscale", str(photos), "--base", str(models["sd2"]["folder"]), "--weights", str(weights),
              "--device", "cpu", "--min-side", "32"]
    _launch([*common, "--out", str(tmp_path / "one")], 1)
    _launch([*common, "--out", str(tmp_path / "two")], 2)
    assert _files(tmp_path / "one") == _files(tmp_path / "two")
    assert sorted(_files(tmp_path / "one")) == ["p0_x4.png", "p1_x4.png", "p2_x4.png"]


def test_upscale_video_on_a_folder_writes_one_mp4_each_and_resumes(tmp_path, monkeypatch, capsys):
    from swiftstep.pipelines import OneStepSRPipeline, VideoSRPipeline

    from .test_cli import _write_video
    from .video_fixtures import make_dloral_pkl, tiny_cfr, video_components

    comps = video_components()
    OneStepSRPipeline(**comps).save_pretrained(tmp_path / "sd21")
    make_dloral_pkl(comps["unet"], tiny_cfr(), tmp_path / "model.pkl")
    clips = tmp_path / "clips"
    clips.mkdir()
    for name in ("a", "b"):
        _write_video(clips / f"{name}.mp4", frames=2, audio=False)
    (clips / "c.mp4").write_bytes(b"not a video")
    stream, calls = VideoSRPipeline.stream, []
    monkeypatch.setattr(VideoSRPipeline, "stream", lambda self, *a, **kw: (calls.append(1), stream(self, *a, **kw))[1])
    run = lambda: main(["upscale-video", str(clips), "--out", str(tmp_path / "out"), "--base",  # noqa: E731
                        str(tmp_path / "sd21"), "--weights", str(tmp_path / "model.pkl"), "--device", "cpu"])
    assert run() == 1  # c.mp4 failed, a and b made
    assert sorted(os.listdir(tmp_path / "out")) == ["a_x4.mp4", "b_x4.mp4"]
    assert f"failed: {clips / 'c.mp4'}:" in capsys.readouterr().err
    made = (tmp_path / "out" / "b_x4.mp4").read_bytes()
    (tmp_path / "out" / "b_x4.mp4").write_bytes(made[: len(made) // 2])  # an interrupted copy: no index
    calls.clear()
    (clips / "c.mp4").unlink()
    assert run() == 0 and len(calls) == 1  # only b again
    assert (tmp_path / "out" / "b_x4.mp4").read_bytes() == made


def test_a_dit_batch_job_with_a_negative_prompt_equals_the_pipeline_call(tmp_path):
    from swiftstep.pipelines import load_one_step

    from .dit_fixtures import write_folder

    folder = write_folder("flux", tmp_path)
    path = tmp_path / "items.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in [
        {"prompt": "a red fox"}, {"prompt": "a living room", "negative_prompt": "plants", "seed": 9}]))
    out = tmp_path / "out"
    assert main(["generate", "--model", str(folder), "--prompts", str(path), "--out-dir", str(out), "--steps", "2",
                 "--height", "32", "--width", "32", "--nag-scale", "4", "--device", "cpu"]) == 0
    pipe = load_one_step(folder)
    for index, (prompt, extra, seed) in enumerate([("a red fox", {}, 0),
                                                   ("a living room", {"negative_prompt": "plants",
                                                                      "nag_scale": 4.0}, 9)]):
        ref = pipe(prompt, num_inference_steps=2, height=32, width=32, generator=torch.Generator().manual_seed(seed),
                   **extra).images[0]
        image = Image.open(out / f"{index:05d}.png")
        assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(ref))
    meta = json.loads(Image.open(out / "00001.png").text["swiftstep"])
    assert meta["negative_prompt"] == "plants" and meta["nag_scale"] == 4.0 and meta["preset"] == "flux-schnell"
    assert main(["generate", "--model", str(folder), "--prompts", str(path), "--out-dir", str(out), "--fast",
                 "--device", "cpu"]) == 2  # the fast path is the UNets'


def test_one_prompt_with_an_out_dir_is_a_job_of_its_seeds(models, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert generate(models, "--prompt", "a red fox", "--num-images", 3, "--seed", 7, "--out-dir", out) == 0
    assert sorted(os.listdir(out)) == ["00000.png", "00001.png", "00002.png"]
    assert [json.loads(Image.open(out / f"{k:05d}.png").text["swiftstep"])["seed"] for k in range(3)] == [7, 8, 9]
    counter = CountingCalls(monkeypatch)
    assert generate(models, "--prompt", "a red fox", "--num-images", 4, "--seed", 7, "--out-dir", out) == 0
    assert counter.calls == 1  # only the new fourth seed


def test_options_the_preset_refuses_stop_the_job_before_any_item(tmp_path, capsys):
    from .dit_fixtures import write_folder

    folder = write_folder("flux2", tmp_path)
    (tmp_path / "p.txt").write_text("a fox\nan owl\n")
    assert main(["generate", "--model", str(folder), "--prompts", str(tmp_path / "p.txt"), "--out-dir",
                 str(tmp_path / "out"), "--steps", "2", "--device", "cpu"]) == 2
    assert "Preset 'flux2-klein' supports num_inference_steps in [4], got 2" in capsys.readouterr().err
    assert os.listdir(tmp_path / "out") == []
