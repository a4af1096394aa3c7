#!/usr/bin/env bash
# The GPU tier in one command, on a CUDA machine without network (e.g. the device tool's nvidia-h200):
#
#     GPU_TIER_SECONDS=578 bash scripts/gpu_tier.sh [RESULTS_DIR]     # docs/GPU.md: the device call
#
# Brought along (all git-ignored): vendor/gpu_sdists/ (scripts/fetch_gpu_sdists.sh: mamba_ssm-2.3.2.post1 and
# causal_conv1d-1.7.0 sdists), optionally vendor/gpu_prebuilt/sm_XX/ (scripts/prebuild_gpu_kernels.sh: their CUDA
# sources compiled for this GPU's architecture on a machine with nvcc), optionally .whl/*.whl (pure-Python wheels
# of this project's dependencies that the machine's image lacks or has too old: tensorboardX, flax), installed
# with --no-deps into /tmp/site ahead of the image's packages. RESULTS_DIR defaults to results/gpu;
# where $OUT is set (the device tool), RESULTS_DIR is packed into $OUT/gpu_tier.tar.gz at the end.
#
# The kernels are installed in the background while the JAX-only steps run: an extension with prebuilt objects
# has only its C++ binding compiled here (torch.utils.cpp_extension, against this machine's torch) and linked
# with them; one without them, or whose link fails, is built from its sdist for this GPU only (the setup.py
# -gencode list rewritten to the one nvidia-smi reports). Then, in order of what matters most:
#   1. the Pallas kernels compiled for the GPU vs the float64 oracle (tests/test_pallas_scan.py, test_golden.py);
#   2. the live tier (tests/test_gpu_live.py, pytest -m gpu) against mamba_ssm / causal_conv1d / transformers;
#   3. CUDA goldens recorded into tests/golden/cuda/ (copied to RESULTS_DIR/golden_cuda/) and checked;
#   4. experiments/bench/gpu_scan.py (7B layer shapes, ratios against mamba_ssm, Pallas tuning sweep) and
#      experiments/bench/gpu_layer.py (a whole 7B-shaped mixer layer against transformers + mamba_ssm);
#   5. training step benchmarks (issue 5) and 7B long-context, as far as the time allows.
# GPU_TIER_SECONDS (default 3600) is the whole run's budget: 15 s are kept for the end, each step's timeout is cut
# to what is left of the rest, a step that would get less than 20 s is skipped, and the results are packed before
# the budget ends. Every step logs to RESULTS_DIR/NAME.log; steps after a failed one still run; the exit code is
# the number of failed steps.
# Before anything is written or started, a GPU_TIER_SECONDS that is not a positive integer and a machine where
# nvidia-smi is missing or reports no GPU end the script with one "error: ..." line and exit code 64.
set -uo pipefail
BUDGET=${GPU_TIER_SECONDS:-3600}
if ! [[ $BUDGET =~ ^[1-9][0-9]*$ ]]; then
  echo "error: GPU_TIER_SECONDS: expected a positive integer (seconds), got '$BUDGET'" >&2; exit 64; fi
if ! command -v nvidia-smi >/dev/null; then
  echo "error: nvidia-smi: expected on PATH (this script runs on a CUDA machine), got none" >&2; exit 64; fi
