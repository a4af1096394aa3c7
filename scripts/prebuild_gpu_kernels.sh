#!/usr/bin/env bash
# Compiles the CUDA sources of the two reference sdists (mamba_ssm's selective scan, causal_conv1d) to object
# files for ONE GPU architecture on a machine that has nvcc but no GPU, so that the GPU machine, whose time is
# short, only compiles the two small C++ binding files against its own torch and links (scripts/gpu_tier.sh
# does that first and falls back to a full source build when the link or the import fails):
#
#     scripts/prebuild_gpu_kernels.sh [SM] [JOBS]      # SM default 90 (H100/H200), JOBS default nproc
#
# EXTENSIONS (default "causal_conv1d_cuda") picks what to compile: "selective_scan_cuda causal_conv1d_cuda" for
# both (too large to carry together, below). On this project's 2-core build machine the scan's 9 objects took
# about 12 minutes when first built (2 at a time; 19 minutes with causal_conv1d's 3), 3 min 55 s on 2026-12-01;
# on 2026-12-01 (a loaded machine), causal_conv1d_bwd.cu alone 837 s, its fwd 20 s, its update 7 s, the scan's
# selective_scan_bwd_bf16_real.cu 159 s.
#
# Reads vendor/gpu_sdists/ (scripts/fetch_gpu_sdists.sh), writes vendor/gpu_prebuilt/sm_SM/ (git-ignored):
# NAME/*.o per extension plus build.txt (nvcc version, flags, date). The flags are the sdists' own setup.py
# flags (-O3, --use_fast_math, the -U__CUDA_NO_*__ set, ...) after torch.utils.cpp_extension's defaults,
# with -gencode restricted to sm_SM. The .cu files include only header-only parts of torch (c10 Half/BFloat16,
# CUDAException.h's check macro, ATen's Atomic.cuh), so objects compiled against this venv's torch headers link
# against the GPU machine's torch; the .cpp files (pybind11, at::Tensor) are compiled there, against its torch.
#
# Sizes for sm_90: selective_scan_cuda's 9 objects 40 MB, causal_conv1d_cuda's 3 objects 30 MB (its backward alone
# 24 MB, and fatbins do not compress: xz leaves 21 of its 24 MB). The device tool carries 64 MiB in all, so one
# extension is carried and gpu_tier.sh builds the other from its sdist while the first links. The default carries
# causal_conv1d: its backward is one translation unit, about 5 times the scan's largest, that no MAX_JOBS splits,
# while the scan's 9 files compile side by side on the GPU machine's 16 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
SM=${1:-90}
JOBS=${2:-$(nproc)}
# checked before anything is unpacked or compiled: xargs -P 0 would start every nvcc at once
if ! [[ $SM =~ ^[1-9][0-9]*$ ]]; then
  echo "error: SM: expected a compute capability without its dot (90 for 9.0), got '$SM'" >&2; exit 2; fi
if ! [[ $JOBS =~ ^[1-9][0-9]*$ ]]; then
  echo "error: JOBS: expected a positive integer (nvcc processes at once), got '$JOBS'" >&2; exit 2; fi
PYTHON=${PYTHON:-.venv/bin/python}
NVCC=${NVCC:-nvcc}
OUTDIR=$PWD/vendor/gpu_prebuilt/sm_$SM
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
tar xzf vendor/gpu_sdists/mamba_ssm-2.3.2.post1.tar.gz -C "$WORK"
tar xzf vendor/gpu_sdists/causal_conv1d-1.7.0.tar.gz -C "$WORK"
TORCH_INC=$("$PYTHON" -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))")
# A CPU build of torch ships c10/cuda's headers but not the one its CMake generates for CUDA builds; its content
# there is the shared-library switch alone.
mkdir -p "$WORK/shim/c10/cuda/impl"
echo '#define C10_CUDA_BUILD_SHARED_LIBS' >"$WORK/shim/c10/cuda/impl/cuda_cmake_macros.h"
TORCH_INC="$TORCH_INC -I$WORK/shim"
CXX11_ABI=$("$PYTHON" -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")
# torch.utils.cpp_extension's nvcc defaults, then the sdists' own nvcc flags (identical in both setup.py files,
# except that mamba_ssm adds -std=c++17, which nvcc 12+ uses by default anyway).
COMMON="-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
 -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr --compiler-options=-fPIC -DTORCH_API_INCLUDE_EXTENSION_H
 -D_GLIBCXX_USE_CXX11_ABI=$CXX11_ABI -O3 -std=c++17 -U__CUDA_NO_HALF_OPERATORS__ -U__CUDA_NO_HALF_CONVERSIONS__
 -U__CUDA_NO_BFLOAT16_OPERATORS__ -U__CUDA_NO_BFLOAT16_CONVERSIONS__ -U__CUDA_NO_BFLOAT162_OPERATORS__
 -U__CUDA_NO_BFLOAT162_CONVERSIONS__ --expt-extended-lambda --use_fast_math -lineinfo
 -gencode=arch=compute_$SM,code=sm_$SM"
EXTENSIONS=${EXTENSIONS:-causal_conv1d_cuda}
jobs=()
for ext in $EXTENSIONS; do
  case $ext in
    selective_scan_cuda) for src in "$WORK"/mamba_ssm-*/csrc/selective_scan/*.cu; do jobs+=("$ext $src"); done ;;
    causal_conv1d_cuda) for src in "$WORK"/causal_conv1d-*/csrc/*.cu; do jobs+=("$ext $src"); done ;;
    *) echo "EXTENSIONS: expected selective_scan_cuda and/or causal_conv1d_cuda, got '$ext'" >&2; exit 2 ;;
  esac
done
rm -rf "$OUTDIR" && mkdir -p "$OUTDIR"
compile() {  # compile EXT SRC
  local ext=$1 src=$2 obj
  obj=$OUTDIR/$ext/$(basename "${src%.cu}").o
  mkdir -p "$OUTDIR/$ext"
  # shellcheck disable=SC2086
  "$NVCC" $COMMON -DTORCH_EXTENSION_NAME="$ext" -I"$(dirname "$src")" $TORCH_INC -c "$src" -o "$obj" \
    && echo "compiled $(basename "$src") -> $ext/$(basename "$obj")"
}
export -f compile
export OUTDIR COMMON TORCH_INC NVCC WORK
printf '%s\n' "${jobs[@]}" | xargs -P "$JOBS" -L 1 bash -c 'compile $0 $1'
{
  echo "date: $(date -u +%FT%TZ)"
  echo "nvcc: $("$NVCC" --version | tail -1)"
  echo "torch headers: $("$PYTHON" -c 'import torch; print(torch.__version__)')"
  echo "flags: $(echo $COMMON)"
  echo "sdists: $(cd vendor/gpu_sdists && sha256sum ./*.tar.gz | tr '\n' ' ')"
} >"$OUTDIR/build.txt"
n=$(find "$OUTDIR" -name '*.o' | wc -l)
echo "$n object files in $OUTDIR (expected ${#jobs[@]})"
size=$(du -sb vendor | cut -f1)
if [ "$size" -gt $((60 << 20)) ]; then
  echo "warning: vendor/ holds $((size >> 20)) MiB; with the repository and .whl/ it must fit the device tool's" \
    "64 MiB carry (remove vendor/gpu_prebuilt/ folders of other architectures)" >&2; fi
[ "$n" -eq "${#jobs[@]}" ]
