#!/usr/bin/env bash
# Builds what the GPU check needs and packs it into .gpu/ (ignored by git), to be carried to a
# GPU machine that has torch 2.11.0 in its python3 but no Rust toolchain and no network:
# the release `kiln` binary, the pinned nats-server, and the TorchScript fixture models.
# Then, there: `bash scripts/gpu_run.sh` (the device tool: carry .gpu).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
cargo build --release --bin kiln
rm -rf .gpu && mkdir -p .gpu/models
cp target/release/kiln .gpu/kiln
cp "$(command -v nats-server)" .gpu/nats-server
cp examples/models/out/*.pt examples/models/out/manifest.json .gpu/models/
du -sh .gpu
