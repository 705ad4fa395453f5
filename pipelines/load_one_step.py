"""One entry point for any supported distilled model: read the folder's `model_index.json`, pick the pipeline for its
family, infer the preset where the folder leaves no doubt."""

from __future__ import annotations

from pathlib import Path

from ..core.presets import DIT_FAMILY_NAMES, FLOW_PRESETS, UNET_PRESETS, get_preset
from .pipeline_distilled_dit import PIPELINE_FAMILIES, DistilledDiTPipeline, presets_for

UNET_PIPELINES = ("OneStepPipeline", "StableDiffusionPipeline", "StableDiffusionXLPipeline",
                  "LatentConsistencyModelPipeline", "AutoPipelineForText2Image")
_HUB_KWARGS = ("cache_dir", "local_files_only", "revision", "token", "force_download", "proxies")


def read_config(path_or_id, name: str = "model_index.json", subfolder: str | None = None, **kwargs) -> dict:
    """A folder's (or hub repo's) JSON config, a clear error naming the file when it is missing or damaged."""
    from diffusers import DiffusionPipeline

    hub = {k: v for k, v in kwargs.items() if k in _HUB_KWARGS}
    where = f"{path_or_id}/{subfolder + '/' if subfolder else ''}{name}"
    if Path(str(path_or_id)).exists() and not (Path(path_or_id) / (subfolder or "") / name).is_file():
        raise FileNotFoundError(f"{where}: not found; `load_one_step` needs a diffusers folder (model_index.json "
                                f"with its component subfolders).")
    try:
        return dict(DiffusionPipeline.load_config(path_or_id, config_name=name, subfolder=subfolder, **hub))
    except (OSError, ValueError) as error:
        raise ValueError(f"{where}: expected a diffusers JSON config; found: {error}") from error


def infer_preset(path_or_id, class_name: str, **kwargs) -> str | None:
    """The preset a folder implies without doubt, else None: only the few-step variant of a family ships that way
    (FLUX.1 without a guidance embedding is schnell; a FLUX.2-klein folder marked `is_distilled`; SANA-Sprint)."""
    family = PIPELINE_FAMILIES[class_name]
    if family == "sana-sprint":
        return "sana-sprint"
    if family == "flux":
        guidance = read_config(path_or_id, "config.json", "transformer", **kwargs).get("guidance_embeds", False)
        return None if guidance else "flux-schnell"
    if family == "flux2":
        return "flux2-klein" if read_config(path_or_id, **kwargs).get("is_distilled") else None
    return None  # Z-Image, Qwen-Image and SD3.5 ship base and distilled weights in identical folders


def load_one_step(path_or_id, preset: str | None = None, lora: str | Path | None = None, lora_scale: float = 1.0,
                  **from_pretrained_kwargs):
    """Load a distilled text-to-image model for one-/few-step sampling.

    Args:
        path_or_id: a diffusers folder or hub id (model_index.json with its components).
        preset: a name from `swiftstep.core.presets.PRESETS`. Default: inferred where the folder leaves no doubt
            (SD/SDXL: the stored preset or the scheduler's; FLUX.1-schnell, FLUX.2-klein, SANA-Sprint); else
            an error naming the presets that fit.
        lora: a LoRA file the preset needs (Qwen-Image-Lightning) or any LoRA, loaded with the stock loader; or a
            list of LoRA files and (file, scale) pairs, all active at once.
        lora_scale: the strength of a LoRA given without its own (peft adapters "swiftstep", "swiftstep_1", …).
        **from_pretrained_kwargs: passed to `from_pretrained` (`dtype`, `local_files_only`, …).

    Returns:
        `OneStepPipeline` for SD1.x/SD2.x/SDXL UNets; `DistilledDiTPipeline` (same call signature) for the DiTs.
    """
    index = read_config(path_or_id, **from_pretrained_kwargs)
    class_name = index.get("_class_name")
    if class_name in UNET_PIPELINES:
        from .pipeline_one_step import OneStepPipeline

        if preset is not None and preset not in UNET_PRESETS:
            get_preset(preset)  # unknown names: the list of valid ones
            fam = DIT_FAMILY_NAMES[FLOW_PRESETS[preset].family]
            raise ValueError(f"Preset {preset!r} is for {fam} ({FLOW_PRESETS[preset].pipeline}), but {path_or_id} is "
                             f"an SD/SDXL UNet folder ({class_name}); presets that fit: {', '.join(UNET_PRESETS)}.")
        pipe = OneStepPipeline.from_pretrained(path_or_id, preset=preset, **from_pretrained_kwargs)
        load_loras(pipe, lora, lora_scale)
        return pipe
    if class_name not in PIPELINE_FAMILIES:
        known = ", ".join([*UNET_PIPELINES[:3], *PIPELINE_FAMILIES])
        raise ValueError(f"{path_or_id}: model_index.json names {class_name!r}; `load_one_step` knows {known}.")
    family = PIPELINE_FAMILIES[class_name]
    if preset is None:
        preset = infer_preset(path_or_id, class_name, **from_pretrained_kwargs)
        if preset is None:
            raise ValueError(
                f"{path_or_id}: a {DIT_FAMILY_NAMES[family]} folder ({class_name}) does not say which distilled "
                f"variant it holds; pass `preset=` (one of: {', '.join(presets_for(family))}).")
    import diffusers

    stock = getattr(diffusers, class_name).from_pretrained(path_or_id, **from_pretrained_kwargs)
    pipe = DistilledDiTPipeline(stock, preset)  # checks the preset fits before the LoRA is loaded
    load_loras(stock, lora, lora_scale)
    return pipe


def load_loras(pipe, lora, scale: float = 1.0) -> list[str]:
    """Load one LoRA file, or a list of files and (file, scale) pairs, with the pipeline's own loader, all active at
    once: adapters "swiftstep", "swiftstep_1", … with their scales (`scale` where a file has none). A file that
    does not parse is an error naming it. Returns the adapter names."""
    if lora is None:
        return []
    from ..core import finite
    from .lora_check import check_file

    entries = [lora] if isinstance(lora, (str, Path)) else list(lora)
    names, scales = [], []
    for i, entry in enumerate(entries):
        path, weight = (entry, scale) if isinstance(entry, (str, Path)) else entry
        finite.check_finite(f"LoRA scale of {path}", weight)
        check_file(path)
        name = "swiftstep" if i == 0 else f"swiftstep_{i}"
        pipe.load_lora_weights(str(path), adapter_name=name)
        names.append(name)
        scales.append(float(weight))
    pipe.set_adapters(names, scales)
    return names
