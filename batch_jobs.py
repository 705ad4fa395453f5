"""Batch jobs for the command line: many outputs from one command, resumable, split across processes by accelerate.

A job is a list of `Item`s, each one output file. An item's file name comes from its index (or its input's name) and
its seed from `--seed` + index, so what a file holds never depends on how the work was split. `run_job`:

- skips items whose output exists, reads back, and carries the same job parameters in its metadata (`--resume`,
  the default); an output that does not read back (a partial or corrupt file) or was made with other parameters is
  made again;
- writes each output under a temporary name in the output folder and renames it when complete, so an interrupted
  job never leaves a partial file under a final name;
- under `accelerate launch` splits the pending items across the processes with `PartialState.split_between_processes`
  (the main process broadcasts its items and what of them is pending, so every process splits the same list); one
  model per process, on its own device;
- reports a bad item (its line or file name and why) and goes on with the others; only the main process shows the
  progress bar and prints the summary of what was made, skipped and failed (gathered from every process).

The item sources are `prompt_items` (a prompt file: one prompt a line, or JSON Lines) and `file_items` (files and
folders of images or videos).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
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
    failed: list[tuple[int, str, str]] = field(default_factory=list)  # (index, source, why)
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
        lines += [f"  failed: {source}: {why}" for _, source, why in sorted(self.failed)]
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
    if path.suffix.lower() == ".json":
        raise ValueError(f"--prompts: {path.name}: a .json file is read as neither; name JSON Lines (one object a "
                         f"line) .jsonl, or plain prompts (one a line) .txt.")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # -sig: Windows editors' byte-order mark
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
               out_dir: str | Path, flag: str = "input") -> list[Item]:
    """Items of input files and folders (a folder's files with `suffixes`, sorted, not recursive; hidden files
    skipped), in the order given; the output file is `name(input)`. Every item has the seed `seed`: the output of an
    input is then the same whichever other files the job holds (seeds by position would change every later file's
    output when a file is added to a folder, and a resumed job would redo them). An input that does not exist, or
    whose output name another input already has, is a bad item; reading from the output folder is refused (the
    outputs would become inputs of the next run)."""
    out_dir = Path(out_dir).resolve()
    files = []
    for entry in map(Path, inputs):
        if entry.is_dir():
            if entry.resolve() == out_dir:
                raise ValueError(f"{flag}: {entry} is also the output folder; write the outputs to another folder.")
            found = sorted(p for p in entry.iterdir()
                           if p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith("."))
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
        items.append(Item(i, out, str(path), {"input": str(path.resolve()), "seed": seed}, error))
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


def write_atomically(final: Path, write: Callable[[Path], None]) -> None:
    """`write(path)` to a temporary name beside `final`, renamed to `final` when it returns; whatever it raises, no
    temporary file stays behind."""
    tmp = temporary_path(final)
    try:
        write(tmp)
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(OSError):  # Windows: a file still open elsewhere
            tmp.unlink(missing_ok=True)


def job_record(spec: dict, settings: dict) -> dict:
    """What an output stores as its `job` parameters (and a rerun compares): the item's spec and the job's settings,
    as they read back from JSON (tuples as lists)."""
    return json.loads(json.dumps({**spec, **settings}))


# ---------------------------------------------------------------- the runner
def job_state(cpu: bool):
    """accelerate's PartialState for a job (the first construction in a process wins). The collectives' timeout is a
    day, not NCCL's 10 minutes: a process that has finished its share waits at the end for the slowest one (a long
    clip, a model loading elsewhere), and the default would abort it and with it the job."""
    from accelerate import PartialState

    return PartialState(cpu=cpu, timeout=timedelta(days=1))


class _Terminated(BaseException):
    """SIGTERM (a scheduler's preemption, torchrun stopping the other processes) as an exception, so the temporary
    file of the item in progress is removed like on Ctrl-C."""


@contextlib.contextmanager
def _terminate_as_exception():
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise _Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _remove_stale_temporaries(out_dir: Path, items: list[Item]) -> None:
    """Temporary files an earlier run left (killed with SIGKILL, power loss): `.<stem>.partial-<pid><suffix>` of
    this job's items."""
    names = {(Path(item.name).stem, Path(item.name).suffix) for item in items}
    for entry in out_dir.glob(".*.partial-*"):
        stem, _, rest = entry.name[1:].rpartition(".partial-")
        suffix = Path(rest).suffix
        if (stem, suffix) in names:
            entry.unlink(missing_ok=True)


def run_job(items: list[Item], out_dir: str | Path, produce: Callable[[Item, Path], None],
            expected: Callable[[Item], dict], read_job: Callable[[Path], dict | None] = png_job,
            resume: bool = True, cpu: bool = True, what: str = "images",
            prepare: Callable[[], object] | None = None) -> Summary:
    """Make every item: `produce(item, path)` writes the item's output to `path` (a temporary name, renamed when it
    returns); an exception there fails that item only. `expected(item)` is the metadata the finished output must
    carry (`read_job(path)`) to be skipped on a rerun. `prepare()` (loading the model) runs once in each process that
    has items to make, before the first; what it raises stops the job in every process (a bad model file is no
    per-item failure). The main process's `items` and its view of what is done are broadcast, so every process
    splits the same list. Returns the summary of the whole job (every process's)."""
    from accelerate.utils import broadcast_object_list, gather_object

    out_dir = Path(out_dir)
    state = job_state(cpu)
    local, pending = Summary(), None
    if state.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(out_dir, items)
        local.failed += [(item.index, item.source, item.error) for item in items if item.error]
        pending = []
        for item in items:
            if item.error:
                continue
            if resume and read_job(out_dir / item.name) == expected(item):
                local.skipped.append(item.name)
            else:
                pending.append(item.index)
    if state.num_processes > 1:
        items, pending = broadcast_object_list([items, pending])
    by_index = {item.index: item for item in items}
    bar = _Progress(out_dir, [by_index[i].name for i in pending], state, what)
    stopped = None  # what `prepare` raised here
    try:
        with _terminate_as_exception(), state.split_between_processes(pending) as mine:
            try:
                if mine and prepare is not None:
                    prepare()
            except Exception as error:  # noqa: BLE001 - re-raised in every process after the gather
                stopped, mine = error, []
            for index in mine:
                _make(by_index[index], out_dir, produce, local)
                bar.step()
            if state.num_processes > 1:
                summary, stops = Summary(), []
                for part, stop in gather_object([(local, stopped)]):
                    summary.extend(part)
                    stops.append(stop)
                stopped = next((stop for stop in stops if stop is not None), None)
            else:
                summary = local
            bar.step(finished=len(summary.made) + len(summary.failed) - sum(item.error is not None for item in items))
    finally:
        bar.close()
    if state.num_processes > 1:
        state.destroy_process_group()  # a clean exit (gloo can abort at interpreter shutdown otherwise)
    if stopped is not None:
        raise stopped
    if state.is_main_process:
        print(summary.text().splitlines()[0])
        for line in summary.text().splitlines()[1:]:
            print(line, file=sys.stderr)
    return summary


def _make(item: Item, out_dir: Path, produce, local: Summary) -> None:
    try:
        write_atomically(out_dir / item.name, lambda path: produce(item, path))
        local.made.append(item.name)
    except Exception as error:  # noqa: BLE001 - a failing item is reported, the job goes on
        ours = isinstance(error, (ValueError, FileNotFoundError, FloatingPointError))  # messages that say it all
        local.failed.append((item.index, item.source, str(error) if ours else f"{type(error).__name__}: {error}"))


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
           "write_atomically", "job_record", "job_state",
           "IMAGE_SUFFIXES", "VIDEO_SUFFIXES", "JSON_KEYS"]
