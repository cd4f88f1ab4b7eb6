#!/usr/bin/env bash
# The compose test (tests/compose.rs): builds the images (scripts/images.sh), brings up
# deploy/compose/docker-compose.yml, runs jobs over HTTP and NATS through a SIGKILLed
# nats-server and node, checks every job ran exactly once, and tears the cluster down.
#
#   [KILN_IMAGE_PROFILE=release] scripts/compose_test.sh [extra arguments for scripts/images.sh, e.g. --base IMAGE]
#
# Installs docker.io, docker-compose and debootstrap with apt where missing, and starts dockerd
# in the background when no daemon answers (stopping it again at the end: only what this
# script started). `.ci/run` runs it after the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n==== %s (%s) ====\n' "$*" "$(date -u +%H:%M:%S)"; }
t0=$(date +%s)

missing=()
# The daemon, not the client: a machine may carry a docker client alone (a static
# /usr/local/bin/docker), with no engine to talk to; docker.io brings both.
command -v dockerd > /dev/null || missing+=(docker.io)
command -v docker-compose > /dev/null || docker compose version > /dev/null 2>&1 || missing+=(docker-compose)
command -v debootstrap > /dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
  step "apt-get install ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

dockerd_pid=""
stop_dockerd() {
  if [ -n "$dockerd_pid" ]; then
    kill "$dockerd_pid" 2> /dev/null || true
    wait "$dockerd_pid" 2> /dev/null || true
  fi
}
trap stop_dockerd EXIT
if ! docker info > /dev/null 2>&1; then
  step "starting dockerd (log: /tmp/kiln-dockerd.log)"
  dockerd > /tmp/kiln-dockerd.log 2>&1 &
  dockerd_pid=$!
  for _ in $(seq 1 60); do
    docker info > /dev/null 2>&1 && break
    sleep 1
  done
  docker info > /dev/null 2>&1 || { tail -20 /tmp/kiln-dockerd.log; echo "dockerd did not start" >&2; exit 1; }
fi

# The slim binary (about 1 GB of build output beside the suite's) and the images (about
# 0.5 GB) need room: say so plainly instead of letting the linker fail half way.
free_kib=$(df -Pk . | awk 'NR == 2 { print $4 }')
step "free disk: $((free_kib / 1024 / 1024)) GiB on $(df -P . | awk 'NR == 2 { print $6 }')"
if [ "$free_kib" -lt $((4 * 1024 * 1024)) ]; then
  echo "the compose test needs at least 4 GiB free for the slim build and the images" >&2
  exit 1
fi

# The dev profile unless KILN_IMAGE_PROFILE says release: the suite that ran before has built
# its dependencies, so the binary takes a minute instead of a cold release build (deploy/README.md).
profile="${KILN_IMAGE_PROFILE:-dev}"
step "scripts/images.sh --profile $profile $*"
bash scripts/images.sh --profile "$profile" "$@"
t1=$(date +%s)

step "cargo test --test compose -- --ignored"
source scripts/env.sh
cargo test --test compose -- --ignored --nocapture
t2=$(date +%s)
step "compose test passed: images $((t1 - t0)) s, test $((t2 - t1)) s, in all $((t2 - t0)) s"
