#!/usr/bin/env bash
# Downloads the sdists that scripts/gpu_tier.sh builds on the GPU machine (which has no network) into
# vendor/gpu_sdists/ (git-ignored; about 250 KB). Run on a machine with PyPI and torch installed (the sdists'
# metadata step imports torch), e.g. this repo's .venv:  scripts/fetch_gpu_sdists.sh [python]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${1:-.venv/bin/python}
mkdir -p vendor/gpu_sdists
MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE \
  "$PYTHON" -m pip download --no-deps --no-binary :all: --no-build-isolation \
  mamba-ssm==2.3.2.post1 causal-conv1d==1.7.0 -d vendor/gpu_sdists
ls -l vendor/gpu_sdists
