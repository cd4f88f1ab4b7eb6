#!/usr/bin/env bash
# Idle RSS of `kiln gateway` for each kiln binary given (e.g. the slim one:
# `cargo build --release --no-default-features --bin kiln`, then
# `scripts/gateway_rss.sh target/release/kiln`): a temp nats-server, the gateway started
# against it, 8 s idle, then VmRSS/VmHWM from /proc. Also readelf's NEEDED torch libraries.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
dir=$(mktemp -d)
nats-server -js -p $port -sd $dir/js > $dir/nats.log 2>&1 &
npid=$!
sleep 1
for bin in "$@"; do
  hport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  "$bin" gateway --nats nats://127.0.0.1:$port --http-addr 127.0.0.1:$hport > $dir/gw.log 2>&1 &
  gpid=$!
  sleep 8
  for i in 1 2 3 4 5; do curl -s -o /dev/null http://127.0.0.1:$hport/healthz || true; done
  sleep 2
  rss=$(awk '/VmRSS/{print $2}' /proc/$gpid/status); hwm=$(awk '/VmHWM/{print $2}' /proc/$gpid/status)
  torch=$(readelf -d "$bin" | grep -cE 'Shared library: \[lib(torch|c10)' || true)
  size=$(du -m "$bin" | cut -f1)
  echo "$bin: idle VmRSS $((rss/1024)) MiB (peak $((hwm/1024)) MiB); readelf NEEDED torch/c10 entries: $torch; file ${size} MB; alive=$(kill -0 $gpid 2>/dev/null && echo yes || echo no)"
  kill $gpid 2>/dev/null; wait $gpid 2>/dev/null
done
kill $npid; rm -rf $dir
