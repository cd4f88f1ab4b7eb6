#!/usr/bin/env bash
# Builds Kiln's container images from deploy/docker/*.Dockerfile:
#   kiln:<version> (and kiln:latest): gateway, CLI and a process-engine node, no libtorch, with
#     the pinned nats-server, python3 and the worker SDK;
#   with --torch, kiln-node-torch:<version> (and :latest): a node with the TorchScript engine
#     and libtorch's lib/ from the pinned torch wheel (GBs, a long release build).
#
#   scripts/images.sh [--base IMAGE] [--torch] [--profile release|dev]
#
# --base: the image to build FROM (debian:bookworm-slim, or a CUDA image with glibc >= 2.36 on a
# GPU host, e.g. nvidia/cuda:13.0.1-base-ubuntu24.04; see deploy/README.md). Without it the
# script makes kiln-base:bookworm offline, once (debootstrap from the Debian mirror apt uses,
# then `docker import`), since no container registry need be reachable.
#
# The binaries are built here on the host (`cargo build --release`) and copied in, so the
# images reuse the host's build cache; apt inside `docker build` uses the host's network.
# --profile dev builds them unoptimized instead (then stripped): what the compose test in CI
# uses, since it reuses the suite's dependencies (under a minute instead of a cold release build
# of 13 CPU-minutes). Ship release images.
# Prints each image's size at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

base=""
torch=0
profile=release
while [ $# -gt 0 ]; do
  case "$1" in
    --base) base="${2:?--base needs an image}"; shift 2 ;;
    --base=*) base="${1#--base=}"; shift ;;
    --torch) torch=1; shift ;;
    --profile) profile="${2:?--profile needs release or dev}"; shift 2 ;;
    --profile=*) profile="${1#--profile=}"; shift ;;
    -h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "images.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
done

case "$profile" in
  release) cargo_profile=(--release); out=target/release ;;
  dev) cargo_profile=(); out=target/debug ;;
  *) echo "images.sh: --profile is release or dev, not $profile" >&2; exit 2 ;;
esac

if [ ! -x "$KILN_NATS_SERVER" ] || [ ! -x "$KILN_PYTHON" ]; then
  echo "images.sh: no pinned nats-server or Python under $KILN_CACHE: run scripts/setup.sh first" >&2
  exit 1
fi
if [ "$torch" = 1 ] && [ -z "${KILN_TORCH_LIB:-}" ]; then
  echo "images.sh: --torch needs the pinned torch wheel (scripts/setup.sh)" >&2
  exit 1
fi

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo "${KILN_COMMIT:-unknown}")
mirror="${KILN_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
step() { printf '\n== %s (%s)\n' "$*" "$(date -u +%H:%M:%S)"; }

# The offline base: a minimal Debian bookworm, trimmed as debian:*-slim is (no apt lists, no
# docs or man pages, and dpkg told to skip them in later installs too).
make_base() {
  local dir
  dir=$(mktemp -d /tmp/kiln-base.XXXXXX)
  step "debootstrap --variant=minbase bookworm ($mirror) into $dir"
  debootstrap --variant=minbase bookworm "$dir" "$mirror" > "$dir.log" 2>&1 || { tail -20 "$dir.log"; exit 1; }
  rm -rf "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/*.bin "$dir"/var/cache/apt/archives/*.deb \
    "$dir"/usr/share/doc/* "$dir"/usr/share/man/* "$dir"/usr/share/info/* "$dir"/usr/share/locale/*
  cat > "$dir/etc/dpkg/dpkg.cfg.d/kiln-slim" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
CFG
  echo "deb $mirror bookworm main" > "$dir/etc/apt/sources.list"
  tar -C "$dir" -c . | docker import -c 'CMD ["bash"]' - kiln-base:bookworm > /dev/null
  rm -rf "$dir" "$dir.log"
}

if [ -z "$base" ]; then
  base=kiln-base:bookworm
  if docker image inspect "$base" > /dev/null 2>&1; then
    echo "base: $base (already made; docker rmi it to make it again)"
  else
    make_base
  fi
fi

