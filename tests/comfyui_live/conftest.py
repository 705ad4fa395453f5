"""Live ComfyUI tests: run only with COMFYUI_PATH pointing at a ComfyUI checkout (0.3.64 or newer), in a Python
environment that can run that ComfyUI (docs/comfyui.md, "Live ComfyUI tests")."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ..workflow_format import ROOT

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "comfyui_live" in str(item.fspath):
            item.add_marker(pytest.mark.comfyui)
            if not COMFYUI_PATH:
                item.add_marker(pytest.mark.skip(reason="set COMFYUI_PATH to a ComfyUI checkout to run live tests"))


@pytest.fixture(scope="session")
def comfy_path() -> Path:
    path = Path(COMFYUI_PATH)
    if not (path / "comfy" / "samplers.py").is_file():
        pytest.fail(f"COMFYUI_PATH={path} is not a ComfyUI checkout (no comfy/samplers.py)")
    return path


@pytest.fixture(scope="session")
def comfy_inprocess(comfy_path):
    """Import ComfyUI's `comfy` package in this process, on the CPU."""
    sys.path.insert(0, str(comfy_path))
    argv, sys.argv = sys.argv, [sys.argv[0], "--cpu"]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.model_management  # noqa: F401  (parses --cpu)
        import comfy.sample
        import comfy.samplers
    finally:
        sys.argv = argv
    return comfy


# --------------------------------------------------------------------------- a ComfyUI server with the pack
# Models: random weights with the real text encoders and VAE and the smallest UNet ComfyUI recognises for the family
# (`tiny_models` size "comfy"), in the original single-file layout under the file names the workflows use. Cached
# in $SWIFTSTEP_LIVE_MODELS (default ~/.cache/swiftstep-live): the SDXL one is ~3.5 GB.

MODELS = {  # file name the workflows use → family
    "checkpoints/sd_turbo.safetensors": "sd2",
    "checkpoints/sd_xl_base_1.0.safetensors": "sdxl",
}
LORAS = {"loras/dmd2_sdxl_4step_lora_fp16.safetensors": "sdxl"}
# the same random weights under another name the workflows use (SD2.1-base for SwiftStepUpscaleV2: only the
# architecture matters to the SR weights' layout)
ALIASES = {"checkpoints/v2-1_512-ema-pruned.safetensors": "checkpoints/sd_turbo.safetensors"}
TEST_SIZE = 64  # px; the workflows ask 512/1024, the CPU test shrinks the empty latent


