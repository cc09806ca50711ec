#!/usr/bin/env bash
# What `store.nonce_durability = "replicated"` costs, in one invocation: one private Redis
# primary with one replica (`--replicaof`), two keygates in front of the same nginx that differ
# only in nonce_durability (async: the primary's SET NX; replicated: SET NX + WAIT 1 on the
# nonce pool), the same cached hmac-v1 key, signed 1 KiB POSTs (examples/loadgen, a fresh
# nonce each). Rows interleaved round by round. Reported per mode: median requests/s at
# saturation, the gateway's CPU µs per request, p50/p99 at saturation, and p50/p99 at a fixed
# offered load (RATE, the same for both), each against async.
# Knobs: DURATION=5 (seconds per row) CONNS=16 ROUNDS=3 RATE=1000 TIMEOUT=50ms. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/../.."
source benches/load/common.sh
bench_init
RATE=${RATE:-1000}
TIMEOUT=${TIMEOUT:-50ms}
command -v redis-server >/dev/null || { echo "redis-server missing: apt-get install -y redis-server" >&2; exit 1; }

up=$($LG free-port); primary=$($LG free-port); replica=$($LG free-port)
upstream_nginx "$work" "$up"
nginx -c "$work/nginx.conf" -p "$work" &
pids+=($!)
mkdir -p "$work/primary" "$work/replica"
redis-server --port "$primary" --bind 127.0.0.1 --save "" --appendonly no --dir "$work/primary" >/dev/null &
pids+=($!)
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$primary") 2>/dev/null && break; sleep 0.05; done
redis-server --port "$replica" --bind 127.0.0.1 --save "" --appendonly no --dir "$work/replica" \
  --replicaof 127.0.0.1 "$primary" >/dev/null &
pids+=($!)
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$replica") 2>/dev/null && break; sleep 0.05; done
# The replica's first sync: until the primary counts it (INFO over a raw RESP exchange).
for _ in $(seq 200); do
  exec 3<>"/dev/tcp/127.0.0.1/$primary"
  printf '*2\r\n$4\r\nINFO\r\n$11\r\nreplication\r\n' >&3
  info=$(timeout 1 head -c 2000 <&3 || true)
  exec 3>&-
  grep -q 'connected_slaves:1' <<<"$info" && grep -q 'state=online' <<<"$info" && break
  sleep 0.05
done
master=$(head -c 32 /dev/urandom | base64)

declare -A kg port admin
for mode in async replicated; do
  port[$mode]=$($LG free-port); admin[$mode]=$($LG free-port); metrics=$($LG free-port)
  keygate_toml "${port[$mode]}" "${admin[$mode]}" "$metrics" "$work/unused.db" "$up" 1 \
    | sed "s|^path = \"$work/unused.db\"|kind = \"redis\"\nurl = \"redis://127.0.0.1:$primary\"\nnonce_durability = \"$mode\"\nreplication_timeout = \"$TIMEOUT\"|" \
    > "$work/$mode.toml"
  printf '[log]\naccess = false\n' >> "$work/$mode.toml"
  KEYGATE_MASTER_KEY=$master KEYGATE_ADMIN_TOKEN=bench-token RUST_LOG=error \
    "$KG" serve --config "$work/$mode.toml" 2>"$work/$mode.err" &
  kg[$mode]=$!
  pids+=($!)
  $LG wait "http://127.0.0.1:${admin[$mode]}/readyz"
done
read -r pk sk < <($LG mint "http://127.0.0.1:${admin[async]}" bench-token)
for mode in async replicated; do
  $LG run "http://127.0.0.1:${port[$mode]}/v1/payments" 2 1 "$BODY" "$pk" "$sk" >/dev/null
done

# lrow PID LOADGEN_RUN_ARGS…: "rps cpu_us p50_us p99_us non2xx" of one `loadgen run`.
lrow() {
  local pid=$1 before after out
  shift
  before=$(ticks "$pid")
  out=$($LG run "$@")
  after=$(ticks "$pid")
  jq -r --argjson d $((after - before)) --argjson t "$TCK" \
    '"\(.rps) \(if .requests > 0 then $d * 1e6 / $t / .requests else 0 end) \(.p50_us) \(.p99_us) \(.non_2xx_or_errors)"' <<<"$out"
}
med() { grep . <<<"$1" | sort -g -k"$2" | awk -v n="$ROUNDS" -v k="$2" 'NR == int((n + 1) / 2) {print $k}'; }

declare -A sat fixed
for round in $(seq "$ROUNDS"); do
  for mode in async replicated; do
    url="http://127.0.0.1:${port[$mode]}/v1/payments"
    sat[$mode]+="$(lrow "${kg[$mode]}" "$url" "$CONNS" "$DURATION" "$BODY" "$pk" "$sk")"$'\n'
    fixed[$mode]+="$(RATE=$RATE lrow "${kg[$mode]}" "$url" "$CONNS" "$DURATION" "$BODY" "$pk" "$sk")"$'\n'
  done
done

echo "nonce durability, Redis primary + 1 replica on loopback, replication_timeout = $TIMEOUT, $CONNS connections, median of $ROUNDS rounds"
echo
echo "| mode | req/s | CPU µs/req | p50 µs | p99 µs | non-2xx | p50 µs @ $RATE/s | p99 µs @ $RATE/s | req/s vs async | p99 @ $RATE/s vs async |"
echo "|---|---|---|---|---|---|---|---|---|---|"
r0=$(med "${sat[async]}" 1); q0=$(med "${fixed[async]}" 4)
for mode in async replicated; do
  awk -v m="$mode" -v r="$(med "${sat[$mode]}" 1)" -v c="$(med "${sat[$mode]}" 2)" \
    -v p50="$(med "${sat[$mode]}" 3)" -v p99="$(med "${sat[$mode]}" 4)" -v bad="$(med "${sat[$mode]}" 5)" \
    -v f50="$(med "${fixed[$mode]}" 3)" -v f99="$(med "${fixed[$mode]}" 4)" -v r0="$r0" -v q0="$q0" \
    'BEGIN { printf "| %s | %d | %.1f | %d | %d | %d | %d | %d | %.2f | %.2f |\n", m, r, c, p50, p99, bad, f50, f99, r / r0, f99 / q0 }'
done