SMI=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>&1 | head -1)
CC=${SMI// /}
if ! [[ $CC =~ ^[0-9]+\.[0-9]+$ ]]; then
  echo "error: nvidia-smi --query-gpu=compute_cap: expected a GPU's compute capability (9.0), got '$SMI'" >&2
  exit 64; fi
ARCH=${CC/./}
cd "$(dirname "$0")/.."
START=$SECONDS
RESULTS=$(realpath -m "${1:-results/gpu}")
mkdir -p "$RESULTS"
PYTHON=${PYTHON:-python3}
SITE=/tmp/site
mkdir -p "$SITE"
export PYTHONPATH=$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX and torch share the GPU in the live tests
failed=0
left() { echo $((BUDGET - (SECONDS - START))); }
step() {  # step NAME LIMIT_SECONDS COMMAND...: runs COMMAND with a timeout, logging to RESULTS/NAME.log
  local name=$1 limit=$2 t0=$SECONDS; shift 2
  local remaining=$(($(left) - 15))
  if [ "$remaining" -lt 20 ]; then echo "== $name: skipped (${remaining}s left)"; echo skipped >"$RESULTS/$name.log"; return; fi
  [ "$limit" -gt "$remaining" ] && limit=$remaining
  echo "== $name (limit ${limit}s): $*"
  if timeout -k 10 "$limit" "$@" >"$RESULTS/$name.log" 2>&1; then echo "   ok ($((SECONDS - t0))s)"
  else echo "   FAILED ($((SECONDS - t0))s, see $name.log)"; tail -15 "$RESULTS/$name.log"; echo; failed=$((failed + 1)); fi
}

# Carried wheels fill in what the image lacks (tensorboardX); a carried flax is used only where the image's flax
# is older than the 0.12 this project is tested with (a newer one matches the image's newer jax better).
for wheel in .whl/*.whl; do
  [ -e "$wheel" ] || continue
  case $(basename "$wheel") in
    flax-*) "$PYTHON" -c "import flax, sys; sys.exit(tuple(map(int, flax.__version__.split('.')[:2])) < (0, 12))" \
              2>/dev/null && continue ;;
  esac
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$wheel"
done
PACKAGES="jax|jaxlib|jax-cuda[0-9]+-(plugin|pjrt)|flax|optax|orbax-checkpoint|torch|transformers|triton|numpy|einops"
{ nvidia-smi; nvcc --version; "$PYTHON" -m pip list 2>/dev/null | grep -iE "^($PACKAGES) ";
  "$PYTHON" -c "import torch, jax; print('torch', torch.__version__, torch.version.cuda); print('jax', jax.__version__, jax.devices())"; } >"$RESULTS/environment.log" 2>&1
echo "GPU compute capability $CC (sm_$ARCH); results in $RESULTS"

# ---- kernels, in the background -------------------------------------------------------------------------
SDISTS=$PWD/vendor/gpu_sdists
PREBUILT=$PWD/vendor/gpu_prebuilt/sm_$ARCH
link_prebuilt() {  # link_prebuilt SDIST EXT CPP: the sdist's Python package, its binding CPP compiled and linked
  local work src objs
  objs=$(ls "$PREBUILT/$2"/*.o 2>/dev/null) || { echo "no objects in $PREBUILT/$2"; return 1; }
  work=$(mktemp -d) && tar xzf "$1" -C "$work" && src=$(echo "$work"/*) || return 1
  MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE \
    "$PYTHON" -m pip install -q --no-deps --no-build-isolation --no-index --target "$SITE" "$src" || return 1
  # shellcheck disable=SC2086
  "$PYTHON" - "$2" "$src/$3" "$work/build" "$SITE" $objs <<'EOF' || return 1
import os, shutil, sys
from torch.utils.cpp_extension import load
ext, cpp, build, site, objs = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
os.makedirs(build, exist_ok=True)
load(name=ext, sources=[cpp], extra_include_paths=[os.path.dirname(cpp)], extra_cflags=["-O3", "-std=c++17"],
     extra_ldflags=objs, with_cuda=True, build_directory=build, verbose=True)
shutil.copy(os.path.join(build, ext + ".so"), os.path.join(site, ext + ".so"))
EOF
}
build_sdist() {  # build_sdist SDIST: unpack, restrict -gencode to sm_ARCH, pip install without network
  local work; work=$(mktemp -d)
  tar xzf "$1" -C "$work" && cd "$work"/* || return 1
  sed -i -E "s/arch=compute_[0-9]+a?,code=sm_[0-9]+a?/arch=compute_$ARCH,code=sm_$ARCH/" setup.py
  TORCH_CUDA_ARCH_LIST=$CC MAX_JOBS=${MAX_JOBS:-12} MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE \
    "$PYTHON" -m pip install --no-deps --no-build-isolation --no-index --target "$SITE" -v .
}
kernels_import() {  # torch first: the extensions find libc10.so through the torch already loaded (no RPATH)
  "$PYTHON" -c "import torch, selective_scan_cuda, causal_conv1d_cuda, mamba_ssm, causal_conv1d; print('mamba_ssm', mamba_ssm.__version__, 'causal_conv1d', causal_conv1d.__version__, mamba_ssm.__file__)"
}
install_one() {  # install_one SDIST EXT CPP: link carried objects where there are any, else build from source
  if [ -d "$PREBUILT/$2" ] && link_prebuilt "$@"; then echo "KERNELS: $2 linked from prebuilt objects"; return 0; fi
  echo "KERNELS: $2 has no prebuilt objects or their link failed; building its sdist for sm_$ARCH"
  (build_sdist "$1") && echo "KERNELS: $2 built from source"
}
install_kernels() {  # both extensions at once: a from-source build of one overlaps the link of the other
  local t0=$SECONDS pid rc=0
  install_one "$SDISTS/causal_conv1d-1.7.0.tar.gz" causal_conv1d_cuda csrc/causal_conv1d.cpp & pid=$!
  install_one "$SDISTS/mamba_ssm-2.3.2.post1.tar.gz" selective_scan_cuda csrc/selective_scan/selective_scan.cpp || rc=1
  wait "$pid" || rc=1
  [ "$rc" = 0 ] && kernels_import && echo "KERNELS: ready after $((SECONDS - t0))s"
}
kill_tree() {  # kill_tree PID: the process and its descendants (pip, nvcc), which `kill PID` would leave running
  local child; for child in $(pgrep -P "$1"); do kill_tree "$child"; done; kill "$1" 2>/dev/null
}
install_kernels >"$RESULTS/install_kernels.log" 2>&1 &
KERNELS_PID=$!

# ---- 1. JAX alone: the Pallas kernels compiled for this GPU ------------------------------------------------
# (the TPU kernels' interpreter tests and the CPU-only shard_map subprocesses are tier 1's, not run here; of the
# torch_ref goldens, whose every case checks gradients, only the Triton kernel's: the XLA impls' are tier 1's).
# About 100 tests, side by side with the kernels' build (1-3 minutes, estimated); -v names each test as it ends,
# so that a step cut at its limit still says which passed
step tests_pallas_on_gpu 180 "$PYTHON" -m pytest -v -p no:cacheprovider tests/test_pallas_scan.py tests/test_golden.py \
  -k "not mosaic_tpu and not pallas_tpu and not shard_map and not under_a_mesh and (not torch_ref or pallas)"

# ---- kernels ready? ---------------------------------------------------------------------------------------
t0=$SECONDS
while kill -0 "$KERNELS_PID" 2>/dev/null && [ "$(left)" -gt 60 ]; do sleep 2; done
if kill -0 "$KERNELS_PID" 2>/dev/null; then
  echo "== kernels: still building with $(left)s left; stopped"; kill_tree "$KERNELS_PID"; failed=$((failed + 1))
elif wait "$KERNELS_PID"; then echo "== kernels: waited $((SECONDS - t0))s; $(grep KERNELS: "$RESULTS/install_kernels.log" | tail -1)"
else echo "== kernels: FAILED (install_kernels.log)"; tail -15 "$RESULTS/install_kernels.log"; failed=$((failed + 1)); fi

# ---- 2-3. live tier, CUDA goldens --------------------------------------------------------------------------
# GPU_TIER_STRICT=1: a test whose GPU or kernel is missing fails (a run of skips would pass). The tests in the order
# named (pytest keeps it): the few quick ones first, the scan matrix (24 jitted gradients, Pallas first) last, so
# that a step cut short by its limit loses scan cases, not whole kinds of test.
LIVE=tests/test_gpu_live.py
step tests_gpu_live 200 env GPU_TIER_STRICT=1 "$PYTHON" -m pytest -v -m gpu -p no:cacheprovider --durations=0 \
  $LIVE::test_state_update_matches_mamba_ssm_triton $LIVE::test_causal_conv1d_matches_cuda \
  $LIVE::test_model_on_gpu_matches_cpu $LIVE::test_falcon_mamba_matches_transformers_on_cuda_kernels \
  $LIVE::test_scan_matches_mamba_ssm
step record_goldens_cuda 60 "$PYTHON" scripts/record_goldens.py cuda
mkdir -p "$RESULTS/golden_cuda" && cp tests/golden/cuda/* "$RESULTS/golden_cuda/" 2>/dev/null
step tests_golden_cuda 60 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_golden.py -k "cuda and not pallas_tpu"

# ---- 4. scan benchmark at 7B layer shapes ------------------------------------------------------------------
step bench_gpu_scan 180 "$PYTHON" -m experiments.bench.gpu_scan --out "$RESULTS" --lengths ${SCAN_LENGTHS:-2048 8192} \
  --batches ${SCAN_BATCHES:-1 4} --sweep

step bench_gpu_layer 150 "$PYTHON" -m experiments.bench.gpu_layer falcon_mamba_7b --lengths 2048 8192 --batches 1 4 \
  --out "$RESULTS"

# ---- 5. training steps (issue 5), long context (issue 4) ---------------------------------------------------
# H100/H200 dense bf16 peak: 989 TFLOP/s. The 8-layer 7B-shaped Falcon Mamba, also in PyTorch with mamba_ssm's
# kernels (goal: JAX within 1.5x).
step bench_train_falcon_mamba_vs_torch 120 "$PYTHON" -m experiments.bench.torch_train_step falcon_mamba_7b \
  model.num_hidden_layers=8 data.batch_size=1 data.seq_len=2048 --steps 5 --bf16
step bench_train_falcon_mamba_7b_8_layers 90 "$PYTHON" -m experiments.bench.train_throughput falcon_mamba_7b \
  model.num_hidden_layers=8 model.scan_impl=chunked data.batch_size=1 data.seq_len=2048 --steps 5 --peak-tflops 989
step bench_train_falcon_mamba_7b_8_layers_pallas 90 "$PYTHON" -m experiments.bench.train_throughput falcon_mamba_7b \
  model.num_hidden_layers=8 model.scan_impl=pallas data.batch_size=1 data.seq_len=2048 --steps 5 --peak-tflops 989
step bench_train_falcon_1b 90 "$PYTHON" -m experiments.bench.train_throughput falcon_rw_1b data.batch_size=2 \
  data.seq_len=2048 --steps 5 --peak-tflops 989
step bench_long_context_7b 1200 "$PYTHON" -m experiments.bench.long_context --mamba-preset falcon_mamba_7b \
  --falcon-preset falcon_7b --min-log2 14 --max-log2 20 --falcon-max-log2 16 --generate-max-log2 12 \
  --out "$RESULTS/long_context_7b"

for log in tests_pallas_on_gpu tests_gpu_live tests_golden_cuda; do
  echo "-- $log: $(grep -E "passed|failed|error" "$RESULTS/$log.log" 2>/dev/null | tail -1)"; done
sed -n '/^copy bandwidth/,$p' "$RESULTS/bench_gpu_scan.log" 2>/dev/null
sed -n '/^ *impl batch/,$p' "$RESULTS/bench_gpu_layer.log" 2>/dev/null
echo "failed steps: $failed; $((SECONDS - START))s" | tee "$RESULTS/summary.txt"
if [ -n "${OUT:-}" ]; then tar czf "$OUT/gpu_tier.tar.gz" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")"; fi
exit $failed
