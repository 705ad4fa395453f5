"""Compile the attention kernels for GPUs this machine does not have, exactly as a launch would, and read the result.

The CPU interpreter checks what a kernel computes, not whether it compiles for a real GPU, how many registers it
needs, whether it spills, whether its shared memory fits, or which tensor-core instructions it ends up using. Triton
can answer all of that without a GPU: `compile_launch` takes a launch built by the host wrapper's own launch builder
(`flash_launch`, `dual_launch`, `fp8_launch` — so the specialisation, constexprs and block sizes are those of a real
call), binds it with Triton's own binder for a chosen target (sm80 / sm89 / sm90), compiles it to a cubin with the
ptxas bundled in the Triton wheel and reads registers, spills and SASS with the bundled cuobjdump.

Used by tests/attention_kernels/test_compile_targets.py (CI, no GPU) and bench/kernel_resources.py (the table for every
shipped configuration). Timings still need a GPU: bench/attention.py.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import torch

# Per-block limits a launch is refused above (CUDA occupancy tables; Triton raises OutOfResources at load).
GPUS = {
    80: dict(name="A100", shared=166912, regs_per_sm=65536),
    89: dict(name="L40S / RTX 4090", shared=101376, regs_per_sm=65536),
    90: dict(name="H100 / H200", shared=232448, regs_per_sm=65536),
}
MMA_FAMILIES = ("HGMMA", "IGMMA", "QGMMA", "HMMA", "IMMA", "QMMA")


def _tool(name: str) -> str | None:
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else shutil.which(name)


def available() -> str:
    """'' when kernels can be compiled for NVIDIA targets here, else why not."""
    try:
        importlib.import_module("triton.backends.compiler")
    except ImportError as e:
        return f"triton is not importable ({e})"
    missing = [t for t in ("ptxas", "cuobjdump") if _tool(t) is None]
    return f"{', '.join(missing)} not found (bundled with Triton's NVIDIA backend)" if missing else ""


@dataclasses.dataclass
class KernelReport:
    """What the compiled kernel needs from the GPU and which MMA instructions it uses."""

    kernel: str
    arch: int
    num_warps: int
    registers: int  # per thread
    spill_bytes: int  # local memory per thread (register spills)
    shared_bytes: int  # dynamic + static per block
    mma: dict  # SASS MMA family → instruction count, e.g. {"HGMMA": 8}
    mma_shapes: tuple  # distinct MMA instructions, e.g. ("HGMMA.64x64x16.F32",)

    @property
    def blocks_per_sm(self) -> int:
        """Resident blocks per SM allowed by registers and shared memory (warps limit aside)."""
        gpu = GPUS[self.arch]
        by_regs = gpu["regs_per_sm"] // max(1, self.registers * 32 * self.num_warps)
        by_smem = gpu["shared"] // max(1, self.shared_bytes)
        return min(by_regs, by_smem)

    def problems(self, expect_mma: tuple = ()) -> list[str]:
        """Reasons this kernel would fail or run badly on its target ([] when none)."""
        gpu = GPUS[self.arch]
        out = []
        if self.shared_bytes > gpu["shared"]:
            out.append(f"needs {self.shared_bytes} B shared memory per block; {gpu['name']} allows {gpu['shared']}")
        if self.spill_bytes:
            out.append(f"spills {self.spill_bytes} B per thread to local memory ({self.registers} registers)")
        for fam in expect_mma:
            if not self.mma.get(fam):
                out.append(f"no {fam} instructions (found {self.mma or 'no MMA at all'})")
        return out


def compile_launch(launch, arch: int = 90) -> KernelReport:
    """Compile `launch` = (kernel, grid, args, constexprs, ...) from a `*_launch` builder for sm`arch`."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    why = available()
    if why:
        raise RuntimeError(f"cannot compile for sm{arch} here: {why}")
    if not hasattr(launch[0], "signature"):
        raise RuntimeError("the kernels were imported under TRITON_INTERPRET=1 (the CPU interpreter), which keeps no "
                           "compilable kernel; compile in a process without it (`python -m swiftstep.attention_kernels.targets`)")
    if arch not in GPUS:
        raise ValueError(f"arch must be one of {sorted(GPUS)}, got {arch}")
    kernel, _grid, args, meta = launch[:4]
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    bind = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, spec, options = bind(*args, **meta)
    options, signature, constexprs, attrs = kernel._pack_args(backend, meta, bound, spec, options)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                              options=options.__dict__)
    return _read_cubin(kernel.fn.__name__, arch, compiled.metadata.num_warps, compiled.metadata.shared,
                       compiled.asm["cubin"])


