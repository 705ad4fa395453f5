"""Batch jobs for the command line: many outputs from one command, resumable, split across processes by accelerate.

A job is a list of `Item`s, each one output file. An item's file name comes from its index (or its input's name) and
its seed from `--seed` + index, so what a file holds never depends on how the work was split. `run_job`:

- skips items whose output exists, reads back, and carries the same job parameters in its metadata (`--resume`,
  the default); an output that does not read back (a partial or corrupt file) or was made with other parameters is
  made again;
- writes each output under a temporary name in the output folder and renames it when complete, so an interrupted
  job never leaves a partial file under a final name;
- under `accelerate launch` splits the pending items across the processes with `PartialState.split_between_processes`
  (the main process decides what is pending and broadcasts it, so every process splits the same list, also across
  machines without a shared folder); one model per process, on its own device;
- reports a bad item (its line or file name and why) and goes on with the others; only the main process shows the
  progress bar and prints the summary of what was made, skipped and failed (gathered from every process).

The item sources are `prompt_items` (a prompt file: one prompt a line, or JSON Lines) and `file_items` (files and
folders of images or videos).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v")
JSON_KEYS = ("prompt", "negative_prompt", "seed", "height", "width")  # what one JSON line may set


@dataclass
class Item:
    """One output of a job. `spec` is everything the output depends on that varies per item (prompt, seed, input
    file, …); the job's own settings are added by the command. `error` marks a bad item: reported, never run."""

    index: int
    name: str  # output file name inside the output folder
    source: str  # where the item came from, for messages: "prompts.txt:12" or an input file
    spec: dict = field(default_factory=dict)
    error: str | None = None


@dataclass
class Summary:
    made: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (source, why)
    made_per_process: list[int] = field(default_factory=list)

    def extend(self, other: "Summary") -> None:
        self.made += other.made
        self.skipped += other.skipped
        self.failed += other.failed
        self.made_per_process.append(len(other.made))

    def text(self) -> str:
        split = (f" ({' + '.join(map(str, self.made_per_process))} on {len(self.made_per_process)} processes)"
                 if len(self.made_per_process) > 1 else "")
        lines = [f"made {len(self.made)}{split}, skipped {len(self.skipped)} (already done), failed "
                 f"{len(self.failed)}"]
        lines += [f"  failed: {source}: {why}" for source, why in sorted(self.failed)]
        return "\n".join(lines)


