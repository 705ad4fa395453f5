"""diffusers adapters: pipelines, attention processors and checkpoint loaders over `swiftstep.core`."""

from .pipeline_one_step import OneStepPipeline

__all__ = ["OneStepPipeline"]
