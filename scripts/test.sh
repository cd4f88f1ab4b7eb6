#!/usr/bin/env bash
# The single entry point for checks, the same one CI runs (.ci/run):
#   formatting, no import cycle between the files of a crate, clippy with warnings as errors
#   (the default build, then the slim one without libtorch), then every test of the workspace.
# Extra arguments go to `cargo test` (e.g. `scripts/test.sh -- --nocapture`, or a test name).
set -euo pipefail
cd "$(dirname "$0")/.."

step() {
  printf '\n==== %s ====\n' "$*"
}

step "setup: pinned nats-server and nats-py (scripts/setup.sh)"
bash scripts/setup.sh
# shellcheck source=scripts/env.sh
source scripts/env.sh

step "cargo fmt --all -- --check"
cargo fmt --all -- --check

step "import cycles between the files of each crate (scripts/import_cycles.py)"
python3 scripts/import_cycles_test.py
python3 scripts/import_cycles.py .

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "the slim build, without the engines (no libtorch): cargo clippy --no-default-features"
cargo clippy -p kiln-contract -p kiln-client -p kiln-core -p kiln-actors -p kiln-tools -p kiln --no-default-features --lib --bins -- -D warnings

step "cargo test --workspace $*"
cargo test --workspace "$@"

step "all checks passed"
