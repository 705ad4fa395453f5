"""diffusers adapters: pipelines, attention processors and checkpoint loaders over `swiftstep.core`."""

from .load_one_step import load_one_step
from .pipeline_distilled_dit import DistilledDiTPipeline
from .pipeline_mar import MARPipeline
from .pipeline_one_step import OneStepPipeline
from .pipeline_sr import OneStepSRPipeline
from .pipeline_video_sr import VideoSRPipeline

__all__ = ["DistilledDiTPipeline", "MARPipeline", "OneStepPipeline", "OneStepSRPipeline", "VideoSRPipeline",
           "load_one_step"]
