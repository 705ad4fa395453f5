"""Packaging: `import swiftstep` stays light, and installing never adds top-level `nodes`/`pipelines` modules."""

import subprocess
import sys
from importlib import metadata


def test_import_swiftstep_imports_neither_diffusers_nor_comfyui():
    code = ("import sys, swiftstep, swiftstep.core.presets, swiftstep.core.onestep; "
            "bad = [m for m in ('diffusers', 'comfy', 'nodes', 'transformers') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_installed_files_stay_inside_the_swiftstep_package():
    files = metadata.files("swiftstep") or []
    tops = {f.parts[0] for f in files if not f.parts[0].endswith((".dist-info", ".pth")) and f.parts[0] != ".."}
    tops = {t for t in tops if not t.startswith("__editable__")}
    assert tops <= {"swiftstep"}, tops


def test_console_script_is_declared():
    eps = metadata.entry_points(group="console_scripts")
    assert any(ep.name == "swiftstep" and ep.value == "swiftstep.cli:main" for ep in eps)
