"""Recognise original (Stability/LDM key layout) single-file checkpoints before handing them to diffusers."""

from __future__ import annotations

from pathlib import Path

from ..core import weight_files

REFERENCE_REPOS = {  # configs diffusers fetches for each family when no `config=` is given
    "sd1": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd2": "stabilityai/stable-diffusion-2-1",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
}

EXPECTED = "an SD1.x/SD2.x/SDXL checkpoint in the original (Stability/LDM) key layout"
_UNET_KEY = "model.diffusion_model.input_blocks.0.0.weight"
_FAMILY_KEYS = {  # a key only that family's text encoder has
    "sdxl": "conditioner.embedders.1.model.token_embedding.weight",
    "sd2": "cond_stage_model.model.token_embedding.weight",
    "sd1": "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
}
_OTHER_MODELS = {  # key fragment → what the file probably is
    "double_blocks.": "a FLUX transformer",
    "joint_blocks.": "an SD3 MM-DiT",
    "conditioner.embedders.0.model.": "an SDXL refiner (no CLIP-L encoder)",
    "lora_": "a LoRA file (load it with `load_lora_weights`)",
    "first_stage_model.": None,
}


def checkpoint_keys(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint file at {path.resolve()}.")
    if path.suffix == ".safetensors":
        with weight_files.open_safetensors(path, EXPECTED) as f:
            return list(f.keys())
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        sd = weight_files.read_torch_file(path, EXPECTED, mmap=True)
        sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
        if not isinstance(sd, dict):
            raise ValueError(f"{path.name}: expected {EXPECTED} (a dict of tensors), found a {type(sd).__name__}.")
        return list(sd.keys())
    raise ValueError(f"{path.name}: expected a .safetensors or .ckpt checkpoint, got a '{path.suffix}' file.")


def checkpoint_family(path: str | Path) -> str:
    """'sd1' | 'sd2' | 'sdxl' for an original-layout checkpoint; a ValueError naming what was found otherwise."""
    path = Path(path)
    keys = checkpoint_keys(path)
    key_set = set(keys)
    if _UNET_KEY in key_set:
        for family, key in _FAMILY_KEYS.items():
            if key in key_set:
                return family
        if "cond_stage_model.transformer.embeddings.token_embedding.weight" in key_set:
            return "sd1"  # older transformers layout without `text_model.`
    guess = next((what for frag, what in _OTHER_MODELS.items() if what and any(frag in k for k in keys)), None)
    raise ValueError(
        f"{path.name} is not an SD1.x/SD2.x/SDXL checkpoint in the original layout"
        + (f" (it looks like {guess})" if guess else "")
        + f": expected `{_UNET_KEY}` and a text encoder key such as `{_FAMILY_KEYS['sd1']}`; found {len(keys)} keys, "
        f"e.g. {keys[:3]}."
    )
