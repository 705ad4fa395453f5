"""Reading weight files without diffusers: a file that does not parse becomes a `ValueError` naming the file, the
format expected and what the parser found (safetensors' and torch.load's own exceptions name neither the file nor the
expected format).

Every loader of the package reads through here (the layout checks — which keys a file must hold — stay with them);
it lives in core/ because some loaders must work without diffusers (the SR weights `SwiftStepUpscaleV2` reads,
`core.sr_weights`). safetensors is imported where used (ComfyUI and diffusers both depend on it).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch

TORCH_FORMAT = "a file torch.load(weights_only=True) reads (torch.save's zip format or a legacy pickle)"


def open_safetensors(path: str | Path, what: str):
    """`safetensors.safe_open(path)` (tensors are read on demand): use as `with open_safetensors(...) as f`.
    `what` is the content expected, e.g. "an SD checkpoint in the original layout"."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        return safe_open(str(path), framework="pt")
    except SafetensorError as error:  # the header is checked on opening: bad length, JSON, offsets, size
        raise ValueError(f"{path.name}: expected {what} in the safetensors format; the safetensors parser found: "
                         f"{error} (a truncated download, or not a safetensors file).") from error


def read_safetensors(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (as `safetensors.torch.load_file`)."""
    with open_safetensors(path, what) as f:
        return {key: f.get_tensor(key) for key in f.keys()}


def read_torch_file(path: str | Path, what: str, mmap: bool = False):
    """`torch.load(path, map_location="cpu", weights_only=True)`; with `mmap`, memory-mapped where the file allows
    (torch.save's zip format; legacy pickles are read whole)."""
    path = Path(path)
    try:
        if mmap:
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # not a zip: read it whole below (a damaged file fails there too)
                pass
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # damaged files raise UnpicklingError, RuntimeError, EOFError, OSError, KeyError, …
        raise ValueError(f"{path.name}: expected {what}, {TORCH_FORMAT}; found {_torch_failure(path, error)}.") \
            from error


def _torch_failure(path: Path, error: Exception) -> str:
    """torch.load's message, without its advice to disable weights_only."""
    text = str(error)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
        text = text.split(" Please use", 1)[0].strip().rstrip(".")
        if "Unsupported global" in text:
            text += " (it pickles objects besides tensors; re-save only the state dict)"
    text = " ".join(text.split()).rstrip(".") or ("the file ends early" if isinstance(error, EOFError) else "")
    found = f"{type(error).__name__}: {text}" if text else type(error).__name__
    if path.is_file() and _starts_with(path, b"PK") and not zipfile.is_zipfile(path):
        return f"a truncated or damaged zip archive ({found})"
    return found


def _starts_with(path: Path, magic: bytes) -> bool:
    with path.open("rb") as f:
        return f.read(len(magic)) == magic