def _cache() -> Path:
    path = Path(os.environ.get("SWIFTSTEP_LIVE_MODELS", Path.home() / ".cache" / "swiftstep-live"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _build_checkpoint(family: str, path: Path) -> None:
    from swiftstep.pipelines import OneStepPipeline
    from swiftstep.tiny_models import build_components

    from ..ldm_layout import save_single_file

    pipe = OneStepPipeline(**build_components(family, size="comfy"))
    save_single_file(pipe, path.with_suffix(".part"), dtype=torch.float16)
    path.with_suffix(".part").rename(path)


def _build_lora(path: Path) -> None:
    # kohya/SGM keys as SDXL LoRAs ship them; one attention projection is enough to exercise the loader
    g = torch.Generator().manual_seed(0)
    name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    save_file({f"{name}.lora_down.weight": torch.randn(4, 640, generator=g) * 0.01,
               f"{name}.lora_up.weight": torch.randn(640, 4, generator=g) * 0.01,
               f"{name}.alpha": torch.tensor(4.0)}, str(path))


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory):
    cache = _cache()
    base = tmp_path_factory.mktemp("comfy-base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "swiftstep").symlink_to(ROOT, target_is_directory=True)
    for rel, family in {**MODELS, **LORAS}.items():
        cached = cache / Path(rel).name
        if not cached.exists():
            _build_lora(cached) if rel in LORAS else _build_checkpoint(family, cached)
        (base / "models" / Path(rel).parent).mkdir(parents=True, exist_ok=True)
        (base / "models" / rel).symlink_to(cached)
    for rel, same in ALIASES.items():
        (base / "models" / rel).symlink_to(cache / Path(same).name)
    _sr_models(base)
    _mar_models(base, cache)
    _sana_sprint_models(base, cache)
    _placeholder_models(base)
    return base


SANA_SPRINT_FOLDER = "diffusers/Sana_Sprint_1.6B_1024px_diffusers"  # the folder name workflows/sana_sprint.json uses


# loader node → the models/ folder its file widgets list
_LOADER_FOLDERS = {"UNETLoader": "diffusion_models", "CheckpointLoaderSimple": "checkpoints", "VAELoader": "vae",
                   "CLIPLoader": "text_encoders", "DualCLIPLoader": "text_encoders",
                   "TripleCLIPLoader": "text_encoders", "LoraLoaderModelOnly": "loras"}


def _placeholder_models(base: Path) -> None:
    """Empty files under the model names of the workflows the server cannot run (`live_test` skip: real-size DiTs):
    the frontend test loads those graphs too, and newer frontends flag a loader whose file is not listed."""
    from ..workflow_format import WORKFLOWS, live_test_skip

    for path in WORKFLOWS:
        workflow = json.loads(path.read_text())
        if not live_test_skip(workflow):
            continue
        for node in workflow["nodes"]:
            folder = _LOADER_FOLDERS.get(node["type"])
            for value in node.get("widgets_values") or [] if folder else []:
                target = base / "models" / folder / str(value)
                if str(value).endswith(".safetensors") and not target.exists():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.touch()


def _sana_sprint_models(base: Path, cache: Path) -> None:
    """For the SANA-Sprint workflow: the tiny random-weight SANA-Sprint diffusers folder (tests/dit_fixtures), cached,
    under the released model's folder name."""
    from ..dit_fixtures import write_folder

    folder = write_folder("sana-sprint", cache / "sana-sprint")
    (base / "models" / "diffusers").mkdir(parents=True, exist_ok=True)
    (base / "models" / SANA_SPRINT_FOLDER).symlink_to(folder, target_is_directory=True)


def _mar_models(base: Path, cache: Path) -> None:
    """For the MAR workflow: random MAR-B weights as the official checkpoint-last.pth (model_ema) and a random
    KL-16 tokenizer in the official LDM key layout (kl16.ckpt), cached."""
    from diffusers import AutoencoderKL

    from swiftstep.models.mar import MAR
    from swiftstep.pipelines.mar_checkpoint import KL16_CONFIG

    from ..ldm_layout import vae_to_ldm

    mar, kl = cache / "checkpoint-last.pth", cache / "kl16.ckpt"
    if not mar.exists():
        torch.manual_seed(0)
        torch.save({"model_ema": MAR.from_size("base").state_dict()}, mar.with_suffix(".part"))
        mar.with_suffix(".part").rename(mar)
    if not kl.exists():
        torch.manual_seed(0)
        torch.save({"model": vae_to_ldm(AutoencoderKL(**KL16_CONFIG).state_dict(), 5, prefix="")}, kl.with_suffix(".part"))
        kl.with_suffix(".part").rename(kl)
    (base / "models" / "swiftstep").mkdir(parents=True, exist_ok=True)
    for f in (mar, kl):
        (base / "models" / "swiftstep" / f.name).symlink_to(f)


def _sr_models(base: Path) -> None:
    """For the SR workflows: a tiny SD2 diffusers folder (8× VAE, as DLoRAL needs) with random DLoRAL weights, random
    PiSA-SR weights for the SD2 checkpoint, in the official layouts, an input image and a 3-frame input video."""
    import av
    import numpy as np
    from PIL import Image

    from swiftstep.pipelines import OneStepSRPipeline
    from swiftstep.tiny_models import build_components

    from ..sr_fixtures import make_pisa_pkl
    from ..video_fixtures import make_dloral_pkl, tiny_cfr, video_components

    components = video_components()
    OneStepSRPipeline(**components).save_pretrained(base / "models" / "diffusers" / "stable-diffusion-2-1-base")
    (base / "models" / "swiftstep").mkdir(parents=True, exist_ok=True)
    # PiSA-SR weights for the checkpoint SwiftStepUpscaleV2 loads (the SD2 architecture of sd_turbo.safetensors)
    make_pisa_pkl(build_components("sd2", size="comfy")["unet"], base / "models" / "swiftstep" / "pisa_sr.pkl")
    make_dloral_pkl(components["unet"], tiny_cfr(), base / "models" / "swiftstep" / "model.pkl")
    (base / "input").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((24, 32, 3)) * 255).astype(np.uint8)).save(base / "input" / "example.png")
    with av.open(str(base / "input" / "example.mp4"), "w") as container:
        stream = container.add_stream("libx264", rate=12)
        stream.width, stream.height, stream.pix_fmt = 128, 128, "yuv420p"
        scene = (rng.random((128, 140, 3)) * 255).astype(np.uint8)
        for i in range(3):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(scene[:, i * 4:i * 4 + 128]), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture(scope="session")
def server(comfy_path, base_dir):
    port = _free_port()
    log = (base_dir / "comfyui.log").open("w")
    # COMFYUI_FRONTEND_ROOT: serve another frontend build (the folder with its index.html), e.g. a newer one
    frontend_root = os.environ.get("COMFYUI_FRONTEND_ROOT")
    frontend = ["--front-end-root", frontend_root] if frontend_root else []
    proc = subprocess.Popen([sys.executable, str(comfy_path / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port",
                             str(port), "--base-directory", str(base_dir), "--disable-auto-launch", *frontend],
                            cwd=comfy_path, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            if proc.poll() is not None:
                pytest.fail(f"ComfyUI exited: {(base_dir / 'comfyui.log').read_text()[-3000:]}")
            try:
                get_json(url + "/system_stats")
                break
            except OSError:
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


