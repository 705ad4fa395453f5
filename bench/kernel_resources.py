"""What every shipped attention-kernel configuration needs from each GPU generation, compiled here without a GPU.

    python bench/kernel_resources.py                 # sm80, sm89, sm90; every kernel, dtype, head dim, key length
    python bench/kernel_resources.py --arch 90 --kinds 8bit

Each row compiles the launch the public entry point builds for that shape (`swiftstep.attention_kernels.targets`: Triton's
own binder and specialisation, the bundled ptxas) and prints registers per thread, spilled bytes, shared memory per
block, resident blocks per SM, the tensor-core instructions in the SASS, and what would go wrong on that GPU
("-" when nothing). It is the static half of kernel tuning: a configuration that spills, does not fit, or falls
off the tensor cores is wrong before it is timed. Timings need a GPU: bench/attention.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from swiftstep.attention_kernels import targets  # noqa: E402

HEAD_DIMS = (40, 64, 80, 96, 128, 160)
KEYS = {"single": (77, 300, 4096), "nasa": (77, 300), "nag": (77, 300), "8bit": (4096,)}


def rows(arches, kinds, dtypes, head_dims):
    for arch in arches:
        for kind in kinds:
            for dname in (["float16"] if kind == "8bit" else dtypes):
                for fmt in (("int8", "e4m3") if kind == "8bit" else ("",)):
                    if kind == "8bit" and arch < 89:
                        continue  # no e4m3 MMA: dispatch runs SDPA there
                    for d in head_dims:
                        for lk in KEYS[kind]:
                            yield arch, kind, dname, fmt, d, lk


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=sorted(targets.GPUS))
    p.add_argument("--kinds", nargs="+", default=list(KEYS), choices=list(KEYS))
    p.add_argument("--dtypes", nargs="+", default=list(targets.DTYPES), choices=list(targets.DTYPES))
    p.add_argument("--head-dims", type=int, nargs="+", default=list(HEAD_DIMS))
    args = p.parse_args()
    why = targets.available()
    if why:
        sys.exit(f"cannot compile for NVIDIA targets here: {why}")
    import triton
    print(f"# Triton {triton.__version__}, torch {torch.__version__}; compiled ahead of time, no GPU used")
    head = f"{'sm':>3} {'kernel':7} {'dtype':8} {'QK':4} {'d':>4} {'Lk':>5} {'regs':>4} {'spill':>5} " \
           f"{'smem KiB':>8} {'blk/SM':>6}  {'MMA':34} problems"
    print(head)
    print("-" * len(head))
    bad = 0
    t0 = time.time()
    for arch, kind, dname, fmt, d, lk in rows(args.arch, args.kinds, args.dtypes, args.head_dims):
        res = targets.check(dict(kind=kind, dtype=dname, head_dim=d, lk=lk, arch=arch, qk_format=fmt or "int8"))
        if "error" in res:  # report and go on: the table is the point
            bad += 1
            print(f"{arch:>3} {kind:7} {dname:8} {fmt:4} {d:>4} {lk:>5}  COMPILE ERROR {res['error'].splitlines()[-1][:90]}")
            continue
        r, problems = res["report"], res["problems"]
        bad += bool(problems)
        mma = " ".join(sorted(set(s.split(".F32")[0].split(".S8")[0] for s in r["mma_shapes"]))) or "(no tensor cores)"
        print(f"{arch:>3} {kind:7} {dname:8} {fmt:4} {d:>4} {lk:>5} {r['registers']:>4} {r['spill_bytes']:>5} "
              f"{r['shared_bytes'] / 1024:>8.1f} {res['blocks_per_sm']:>6}  {mma:34} {'; '.join(problems) or '-'}")
    print(f"\n{bad} configuration(s) with problems; {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
