"""The kernels compile for real GPUs (sm80 / sm89 / sm90), without a GPU: ahead of time, with Triton's own binder
and the ptxas bundled in its wheel (`swiftstep.attention_kernels.targets`). The interpreter tests check what the kernels
compute; these check what only a real compile shows: that the launch the host wrapper builds compiles for the
target, fits its shared memory, does not spill, and runs on the intended tensor cores. The worst case of each
`default_config` branch (largest head dim, fp32's doubled tiles) is compiled for sm89, the generation with the
least shared memory per block (99 KiB: L40S, RTX 4090; consumer Ampere is the same). The full table for every
shipped configuration: bench/kernel_resources.py."""

import pytest

from swiftstep.attention_kernels import targets
from swiftstep.attention_kernels.attention import FP8_CAPABILITY

pytestmark = pytest.mark.skipif(bool(targets.available()), reason=f"no NVIDIA compiler: {targets.available()}")

WORST_CASES = [  # (kind, dtype, head dim, keys): the largest tiles of each default_config branch
    ("single", "float32", 64, 4096), ("single", "float32", 160, 77), ("single", "float32", 160, 4096),
    ("single", "float16", 160, 77), ("single", "bfloat16", 160, 4096), ("single", "float16", 64, 4096),
    ("nasa", "float32", 160, 300), ("nag", "float16", 160, 300),
]
HOPPER = [("single", "float16", 64, 4096, "int8"), ("nasa", "bfloat16", 80, 77, "int8"),
          ("8bit", "float16", 64, 4096, "int8"), ("8bit", "float16", 128, 4096, "e4m3")]
CASES = {
    **{("fits", *c): dict(kind=c[0], dtype=c[1], head_dim=c[2], lk=c[3], arch=89, lq=1000, mask=True)
       for c in WORST_CASES},
    **{("hopper", *c): dict(kind=c[0], dtype=c[1], head_dim=c[2], lk=c[3], arch=90, lq=1000, qk_format=c[4])
       for c in HOPPER},
    ("ada-8bit",): dict(kind="8bit", dtype="float16", head_dim=64, lk=4096, arch=89),
    ("ampere-8bit",): dict(kind="8bit", dtype="float16", head_dim=64, lk=256, arch=80),
}


@pytest.fixture(scope="module")
def results():
    """Every case compiled in one fresh process (the tests themselves import the kernels under the interpreter)."""
    return dict(zip(CASES, targets.check_in_subprocess(list(CASES.values()))))


def ok(result):
    assert "error" not in result, result.get("error")
    return result


@pytest.mark.parametrize("case", WORST_CASES, ids=[f"{k}-{d}-d{h}-lk{n}" for k, d, h, n in WORST_CASES])
def test_every_config_branch_fits_the_smallest_gpu(results, case):
    r = ok(results[("fits", *case)])
    assert r["problems"] == [] and r["blocks_per_sm"] >= 1


@pytest.mark.parametrize("case", HOPPER, ids=[f"{k}-{d}-d{h}-{f}" for k, d, h, _, f in HOPPER])
def test_hopper_builds_use_warpgroup_mmas(results, case):
    """On sm90 the fp16/bf16 kernels must run on wgmma (HGMMA), the 8-bit one on IGMMA (int8 Q·Kᵀ) and QGMMA
    (e4m3 P·V, the reason V is stored channel-major): an mma.sync fallback would compile and silently be slow."""
    r = ok(results[("hopper", *case)])
    assert r["expected_mma"] and r["problems"] == []
    assert not {"HMMA", "IMMA", "QMMA"} & set(r["report"]["mma"])


def test_ada_8bit_build_uses_int8_and_e4m3_mmas(results):
    r = ok(results[("ada-8bit",)])
    assert r["expected_mma"] == ["IMMA", "QMMA"] and r["problems"] == []


def test_the_8bit_dispatch_threshold_is_where_e4m3_compiles(results):
    """`attention_8bit` runs the kernel from sm89 (FP8_CAPABILITY) on: sm80 has no e4m3 and must not get it."""
    assert FP8_CAPABILITY == (8, 9)
    assert "fp8e4nv not supported" in results[("ampere-8bit",)]["error"]


def test_a_kernel_that_does_not_fit_is_reported():
    """The check can fail: the pre-fix fp32 tiles (128×64, 3 stages) need 128 KiB of shared memory on sm89."""
    report = targets.KernelReport("k", 89, 8, 255, 0, 131072, {}, ())
    assert report.problems() == ["needs 131072 B shared memory per block; L40S / RTX 4090 allows 101376"]
    assert targets.KernelReport("k", 90, 4, 255, 64, 1024, {"HMMA": 4}, ()).problems(("HGMMA",)) == [
        "spills 64 B per thread to local memory (255 registers)", "no HGMMA instructions (found {'HMMA': 4})"]