# ---------------------------------------------------------------- item sources
def prompt_items(path: str | Path, seed: int, per_prompt: int = 1) -> list[Item]:
    """Items of a prompt file: one prompt a line (`.txt`, any suffix but `.jsonl`/`.ndjson`), or JSON Lines, one
    object a line with the keys `JSON_KEYS` ("prompt" required). Line n (0-based) gives item index n·per_prompt + k,
    file `{n:05d}.png` (`{n:05d}_{k}.png` with several per prompt) and seed `seed + index` unless the line sets
    "seed" (then seed + k). An empty line, bad JSON, an unknown key or a value of the wrong type is a bad item naming
    the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts: no prompt file at {path.resolve()}.")
    if per_prompt < 1:
        raise ValueError(f"--num-images must be ≥ 1, got {per_prompt}.")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise ValueError(f"--prompts: {path.name}: expected UTF-8 text, found: {error}.") from error
    json_lines = path.suffix.lower() in (".jsonl", ".ndjson")
    items = []
    for n, line in enumerate(lines):
        source = f"{path.name}:{n + 1}"
        spec, error = _json_line(line) if json_lines else _text_line(line)
        for k in range(per_prompt):
            index = n * per_prompt + k
            name = f"{n:05d}.png" if per_prompt == 1 else f"{n:05d}_{k}.png"
            item_seed = seed + index if spec is None or "seed" not in spec else spec["seed"] + k
            full = None if spec is None else {"negative_prompt": None, "height": None, "width": None, **spec,
                                               "seed": item_seed}
            items.append(Item(index, name, source, full or {}, error))
    if not items:
        raise ValueError(f"--prompts: {path.name} holds no prompt.")
    return items


def _text_line(line: str):
    if not line.strip():
        return None, "empty prompt line"
    return {"prompt": line.strip()}, None


def _json_line(line: str):
    if not line.strip():
        return None, "empty line (expected a JSON object with a \"prompt\")"
    try:
        value = json.loads(line)
    except json.JSONDecodeError as error:
        return None, f"not valid JSON: {error}"
    if not isinstance(value, dict):
        return None, f"expected a JSON object, found {type(value).__name__}"
    unknown = sorted(set(value) - set(JSON_KEYS))
    if unknown:
        return None, f"unknown key {', '.join(map(repr, unknown))} (known: {', '.join(JSON_KEYS)})"
    for key in ("prompt", "negative_prompt"):
        if key in value and (not isinstance(value[key], str) or not value[key].strip()):
            if key == "prompt" or value[key] is not None:
                return None, f"\"{key}\" must be a non-empty string, found {value[key]!r}"
    if "prompt" not in value:
        return None, "no \"prompt\""
    for key in ("seed", "height", "width"):
        v = value.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < (0 if key == "seed" else 1)):
            return None, f"\"{key}\" must be a {'non-negative' if key == 'seed' else 'positive'} integer, found {v!r}"
    return {k: v for k, v in value.items() if v is not None}, None


def file_items(inputs: list[str | Path], suffixes: tuple[str, ...], name: Callable[[Path], str], seed: int,
               flag: str = "input") -> list[Item]:
    """Items of input files and folders (a folder's files with `suffixes`, sorted, not recursive), in the order
    given. Item i has seed `seed + i` and the output file `name(input)`; an input that does not exist, or whose output
    name another input already has, is a bad item."""
    files = []
    for entry in map(Path, inputs):
        if entry.is_dir():
            found = sorted(p for p in entry.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
            if not found:
                raise ValueError(f"{flag}: folder {entry} holds no {'/'.join(suffixes)} file.")
            files += found
        else:
            files.append(entry)
    if not files:
        raise ValueError(f"{flag}: no input given.")
    items, seen = [], {}
    for i, path in enumerate(files):
        out = name(path)
        error = None
        if not path.is_file():
            error = "no such file"
        elif out in seen:
            error = f"its output name {out} is already that of {seen[out]}; rename one of them"
        seen.setdefault(out, str(path))
        items.append(Item(i, out, str(path), {"input": str(path.resolve()), "seed": seed + i}, error))
    return items


# ---------------------------------------------------------------- outputs and their metadata
def png_job(path: Path) -> dict | None:
    """The `job` parameters stored in a PNG written by the CLI, or None if it does not read back completely."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()  # a truncated file fails here
            return json.loads(image.text["swiftstep"]).get("job")
    except Exception:  # noqa: BLE001 - anything unreadable is redone
        return None


def video_job(path: Path) -> dict | None:
    """The `job` parameters stored in an MP4 written by the CLI (its `comment` tag), or None if it does not open or
    holds no frame (an interrupted write has no index)."""
    try:
        import av

        with av.open(str(path)) as container:
            meta = json.loads(container.metadata.get("comment", "{}"))
            if not container.streams.video or container.streams.video[0].frames == 0:
                return None
            return meta.get("job")
    except Exception:  # noqa: BLE001 - anything unreadable is redone
        return None


def temporary_path(final: Path) -> Path:
    """A hidden name beside `final` with the same suffix (writers pick the format from it), unique per process."""
    return final.with_name(f".{final.stem}.partial-{os.getpid()}{final.suffix}")


# ---------------------------------------------------------------- the runner
def _state(cpu: bool):
    from accelerate import PartialState

    return PartialState(cpu=cpu)


def run_job(items: list[Item], out_dir: str | Path, produce: Callable[[Item, Path], None],
            expected: Callable[[Item], dict], read_job: Callable[[Path], dict | None] = png_job,
            resume: bool = True, cpu: bool = True, what: str = "images",
            prepare: Callable[[], object] | None = None) -> Summary:
    """Make every item: `produce(item, path)` writes the item's output to `path` (a temporary name, renamed when it
    returns); an exception there fails that item only. `expected(item)` is the metadata the finished output must
    carry (`read_job(path)`) to be skipped on a rerun. `prepare()` (loading the model) runs once in each process that
    has items to make, before the first; what it raises stops the job (a bad model file is no per-item failure).
    Returns the summary of the whole job (every process's)."""
    from accelerate.utils import broadcast_object_list, gather_object

    out_dir = Path(out_dir)
    state = _state(cpu)
    if state.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
    local = Summary()
    local.failed += [(item.source, item.error) for item in items if item.error and state.is_main_process]
    good = [item for item in items if not item.error]
    pending = None
    if state.is_main_process:
        pending = []
        for item in good:
            if resume and read_job(out_dir / item.name) == expected(item):
                local.skipped.append(item.name)
            else:
                pending.append(item.index)
    if state.num_processes > 1:
        pending = broadcast_object_list([pending])[0]
    by_index = {item.index: item for item in good}
    bar = _Progress(out_dir, [by_index[i].name for i in pending], state, what)
    try:
        with state.split_between_processes(pending) as mine:
            if mine and prepare is not None:
                prepare()
            for index in mine:
                item = by_index[index]
                final = out_dir / item.name
                tmp = temporary_path(final)
                try:
                    produce(item, tmp)
                    os.replace(tmp, final)
                    local.made.append(item.name)
                except Exception as error:  # noqa: BLE001 - a failing item is reported, the job goes on
                    ours = isinstance(error, (ValueError, FileNotFoundError, FloatingPointError))  # messages that say
                    local.failed.append((item.source, str(error) if ours else f"{type(error).__name__}: {error}"))
                finally:
                    tmp.unlink(missing_ok=True)
                bar.step()
        if state.num_processes > 1:
            summary = Summary()
            for part in gather_object([local]):
                summary.extend(part)
        else:
            summary = local
        bar.step(finished=len(summary.made) + len(summary.failed) - (len(items) - len(good)))  # bad items: not run
    finally:
        bar.close()
    if state.is_main_process:
        print(summary.text().splitlines()[0])
        for line in summary.text().splitlines()[1:]:
            print(line, file=sys.stderr)
    return summary


class _Progress:
    """The job's one progress bar, on the main process. With several processes it counts the finished outputs in the
    output folder written since the job started (at most once a second), so it shows the whole job where the folder
    is shared (one machine, or a network folder) and the main machine's part otherwise; it is completed once every
    process has finished."""

    def __init__(self, out_dir: Path, names: list[str], state, what: str):
        self.out_dir, self.names, self.state = out_dir, set(names), state
        self.bar, self.last, self.start = None, 0.0, time.time()
        if state.is_main_process:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=len(names), desc=f"swiftstep: {what}", unit="item", dynamic_ncols=True)

    def step(self, finished: int | None = None) -> None:
        """One item of this process done; `finished`: the job's total once every process is done."""
        if self.bar is None:
            return
        if finished is not None:
            self.bar.update(max(0, finished - self.bar.n))
        elif self.state.num_processes == 1:
            self.bar.update(1)
        elif time.monotonic() - self.last >= 1.0:
            self.last = time.monotonic()
            done = sum(1 for entry in os.scandir(self.out_dir)
                       if entry.name in self.names and entry.stat().st_mtime >= self.start - 1)
            self.bar.update(max(0, done - self.bar.n))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


__all__ = ["Item", "Summary", "prompt_items", "file_items", "run_job", "png_job", "video_job", "temporary_path",
           "IMAGE_SUFFIXES", "VIDEO_SUFFIXES", "JSON_KEYS"]
