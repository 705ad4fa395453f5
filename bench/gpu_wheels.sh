#!/usr/bin/env bash
# Here, before a lent GPU session: the wheels the device image lacks (it has torch, triton, transformers, peft,
# accelerate, safetensors; not diffusers or PyAV), for its Python 3.12 on x86-64, into .whl/ (in .gitignore).
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "diffusers==$(python3 -c 'import diffusers; print(diffusers.__version__)')" av importlib_metadata zipp
ls -la .whl
