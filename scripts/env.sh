# Sourced by the other scripts: puts the pinned tools from scripts/setup.sh first on PATH.
KILN_CACHE="${KILN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln}"
export KILN_CACHE
export PATH="$KILN_CACHE/venv/bin:$PATH"
# Tests and `kiln up` find the server here (they also look on PATH).
export KILN_NATS_SERVER="$KILN_CACHE/venv/bin/nats-server"
export KILN_PYTHON="$KILN_CACHE/venv/bin/python"
