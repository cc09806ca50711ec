#!/usr/bin/env bash
# What rate limits cost through the proxy on Redis, in one invocation: one private
# redis-server, two keygates in front of the same nginx that differ only in `[limits] mode`
# (exact: one script call per limited request; lease: slices of 1% of the limit spent locally).
# Rows: an unlimited key (baseline), a key whose limit is far above the load, on each gateway.
# Signed 1 KiB POSTs (examples/loadgen), rows interleaved round by round; reported: median
# requests/s, the gateway's CPU µs per request, and each row against the baseline.
# Knobs: DURATION=5 (seconds per row) CONNS=16 ROUNDS=3. All traffic stays on loopback.
set -euo pipefail
cd "$(dirname "$0")/../.."
source benches/load/common.sh
bench_init
command -v redis-server >/dev/null || { echo "redis-server missing: apt-get install -y redis-server" >&2; exit 1; }

up=$($LG free-port); rport=$($LG free-port)
upstream_nginx "$work" "$up"
nginx -c "$work/nginx.conf" -p "$work" &
pids+=($!)
mkdir -p "$work/redis"
redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no --dir "$work/redis" >/dev/null &
pids+=($!)
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$rport") 2>/dev/null && break; sleep 0.05; done
master=$(head -c 32 /dev/urandom | base64)

declare -A kg port admin
for mode in exact lease; do
  port[$mode]=$($LG free-port); admin[$mode]=$($LG free-port); metrics=$($LG free-port)
  keygate_toml "${port[$mode]}" "${admin[$mode]}" "$metrics" "$work/unused.db" "$up" 1 \
    | sed "s|^path = \"$work/unused.db\"|kind = \"redis\"\nurl = \"redis://127.0.0.1:$rport\"|" > "$work/$mode.toml"
  printf '[log]\naccess = false\n[limits]\nmode = "%s"\n' "$mode" >> "$work/$mode.toml"
  KEYGATE_MASTER_KEY=$master KEYGATE_ADMIN_TOKEN=bench-token RUST_LOG=error \
    "$KG" serve --config "$work/$mode.toml" 2>"$work/$mode.err" &
  kg[$mode]=$!
  pids+=($!)
  $LG wait "http://127.0.0.1:${admin[$mode]}/readyz"
done
read -r free_pk free_sk < <($LG mint "http://127.0.0.1:${admin[exact]}" bench-token)
read -r lim_pk lim_sk < <(LG_MINT_EXTRA='"rate_limits":[{"name":"contract","limit":100000000,"window":"1h"}]' \
  $LG mint "http://127.0.0.1:${admin[exact]}" bench-token)
# rows: name gateway-mode key
rows=("none exact free" "exact exact lim" "lease lease lim")
for r in "${rows[@]}"; do
  read -r name mode key <<<"$r"
  pk_var=${key}_pk; sk_var=${key}_sk
  $LG run "http://127.0.0.1:${port[$mode]}/v1/payments" 2 1 "$BODY" "${!pk_var}" "${!sk_var}" >/dev/null
done

declare -A res
for round in $(seq "$ROUNDS"); do
  for r in "${rows[@]}"; do
    read -r name mode key <<<"$r"
    pk_var=${key}_pk; sk_var=${key}_sk
    res[$name]+="$(row "${kg[$mode]}" "http://127.0.0.1:${port[$mode]}/v1/payments" "$CONNS" "$DURATION" "$BODY" "${!pk_var}" "${!sk_var}")"$'\n'
  done
done
report "limit check" none none exact lease
