#!/usr/bin/env bash
# Runs Kiln's TorchScript path on a GPU machine from the bundle of scripts/gpu_bundle.sh: no
# Rust, no network; libtorch is taken from that machine's python3 torch. Prints whether CUDA was
# used, per-job latency, and throughput with and without batching. Without CUDA it runs the
# same on cpu:0 and says so.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .gpu/kiln ] || { echo "gpu_run: no .gpu bundle; run scripts/gpu_bundle.sh on the build machine" >&2; exit 1; }
torch_lib=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export KILN_NATS_SERVER="$PWD/.gpu/nats-server"
cuda=$(python3 -c 'import torch; print("yes" if torch.cuda.is_available() else "no")')
echo "gpu_run: torch $(python3 -c 'import torch; print(torch.__version__)') at $torch_lib; CUDA available to python: $cuda"
if [ "$cuda" = yes ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  slot=cuda:0
else
  slot=cpu:0
fi
echo "gpu_run: libtorch_cuda linked: $(ldd .gpu/kiln | grep -c libtorch_cuda.so) (1 = yes)"
.gpu/kiln bench --torchscript --slot "$slot" --model-file .gpu/models/affine.pt --jobs "${JOBS:-2000}" --concurrency "${CONCURRENCY:-32}" --max-batch "${MAX_BATCH:-16}" --json "${OUT:-/tmp}/kiln-gpu-bench.json"
