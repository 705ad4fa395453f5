#!/usr/bin/env bash
# Everything a lent GPU session owes, in one run (device tool: `run` with `bash bench/gpu_session.sh`).
# Installs the package, runs the kernel and CUDA tests on the GPU, then every benchmark; prints all tables.
# Copy the output into bench/RESULTS.md with the date, the GPU and the versions it prints.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[test]"
python -c "import torch, triton, diffusers; print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__, torch.cuda.get_device_name())"
python -m pytest -q tests/attention_kernels tests/core/test_head_graph.py tests/core/test_cuda_graphs.py tests/pipelines/test_attention_processor.py tests/pipelines/test_pipeline_one_step.py tests/pipelines/test_fast_path.py tests/pipelines/test_pipeline_mar.py tests/models/test_dloral.py -k "not live"
for dtype in float16 bfloat16; do python bench/attention.py --device cuda --dtype "$dtype"; done
python bench/onestep.py --size full --device cuda --dtype float16
python bench/nasa.py --size full --device cuda --dtype float16
python bench/sr.py --size full --device cuda --dtype float16
python bench/video_sr.py --size full --device cuda --dtype float16
python bench/mar.py --size full --device cuda --batch 64
python bench/fast_path.py --size full --device cuda --dtype float16
