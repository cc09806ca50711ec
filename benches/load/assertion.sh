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
DURATION=${DURATION:-5}
CONNS=${CONNS:-16}
ROUNDS=${ROUNDS:-3}
BODY=1024
cargo build --release --locked --bin keygate --example loadgen >&2
KG=target/release/keygate
LG=target/release/examples/loadgen
command -v nginx >/dev/null || { echo "nginx missing: apt-get install -y nginx-light" >&2; exit 1; }

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

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
median() { grep . <<<"$1" | sort -n -k"$2" | awk -v n="$ROUNDS" -v k="$2" 'NR == int((n + 1) / 2) {print $k}'; }
echo "| assertion | req/s | CPU µs/req | req/s vs off | CPU µs/req over off |"
echo "|---|---|---|---|---|"
off_rps=$(median "${res[off]}" 1); off_cpu=$(median "${res[off]}" 2)
for mode in off ed25519 hs256; do
  rps=$(median "${res[$mode]}" 1); cpu=$(median "${res[$mode]}" 2)
  awk -v m="$mode" -v r="$rps" -v c="$cpu" -v r0="$off_rps" -v c0="$off_cpu" \
    'BEGIN { printf "| %s | %d | %.1f | %.2f | %+.1f |\n", m, r, c, r / r0, c - c0 }'
done
