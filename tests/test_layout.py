"""The repository root is on `sys.path` whenever Python starts there (`python -m pytest`, a REPL, ComfyUI's loader
in some setups), so no top-level entry may share its name with a module that an installed distribution provides:
a top-level `kernels/` once hid the PyPI package `kernels` that transformers imports, and CI stopped before a test
ran. This test catches the next such collision in CI, not on users' machines."""

import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def top_level_names(root: Path) -> set[str]:
    """Names `import x` could resolve to in `root`: every folder (a package or a namespace portion) and `*.py`."""
    names = set()
    for entry in root.iterdir():
        name = entry.stem if entry.is_file() and entry.suffix == ".py" else entry.name if entry.is_dir() else None
        if name and name.isidentifier() and name != "__init__":
            names.add(name)
    return names


def collisions(root: Path, installed: dict[str, list[str]]) -> dict[str, list[str]]:
    """Top-level name → the distributions that install a module of that name."""
    return {name: installed[name] for name in sorted(top_level_names(root)) if name in installed}


def test_no_top_level_entry_shadows_an_installed_module():
    found = collisions(ROOT, metadata.packages_distributions())
    assert not found, (f"top-level entries of {ROOT} shadow installed modules when the root is on sys.path: "
                       f"{found}; rename them (docs/development.md layout, pyproject packages, tests).")


def test_the_check_catches_a_folder_named_like_a_dependency(tmp_path):
    (tmp_path / "numpy").mkdir()                     # a folder with no __init__.py is still importable
    (tmp_path / "safetensors.py").write_text("")
    (tmp_path / "core").mkdir()
    (tmp_path / "README.md").write_text("")
    found = collisions(tmp_path, metadata.packages_distributions())
    assert set(found) == {"numpy", "safetensors"}, found
    assert "numpy" in found["numpy"]


def test_diffusers_imports_with_the_repository_root_first_on_sys_path():
    """What `python -m pytest` and a REPL in the root do: diffusers' LoRA loader (peft → transformers → `kernels`)
    must import the installed modules, not folders of this repository."""
    code = "import diffusers.loaders.peft, transformers, peft; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]
