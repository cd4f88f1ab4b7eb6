# Sourced by the other scripts: puts the pinned tools from scripts/setup.sh first on PATH.
KILN_CACHE="${KILN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln}"
export KILN_CACHE
# splat-transform (the image-to-splat pipeline's compressor) comes from the npm cache.
export PATH="$KILN_CACHE/venv/bin:$KILN_CACHE/npm/node_modules/.bin:$PATH"
# Tests and `kiln up` find the server here (they also look on PATH).
export KILN_NATS_SERVER="$KILN_CACHE/venv/bin/nats-server"
export KILN_PYTHON="$KILN_CACHE/venv/bin/python"
# The browser tests: Debian's chromium (the binary itself, not the /usr/bin/chromium wrapper
# script) driven by puppeteer-core from the npm cache (tests/browser/*.mjs load it from here).
export KILN_CHROMIUM="${KILN_CHROMIUM:-/usr/lib/chromium/chromium}"
export KILN_NODE_MODULES="$KILN_CACHE/npm/node_modules"
# tch builds against the pinned torch in the venv (LIBTORCH_USE_PYTORCH: it asks that
# python for the paths); build/torch_link.rs puts its lib/ in every binary's rpath.
export LIBTORCH_USE_PYTORCH=1
for _kiln_torch_lib in "$KILN_CACHE"/venv/lib/python3*/site-packages/torch/lib; do
  [ -d "$_kiln_torch_lib" ] && export KILN_TORCH_LIB="$_kiln_torch_lib"
done
unset _kiln_torch_lib
# A fresh clone builds once: incremental state (5.5 GB of the test build) serves no later build.
if [ "${CI:-}" = true ]; then
  export CARGO_INCREMENTAL=0
fi