def _read_cubin(name: str, arch: int, num_warps: int, dynamic_shared: int, cubin: bytes) -> KernelReport:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", path], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True).stdout
    field = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    instrs = re.findall(r"\b((?:" + "|".join(MMA_FAMILIES) + r")(?:\.[\w]+)*)", sass)
    counts = collections.Counter(i.split(".")[0] for i in instrs)
    return KernelReport(kernel=name, arch=arch, num_warps=num_warps, registers=int(field.get("REG", 0)),
                        spill_bytes=int(field.get("LOCAL", 0)), shared_bytes=dynamic_shared +
                        int(field.get("SHARED", 0)), mma=dict(counts), mma_shapes=tuple(sorted(set(instrs))))


def shipped_launch(kind: str, dtype: torch.dtype, head_dim: int, lq: int = 1024, lk: int = 1024, mask: bool = False,
                   qk_format: str = "int8", config: dict | None = None):
    """The launch the public entry points build for one shape (`kind`: 'single' | 'nasa' | 'nag' | '8bit'), with
    small CPU tensors standing in for the GPU ones (only strides, dtypes and alignment reach the compiler)."""
    from . import flash_attn_triton as fa

    q = torch.zeros(1, 2, lq, head_dim, dtype=dtype)
    k = torch.zeros(1, 2, lk, head_dim, dtype=dtype)
    key_mask = torch.ones(1, lk, dtype=torch.bool) if mask else None
    if kind == "single":
        return fa.flash_launch(q, k, k, key_mask, config=config)
    if kind in ("nasa", "nag"):
        return fa.dual_launch(q, k, k, k, k, 0.5 if kind == "nasa" else None, key_mask, key_mask, config=config)
    if kind == "8bit":
        return fa.fp8_launch(q, k, k, qk_format=qk_format, config=config, emulate=False)
    raise ValueError(f"kind must be 'single', 'nasa', 'nag' or '8bit', got {kind!r}")


def expected_mma(kind: str, dtype: torch.dtype, arch: int, qk_format: str = "int8") -> tuple:
    """The tensor-core instruction families a well-compiled kernel uses: warpgroup MMAs (wgmma: HGMMA fp16/bf16,
    IGMMA int8, QGMMA e4m3) on Hopper, mma.sync (HMMA, IMMA, QMMA) before. fp32 inputs run exact fp32 products
    (`input_precision="ieee"`), which use no tensor cores."""
    hopper = arch >= 90
    if kind == "8bit":
        qk = ("IGMMA" if hopper else "IMMA") if qk_format == "int8" else ("QGMMA" if hopper else "QMMA")
        return tuple(dict.fromkeys((qk, "QGMMA" if hopper else "QMMA")))
    if dtype == torch.float32:
        return ()
    return ("HGMMA",) if hopper else ("HMMA",)


DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def check(case: dict) -> dict:
    """One case {'kind', 'dtype' (name), 'head_dim', 'lk', 'arch', optional 'lq', 'mask', 'qk_format'} →
    {'report': KernelReport fields, 'problems': [...], 'expected_mma': [...]} or {'error': message}."""
    dtype = DTYPES[case["dtype"]]
    fmt = case.get("qk_format", "int8")
    try:
        launch = shipped_launch(case["kind"], dtype, case["head_dim"], case.get("lq", 1024), case["lk"],
                                case.get("mask", False), fmt)
        report = compile_launch(launch, case["arch"])
    except Exception as e:  # noqa: BLE001 — reported to the caller, who decides
        return {"error": f"{type(e).__name__}: {e}"}
    expected = expected_mma(case["kind"], dtype, case["arch"], fmt)
    return {"report": dataclasses.asdict(report), "blocks_per_sm": report.blocks_per_sm,
            "problems": report.problems(expected), "expected_mma": list(expected)}


def check_in_subprocess(cases: list[dict], timeout: float = 900) -> list[dict]:
    """`check` for each case in a fresh Python without TRITON_INTERPRET (an interpreter-mode import keeps no
    compilable kernels): what the test suite uses, since it runs the kernels themselves under the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run([sys.executable, "-m", "swiftstep.attention_kernels.targets"], input=json.dumps(cases),
                          capture_output=True, text=True, env=env, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"the compile check failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":  # JSON list of cases on stdin → JSON list of results on the last stdout line
    print(json.dumps([check(c) for c in json.load(sys.stdin)]))
