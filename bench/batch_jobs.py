"""Batch jobs vs the straightforward path: N images as N `swiftstep generate --prompt` commands (each loads the
model) against one `swiftstep generate --prompts FILE` job (one load), and a rerun of the finished job (resume:
nothing loaded, nothing made).

    python bench/batch_jobs.py                                    # tiny random SD2 model on the CPU, 8 prompts
    python bench/batch_jobs.py --model stabilityai/sd-turbo --device cuda --dtype float16 --prompts 32

Prints wall seconds per path (each a fresh process, as a user runs them) and the ratio to the N-command path.
Benchmarks are not tests: nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(args: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "swiftstep", *args], check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="a diffusers folder or hub id (default: a tiny random SD2 model)")
    p.add_argument("--preset", default="sd-turbo")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = a.model
        if model is None:
            from swiftstep.tiny_models import save_folder

            model = str(save_folder("sd2", tmp / "tiny-sd2"))
        prompts = [f"a photo of object number {i}" for i in range(a.prompts)]
        (tmp / "prompts.txt").write_text("\n".join(prompts) + "\n")
        common = ["generate", "--model", model, "--preset", a.preset, "--device", a.device, "--dtype", a.dtype]
        singles = sum(run([*common, "--prompt", prompt, "--seed", str(i), "--out", str(tmp / "single" / f"{i}.png")])
                      for i, prompt in enumerate(prompts))
        job = run([*common, "--prompts", str(tmp / "prompts.txt"), "--out-dir", str(tmp / "job")])
        rerun = run([*common, "--prompts", str(tmp / "prompts.txt"), "--out-dir", str(tmp / "job")])
    print(f"# {a.prompts} images, {a.model or 'tiny random SD2'} ({a.preset}), {a.device} {a.dtype}; wall seconds, "
          f"each path in fresh processes")
    print(f"{'path':<40}{'s':>9}{'× N commands':>14}")
    for name, seconds in ((f"{a.prompts} × generate --prompt", singles), ("one generate --prompts job", job),
                          ("rerun of the finished job (resume)", rerun)):
        print(f"{name:<40}{seconds:>9.2f}{seconds / singles:>14.3f}")


if __name__ == "__main__":
    main()
