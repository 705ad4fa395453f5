import logging
import os

import pytest
import torch

# Triton kernels run on the CPU through Triton's interpreter when no GPU is present; it must be set before
# `import triton`, which happens only in kernel code and tests.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from .fixtures import write_model


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """family → {'folder', 'single_file'} for sd1, sd2, sd2-v, sdxl (written once per session)."""
    root = tmp_path_factory.mktemp("models")
    return {family: write_model(family, root) for family in ("sd1", "sd2", "sd2-v", "sdxl")}


@pytest.fixture(autouse=True)
def _quiet_progress(monkeypatch):
    logging.getLogger("diffusers").setLevel(logging.ERROR)
