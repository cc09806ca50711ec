#!/usr/bin/env bash
# What x-keygate-assertion costs through the proxy, in one invocation: one keygate, three
# upstreams (the same nginx) that differ only in `assertion` (ed25519, hs256, off), a cached
# hmac-v1 key and a 1 KiB POST per request (examples/loadgen, a fresh nonce each). Rows are
# interleaved round by round; reported: median requests/s and the gateway's CPU µs per
# request, and each mode against `off`.
# Knobs: DURATION=5 (seconds per row) CONNS=16 ROUNDS=3. All traffic stays on loopback.
set -euo pipefail
cd "$(dirname "$0")/../.."
source benches/load/common.sh
bench_init


up=$($LG free-port); proxy=$($LG free-port); admin=$($LG free-port); metrics=$($LG free-port)
upstream_nginx "$work" "$up"
nginx -c "$work/nginx.conf" -p "$work" &
pids+=($!)
head -c 48 /dev/urandom | base64 > "$work/hs256.secret"
chmod 600 "$work/hs256.secret"
cat > "$work/keygate.toml" <<TOML
[server]
listen = "127.0.0.1:$proxy"
threads = 1
[admin]
listen = "127.0.0.1:$admin"
[metrics]
listen = "127.0.0.1:$metrics"
[store]
path = "$work/keygate.db"
[cache]
ttl = "1h"
[log]
access = false
TOML
for mode in ed25519 hs256 off; do
  secret_line=""
  [ "$mode" = hs256 ] && secret_line="assertion_secret_file = \"$work/hs256.secret\""
  cat >> "$work/keygate.toml" <<TOML
[[upstreams]]
name = "nginx-$mode"
endpoints = ["127.0.0.1:$up"]
assertion = "$mode"
$secret_line
[[routes]]
methods = ["POST"]
path = "/$mode/payments"
upstream = "nginx-$mode"
TOML
done
KEYGATE_MASTER_KEY=$(head -c 32 /dev/urandom | base64) KEYGATE_ADMIN_TOKEN=bench-token RUST_LOG=error \
  "$KG" serve --config "$work/keygate.toml" 2>"$work/keygate.err" &
kg=$!
pids+=($!)
$LG wait "http://127.0.0.1:$admin/readyz"
read -r pk sk < <($LG mint "http://127.0.0.1:$admin" bench-token)
for mode in ed25519 hs256 off; do
  $LG run "http://127.0.0.1:$proxy/$mode/payments" 2 1 "$BODY" "$pk" "$sk" >/dev/null
done

declare -A res
for round in $(seq "$ROUNDS"); do
  for mode in off ed25519 hs256; do
    res[$mode]+="$(row "$kg" "http://127.0.0.1:$proxy/$mode/payments" "$CONNS" "$DURATION" "$BODY" "$pk" "$sk")"$'\n'
  done
done
report assertion off off ed25519 hs256
