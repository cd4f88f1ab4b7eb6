#!/usr/bin/env bash
# Runs the demo: installs the pinned tools if needed, then `kiln demo` (a local cluster with
# an embedded nats-server, real jobs through it). Extra arguments go to `kiln demo`.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
# shellcheck source=scripts/env.sh
source scripts/env.sh

exec cargo run --release --bin kiln -- demo "$@"
