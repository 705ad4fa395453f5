"""Packaging: `import swiftstep` stays light, and installing never adds top-level `nodes`/`pipelines` modules."""

import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

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
                   "attention_kernels/flash_attn_triton.py", "nodes/sr_nodes.py", "nodes/__init__.py"):
        assert f"swiftstep/{module}" in names, module
    assert not any(n.startswith("swiftstep/tests/") for n in names)


def test_console_script_is_declared():
    eps = metadata.entry_points(group="console_scripts")
    assert any(ep.name == "swiftstep" and ep.value == "swiftstep.cli:main" for ep in eps)


def _requirements(lines) -> dict[str, str]:
    from packaging.requirements import Requirement

    reqs = [Requirement(line.split("#")[0].strip()) for line in lines if line.split("#")[0].strip()]
    return {r.name.lower(): str(r.specifier) + (f"; {r.marker}" if r.marker else "") for r in reqs}


def test_requirements_txt_matches_the_pyproject_dependencies_without_torch():
    """ComfyUI installs a pack from requirements.txt, pip from pyproject.toml: the two must ask for the same things,
    except torch, which belongs to ComfyUI."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = _requirements(project["dependencies"])
    listed = _requirements((ROOT / "requirements.txt").read_text().splitlines())
    assert "torch" in declared and "torch" not in listed
    assert listed == {name: spec for name, spec in declared.items() if name != "torch"}