# The build context: everything the Dockerfiles copy, staged under target/ (ignored by git).
context=target/images/context
rm -rf "$context"
mkdir -p "$context"
stage_common() {
  cp "$KILN_NATS_SERVER" "$context/nats-server"
  cp deploy/docker/cluster.toml "$context/cluster.toml"
  cp examples/workers/demo_worker.py "$context/demo_worker.py"
  # The SDK's wheel, built offline (setuptools from the pinned venv, no build isolation) from a
  # copy, so that the checkout gets no build/ or egg-info.
  cp -r python/kiln-worker "$context/sdk-src"
  rm -rf "$context/sdk-src/tests"
  "$KILN_PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir "$context" "$context/sdk-src"
  rm -rf "$context/sdk-src"
}
# Whether `readelf -d` or `ldd` output (stdin) names a libtorch library (libtorch*, libc10*). It
# matches library names only: a CI run failed when a plain grep for "c10" matched a load address
# in ldd's output (0x...c10...), which ASLR changes on every run.
needs_libtorch() {
  grep -oE '(^|[[:space:]\[/])lib(torch|c10)[A-Za-z0-9_]*\.so' > /dev/null
}
# The check checks itself on the output that fooled the old one, and on a real NEEDED line.
if printf '\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f779c10c000)\n' | needs_libtorch ||
  ! printf ' 0x0000000000000001 (NEEDED)             Shared library: [libc10.so]\n' | needs_libtorch ||
  ! printf '\tlibtorch_cpu.so => /opt/torch/lib/libtorch_cpu.so (0x00007f0000000000)\n' | needs_libtorch; then
  echo "images.sh: needs_libtorch misreads ldd/readelf output" >&2
  exit 1
fi
sizes=()
build_image() { # dockerfile image
  step "docker build $2:$version (FROM $base)"
  docker build --network host -f "$1" --build-arg "BASE=$base" --build-arg "KILN_VERSION=$version" \
    --build-arg "KILN_COMMIT=$commit" -t "$2:$version" -t "$2:latest" "$context"
  sizes+=("$2:$version")
}

step "cargo build ${cargo_profile[*]} -p kiln --no-default-features --bin kiln (the slim binary: no libtorch)"
cargo build "${cargo_profile[@]}" -p kiln --no-default-features --bin kiln
stage_common
cp "$out/kiln" "$context/kiln"
strip "$context/kiln"
if readelf -d "$context/kiln" | needs_libtorch; then
  echo "images.sh: the slim binary links libtorch" >&2
  exit 1
fi
build_image deploy/docker/kiln.Dockerfile kiln
step "ldd /usr/local/bin/kiln inside kiln:$version"
slim_ldd=$(docker run --rm --entrypoint ldd "kiln:$version" /usr/local/bin/kiln)
echo "$slim_ldd"
if needs_libtorch <<< "$slim_ldd"; then
  echo "images.sh: kiln:$version links libtorch" >&2
  exit 1
fi

if [ "$torch" = 1 ]; then
  # The default features: the TorchScript engine, linked against the venv's torch (it replaces
  # the slim target/release/kiln, which was copied above; the dependencies of both builds stay
  # in target/, so switching back only relinks).
  step "cargo build ${cargo_profile[*]} -p kiln --bin kiln (with the TorchScript engine)"
  cargo build "${cargo_profile[@]}" -p kiln --bin kiln
  site=$(dirname "$(dirname "$KILN_TORCH_LIB")")
  rm -f "$context/kiln"
  cp "$out/kiln" "$context/kiln"
  strip "$context/kiln"
  # GBs: hard links where the context and the venv share a filesystem, else copies.
  mkdir -p "$context/site-packages/torch"
  link_or_copy() { cp -al "$1" "$2" 2> /dev/null || { rm -rf "$2" && cp -a "$1" "$2"; }; }
  link_or_copy "$KILN_TORCH_LIB" "$context/site-packages/torch/lib"
  if [ -d "$site/nvidia" ]; then
    link_or_copy "$site/nvidia" "$context/site-packages/nvidia"
  fi
  build_image deploy/docker/node-torch.Dockerfile kiln-node-torch
  rm -rf "$context/site-packages"
fi

step "image sizes"
for image in "${sizes[@]}"; do
  bytes=$(docker image inspect -f '{{.Size}}' "$image")
  echo "$image: $((bytes / 1000000)) MB"
done
