"""Framework-neutral math (torch only): presets, samplers, guidance. Imports neither diffusers nor ComfyUI."""
