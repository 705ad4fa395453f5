"""Tiny random-weight DiT pipelines, one builder per family, written with the real writers by `write_folder`."""

from __future__ import annotations

from pathlib import Path


def builders() -> dict:
    """family → builder returning the stock diffusers pipeline (imports lazily: each pulls its model classes)."""
    from .flux_sd3 import build_flux, build_sd3
    from .qwen_family import build_flux2_klein, build_qwenimage, build_zimage
    from .sana_sprint import build_sana_sprint

    return {"flux": build_flux, "flux2": build_flux2_klein, "sd3": build_sd3, "zimage": build_zimage,
            "qwenimage": build_qwenimage, "sana-sprint": build_sana_sprint}


def write_folder(family: str, root: Path, seed: int = 0) -> Path:
    """A diffusers folder (model_index.json + safetensors + tokenizer files) for `family`, via `save_pretrained`."""
    folder = Path(root) / f"{family}-folder"
    if not (folder / "model_index.json").is_file():
        builders()[family](seed=seed).save_pretrained(folder)
    return folder
