"""Packaging: `import swiftstep` stays light, and installing never adds top-level `nodes`/`pipelines` modules."""

import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_swiftstep_imports_neither_diffusers_nor_comfyui():
    code = ("import sys, swiftstep, swiftstep.core.presets, swiftstep.core.onestep; "
            "bad = [m for m in ('diffusers', 'comfy', 'nodes', 'transformers') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_wheel_holds_only_the_swiftstep_package(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("swiftstep-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if ".dist-info/" not in n}
    assert tops == {"swiftstep"}, tops  # never a top-level `nodes`/`pipelines` that would shadow ComfyUI's
    for module in ("pipelines/pipeline_one_step.py", "cli.py", "video_io.py", "core/disa.py", "models/mar.py",
                   "kernels/flash_attn_triton.py", "nodes/sr_nodes.py", "nodes/__init__.py"):
        assert f"swiftstep/{module}" in names, module
    assert not any(n.startswith("swiftstep/tests/") for n in names)


def test_console_script_is_declared():
    eps = metadata.entry_points(group="console_scripts")
    assert any(ep.name == "swiftstep" and ep.value == "swiftstep.cli:main" for ep in eps)
