import logging

import pytest

from .fixtures import write_model


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """family → {'folder', 'single_file'} for sd1, sd2, sd2-v, sdxl (written once per session)."""
    root = tmp_path_factory.mktemp("models")
    return {family: write_model(family, root) for family in ("sd1", "sd2", "sd2-v", "sdxl")}


@pytest.fixture(autouse=True)
def _quiet_progress(monkeypatch):
    logging.getLogger("diffusers").setLevel(logging.ERROR)
