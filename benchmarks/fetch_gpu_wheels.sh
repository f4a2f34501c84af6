#!/usr/bin/env bash
# Download, into .whl/, the wheels that a GPU machine without network access lacks.
#
# The lent H100/H200 machines run an image with Python 3.12, torch, transformers, einops,
# jaxtyping, tiktoken, safetensors, matplotlib and pytest, and reach no package registry.
# What this project imports beyond that (TransformerLens, datasets and their pure-Python
# dependencies, beartype for the jaxtyping test hook) is fetched here, online, at the versions
# in .venv, and installed there without dependency resolution:
#
#   bash benchmarks/fetch_gpu_wheels.sh
#   # on the GPU machine, with .whl carried along (installs them, then tests and benchmarks):
#   bash benchmarks/gpu_session.sh tests   # (or sampling, profile, training)
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES="transformer_lens datasets dill multiprocess beartype fancy_einsum typeguard sniffio"
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"
PLATFORM="${PLATFORM:-manylinux2014_x86_64}"

pins=$(.venv/bin/python - "$PACKAGES" <<'PY'
import sys
from importlib.metadata import version

print(" ".join(f"{name}=={version(name)}" for name in sys.argv[1].split()))
PY
)
rm -rf .whl
.venv/bin/python -m pip download --quiet --no-deps --only-binary=:all: \
    --python-version "$PYTHON_VERSION" --platform "$PLATFORM" --dest .whl $pins
echo "==> $(ls .whl | wc -l) wheels in .whl ($(du -sh .whl | cut -f1)): $pins"
