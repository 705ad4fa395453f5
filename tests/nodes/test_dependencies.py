"""A ComfyUI without this pack's requirements.txt: the nodes that need diffusers say which package is missing and the
command that installs it, instead of a bare ModuleNotFoundError."""

import sys

import pytest

from .. import comfy_fakes as fakes


@pytest.fixture
def without_diffusers(monkeypatch, tmp_path):
    root = tmp_path / "models"
    (root / "swiftstep").mkdir(parents=True)
    for name in ("checkpoint-last.pth", "kl16.ckpt", "pisa_sr.pkl"):
        (root / "swiftstep" / name).write_bytes(b"")
    fakes.install(monkeypatch, models_root=root)
    for name in [m for m in sys.modules if m == "diffusers" or m.startswith(("diffusers.", "swiftstep.pipelines"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now fails as if it were not installed
    from swiftstep.nodes import mar_nodes, sr_nodes

    return mar_nodes, sr_nodes


def test_nodes_name_the_missing_package_and_the_install_command(without_diffusers):
    mar_nodes, sr_nodes = without_diffusers
    expected = r"needs the Python package `diffusers`.*-m pip install -r .*requirements\.txt"
    with pytest.raises(ModuleNotFoundError, match="SwiftStepMARLoader " + expected):
        mar_nodes.SwiftStepMARLoader.execute("checkpoint-last.pth", "kl16.ckpt", "base")
    with pytest.raises(ModuleNotFoundError, match="SwiftStepSRLoader " + expected):
        sr_nodes.SwiftStepSRLoader.execute("diffusers/sd21-base", "pisa_sr.pkl", "auto")


def test_a_missing_module_that_is_ours_is_not_reworded():
    from swiftstep.nodes.dependencies import required_by

    with pytest.raises(ModuleNotFoundError, match="No module named 'swiftstep_nope'"):
        with required_by("SwiftStepMARLoader"):
            import swiftstep_nope  # noqa: F401
