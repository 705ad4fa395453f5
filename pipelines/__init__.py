"""diffusers adapters: pipelines, attention processors and checkpoint loaders over `swiftstep.core`."""

from .pipeline_mar import MARPipeline
from .pipeline_one_step import OneStepPipeline
from .pipeline_sr import OneStepSRPipeline
from .pipeline_video_sr import VideoSRPipeline

__all__ = ["MARPipeline", "OneStepPipeline", "OneStepSRPipeline", "VideoSRPipeline"]
