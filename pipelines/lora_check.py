"""Make a LoRA file that matches nothing (or only part of a model) an error instead of a silent no-op."""

from __future__ import annotations

from pathlib import Path

from ..core import weight_files

_DOWN_SUFFIXES = (".lora_A.weight", ".lora.down.weight", ".lora_down.weight", ".lora_linear_layer.down.weight",
                  "_lora.down.weight")  # the last: attention-processor layout diffusers converts kohya keys to
_PREFIXES = ("unet", "text_encoder", "text_encoder_2")


def check_file(source) -> None:
    """A local .safetensors LoRA that does not parse (truncated, not safetensors) named with what was expected,
    before diffusers reports it as a bare `OSError: Unable to load weights`."""
    if isinstance(source, (str, Path)) and Path(source).suffix == ".safetensors" and Path(source).is_file():
        with weight_files.open_safetensors(source, "a LoRA (diffusers/peft or kohya keys)"):
            pass


def expected_modules(state_dict: dict) -> dict[str, set[str]]:
    """Module paths a LoRA state dict (diffusers layout, after `lora_state_dict`) targets, per component prefix."""
    out: dict[str, set[str]] = {p: set() for p in _PREFIXES}
    for key in state_dict:
        suffix = next((s for s in _DOWN_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            continue
        prefix, _, module = key[: -len(suffix)].partition(".")
        out.setdefault(prefix, set()).add(module.removeprefix("text_model."))
    return out


def check_targets(state_dict: dict, pipe, source: str) -> None:
    """Raise before loading when the file targets a component this pipeline lacks or has no LoRA keys at all."""
    targets = expected_modules(state_dict)
    if not any(targets.values()):
        raise ValueError(
            f"{source}: found no LoRA weights; expected keys like `unet.down_blocks.0.attentions.0.proj_in.lora_A.weight`"
            f" or kohya `lora_unet_down_blocks_0_….lora_down.weight`, found e.g. {list(state_dict)[:3]}."
        )
    for prefix, modules in targets.items():
        if modules and getattr(pipe, prefix, None) is None:
            raise ValueError(
                f"{source}: has {len(modules)} LoRA layers for `{prefix}`, which this {pipe.family.upper()} pipeline "
                f"does not have (an SDXL LoRA on an SD1.x/SD2.x model?)."
            )


def adapter_modules(pipe, adapter: str) -> dict[str, set[str]]:
    """Module paths per component that carry LoRA layers of `adapter`."""
    out = {}
    for prefix in _PREFIXES:
        model = getattr(pipe, prefix, None)
        if model is None:
            continue
        out[prefix] = {name for name, m in model.named_modules()
                       if adapter in (getattr(m, "lora_A", None) or {})}
    return out


def check_loaded(state_dict: dict, pipe, adapter: str, source: str) -> None:
    """After loading: every targeted module got a LoRA layer; otherwise name the keys that matched nothing."""
    targets = expected_modules(state_dict)
    loaded = adapter_modules(pipe, adapter)
    for prefix, modules in targets.items():
        if not modules:
            continue
        got = loaded.get(prefix, set())
        if len(got) < len(modules):
            missing = sorted(modules - got)[:3]
            model = type(getattr(pipe, prefix)).__name__
            raise ValueError(
                f"{source}: {len(got)} of {len(modules)} LoRA layers for `{prefix}` match this {model}; "
                f"unmatched e.g. {missing}; these weights would be silently ignored. Is the LoRA for another base model?"
            )
