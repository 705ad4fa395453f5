"""Video files in and out for the CLI, with PyAV (FFmpeg): frames stream in and out one at a time, the frame rate
and the audio of the input are kept, and the generation parameters go into the container's `comment` tag."""

from __future__ import annotations

import json
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import torch


class VideoReader:
    """Decoded RGB frames of a video file's first video stream as float [3, H, W] tensors in [0, 1]."""

    def __init__(self, path: str | Path):
        import av

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"No input video at {self.path.resolve()}.")
        try:
            self._container = av.open(str(self.path))
        except av.error.FFmpegError as e:
            raise ValueError(f"{self.path.name} is not a video FFmpeg can read: {e}") from None
        if not self._container.streams.video:
            raise ValueError(f"{self.path.name} has no video stream.")
        stream = self._container.streams.video[0]
        self.fps: Fraction = stream.average_rate or stream.guessed_rate or Fraction(30)
        self.frame_count = stream.frames or None
        self.has_audio = bool(self._container.streams.audio)

    def __len__(self) -> int:
        if self.frame_count is None:
            raise TypeError("the container does not state its frame count")
        return self.frame_count

    def __iter__(self) -> Iterator[torch.Tensor]:
        try:
            for frame in self._container.decode(video=0):
                yield torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1).float() / 255.0
        finally:
            self._container.close()


class VideoWriter:
    """H.264 (yuv420p, CRF `crf`) at `fps`; frames [3, H, W] in [0, 1] are written as they come. `audio_from`
    copies that file's first audio stream unchanged."""

    def __init__(self, path: str | Path, fps: Fraction, crf: int = 18, audio_from: str | Path | None = None,
                 metadata: dict | None = None):
        import av

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._container = av.open(str(self.path), "w")
        if metadata:
            self._container.metadata["comment"] = json.dumps(metadata)
        self._fps, self._crf, self._audio_from = Fraction(fps), crf, audio_from
        self._video = self._audio = self._audio_in = None
        self.frames = 0

    def _open_streams(self, height: int, width: int) -> None:
        import av

        self._video = self._container.add_stream("libx264", rate=self._fps)
        self._video.width, self._video.height, self._video.pix_fmt = width, height, "yuv420p"
        self._video.options = {"crf": str(self._crf)}
        self._video.codec_context.time_base = 1 / self._fps
        if self._audio_from is not None:
            self._audio_in = av.open(str(self._audio_from))
            if self._audio_in.streams.audio:
                self._audio = self._container.add_stream_from_template(self._audio_in.streams.audio[0])

    def write(self, frame: torch.Tensor) -> None:
        import av
        import numpy as np

        _, h, w = frame.shape
        if self._video is None:
            if h % 2 or w % 2:
                raise ValueError(f"H.264 (yuv420p) needs even frame sizes, got {w}×{h}.")
            self._open_streams(h, w)
        rgb = (frame.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        out = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        out.pts = self.frames
        self._container.mux(self._video.encode(out))
        self.frames += 1

    def close(self) -> None:
        if self._video is not None:
            self._container.mux(self._video.encode())
        if self._audio is not None:
            for packet in self._audio_in.demux(self._audio_in.streams.audio[0]):
                if packet.dts is None:
                    continue
                packet.stream = self._audio
                self._container.mux(packet)
        if self._audio_in is not None:
            self._audio_in.close()
        self._container.close()

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
