#!/usr/bin/env bash
# Everything a lent GPU session owes, in ≤ 10 minutes on one H100/H200 (the device tool's per-call limit), as ONE
# command:  run(command="bash bench/gpu_session.sh", carry=[".whl"], timeout_s=600)
# Correctness first (the CUDA-only tests), then every benchmark at a size chosen to fit its time slot. Each stage
# runs under its own timeout, cut further to what is left of the whole budget, so a slow stage costs its slot and
# never the rest; a stage that runs out is recorded as such. All tables go to ONE markdown file,
# $OUT/gpu_session.md (or the path given as $1), ready to paste into bench/RESULTS.md with its header (date, GPU,
# versions, command). The device image has torch and triton but not diffusers or PyAV: `bash bench/gpu_wheels.sh`
# here first puts their wheels in .whl/ (git-ignored), which `carry` sends along.
set -uo pipefail
cd "$(dirname "$0")/.."
BUDGET=${SWIFTSTEP_GPU_BUDGET:-560}   # seconds for everything below; the device call allows 600
REPORT=${1:-${OUT:-/tmp}/gpu_session.md}
START=$SECONDS
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
mkdir -p /tmp/swiftstep-src && ln -sfn "$PWD" /tmp/swiftstep-src/swiftstep   # `import swiftstep` = this tree
export PYTHONPATH=/tmp/swiftstep-src${PYTHONPATH:+:$PYTHONPATH}

{
    echo "## GPU session $(date -u +%Y-%m-%d) — $(python3 -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")' 2>&1)"
    echo
    echo "Command: \`bash bench/gpu_session.sh\` (commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'))."
    python3 -c "import torch, triton, diffusers, transformers; print(f'torch {torch.__version__}, CUDA {torch.version.cuda}, triton {triton.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}')" 2>&1
    echo
} > "$REPORT"

# stage NAME CAP_SECONDS COMMAND...: runs with min(CAP, what is left) seconds, appends its output to the report
stage() {
    local name=$1 cap=$2; shift 2
    local left=$((BUDGET - (SECONDS - START)))
    local limit=$((cap < left ? cap : left))
    if ((limit < 15)); then
        printf '### %s\n\nskipped: %d s of the budget left\n\n' "$name" "$left" >> "$REPORT"; return
    fi
    local t0=$SECONDS
    echo ">>> $name (≤ ${limit} s)"
    timeout --kill-after=5 "$limit" "$@" > /tmp/stage.out 2>&1
    local rc=$?
    local status="ok"
    ((rc == 124 || rc == 137)) && status="TIMED OUT at ${limit} s (partial output)"
    ((rc != 0 && rc != 124 && rc != 137)) && status="FAILED (exit $rc)"
    tail -n 60 /tmp/stage.out
    { printf '### %s — %s, %d s\n\n```\n' "$name" "$status" "$((SECONDS - t0))"; tail -n 80 /tmp/stage.out; printf '\n```\n\n'; } >> "$REPORT"
}

stage "CUDA tests" 170 python3 -m pytest -q -x -p no:cacheprovider tests/attention_kernels tests/core/test_head_graph.py \
    tests/core/test_cuda_graphs.py tests/pipelines/test_attention_processor.py tests/pipelines/test_fast_path.py
stage "attention kernels, fp16" 50 python3 bench/attention.py --device cuda --dtype float16
stage "attention kernels, bf16" 35 python3 bench/attention.py --device cuda --dtype bfloat16
stage "one-step latency" 60 python3 bench/onestep.py --size full --device cuda --dtype float16 --repeats 5
stage "fast path" 60 python3 bench/fast_path.py --size full --device cuda --dtype float16 --families sd2 --repeats 5
stage "NASA/NAG overhead" 40 python3 bench/nasa.py --size full --device cuda --dtype float16 --repeats 5
stage "shared-key dual attention (FLUX shapes)" 40 python3 bench/prefix_dual_attention.py --device cuda --dtype bfloat16
stage "one-step SR" 45 python3 bench/sr.py --size full --device cuda --dtype float16 --repeats 3
stage "video SR" 50 python3 bench/video_sr.py --size full --device cuda --dtype float16 --frames 9 --side 256 --repeats 1
stage "MAR + DiSA" 45 python3 bench/mar.py --size full --device cuda --batch 16 --repeats 2

echo "total $((SECONDS - START)) s of ${BUDGET} s" >> "$REPORT"
echo "report: $REPORT"
