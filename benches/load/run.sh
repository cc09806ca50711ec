#!/usr/bin/env bash
# Load benchmark, one invocation on one machine (all traffic on loopback, bounded in time):
#   (a) the upstream (nginx `return 200`) directly
#   (b) nginx `proxy_pass` with keep-alive to the upstream (its own process, 1 worker) — the peer
#   (p) pingora itself: examples/bare_pingora, a ProxyHttp with no filters and keygate's server
#       settings — the floor under every keygate row
#   (c) keygate on a public route           — pingora plus keygate's per-request work
#   (c') the same, with the client signing every request as in (d) (keygate ignores it):
#        the control for (d), since client and gateway share this machine's cores
#   (d) keygate, cached hmac-v1 key, 1 KiB POST, fresh nonce per request
#   (g) keygate, cached bearer key
# Those rows run back to back (each at its maximum rate); then (b), (c) and (d) again, paced at
# RATE requests/s: latency at one offered load, where the p99 target belongs.
# Then a second keygate on a private redis-server (same master key, same upstream):
#   (e) Redis store, cached key        — one Redis round trip per request (the nonce)
#   (f) Redis store, a fresh key on every request (each request is its key's first: a cache
#       miss, one lookup round trip, then the nonce)
#   (u) unknown keys: from a pool of 1,000 (negative cache) and all distinct — with the
#       Redis commands per second they cause
# Each is driven by the same client (examples/loadgen.rs) for DURATION seconds with CONNS keep-alive
# connections; a markdown table with ratios goes to stdout. Besides requests/s, every row
# reports the CPU time the process under test (nginx's worker, or keygate) spent per request
# (/proc/<pid>/stat over the row): this machine's steal time moves requests/s between runs,
# CPU per request much less.
# Then memory per cached key (examples/cachemem: keygate's KeyCache filled with 1,000,000 keys)
# and per used nonce of the embedded store (examples/cachemem N nonces).
# wrk cross-checks (a) and (c) when installed. Knobs: DURATION=5 (seconds per row) CONNS=16 THREADS=1 ROUNDS=3
# RATE=2000 (the paced rows).
set -euo pipefail
cd "$(dirname "$0")/../.."
source benches/load/common.sh
# Not SECONDS: bash sets that itself (seconds since the shell started), so a default never applies.
SECONDS_PER_RUN=${DURATION:-5}
CONNS=${CONNS:-16}
THREADS=${THREADS:-1}
ROUNDS=${ROUNDS:-3}
# loadgen paces every run when RATE is in its environment: keep the knob out of it, so only the
# paced rows are paced.
PACED_RATE=${RATE:-2000}
unset RATE
BODY=1024

cargo build --release --locked --bin keygate --example loadgen --example cachemem --example bare_pingora >&2
KG=target/release/keygate
LG=target/release/examples/loadgen
command -v nginx >/dev/null || { echo "nginx missing: apt-get install -y nginx-light" >&2; exit 1; }
command -v redis-server >/dev/null || { echo "redis-server missing: apt-get install -y redis-server" >&2; exit 1; }

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

up=$($LG free-port); ngproxy=$($LG free-port); proxy=$($LG free-port); admin=$($LG free-port); metrics=$($LG free-port)
upstream_nginx "$work" "$up"
nginx -c "$work/nginx.conf" -p "$work" &
pids+=($!)
mkdir "$work/ngproxy"
cat > "$work/ngproxy/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
pid $work/ngproxy/nginx.pid;
error_log $work/ngproxy/nginx.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 10000000;
  client_body_buffer_size 64k;
  upstream up { server 127.0.0.1:$up; keepalive 64; keepalive_requests 10000000; }
  server {
    listen 127.0.0.1:$ngproxy;
    location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
NGINX
nginx -c "$work/ngproxy/nginx.conf" -p "$work/ngproxy" &
pids+=($!)

keygate_toml "$proxy" "$admin" "$metrics" "$work/keygate.db" "$up" "$THREADS" > "$work/keygate.toml"
MASTER=$(head -c 32 /dev/urandom | base64)
KEYGATE_MASTER_KEY=$MASTER KEYGATE_ADMIN_TOKEN=bench-token RUST_LOG=error \
  $KG serve --config "$work/keygate.toml" 2>"$work/keygate.err" &
kgpid=$!
pids+=($kgpid)
$LG wait "http://127.0.0.1:$admin/readyz"
read -r pk sk < <($LG mint "http://127.0.0.1:$admin" bench-token)
[ -n "$pk" ] || { echo "minting failed" >&2; cat "$work/keygate.err" >&2; exit 1; }
read -r _ bsk < <($LG mint "http://127.0.0.1:$admin" bench-token bearer)
$LG wait "http://127.0.0.1:$ngproxy/x"
# (p): pingora with no filters, keygate's server settings — the floor under every keygate row.
bare=$($LG free-port)
target/release/examples/bare_pingora "127.0.0.1:$bare" "127.0.0.1:$up" "$THREADS" 2>"$work/bare.err" &
barepid=$!
pids+=($barepid)
$LG wait "http://127.0.0.1:$bare/x"

# measure PID cmd...: the command's JSON line with "cpu_us" (PID's CPU µs per request) added.
measure() {
  local pid=$1 before after out n
  shift
  before=$(ticks "$pid")
  out=$("$@")
  after=$(ticks "$pid")
  n=$(sed -E 's/.*"requests":([0-9]+).*/\1/' <<<"$out")
  sed -E "s/}$/,\"cpu_us\":$(awk -v d=$((after - before)) -v n="$n" -v t="$TCK" 'BEGIN { printf "%.1f", (n > 0 ? d * 1e6 / t / n : 0) }')}/" <<<"$out"
}
run() { $LG run "$1" "$CONNS" "$SECONDS_PER_RUN" "$BODY" "${@:2}"; }
field() { sed -E "s/.*\"$2\":([0-9.]+).*/\1/" <<<"$1"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }'; }

# Warm up pools and the key cache, then measure.
run "http://127.0.0.1:$proxy/v1/payments" "$pk" "$sk" >/dev/null
$LG run-bearer "http://127.0.0.1:$proxy/v1/payments" 1 1 "$BODY" "$bsk" >/dev/null
# ROUNDS rounds, the rows interleaved within each, so a slow spell of this shared machine hits
# every row alike; each row reports its median round, and the (d)/(c') ratio is also given per
# round.
up_worker=$(pgrep -P "$(cat "$work/nginx.pid")" | head -1)
ngproxy_worker=$(pgrep -P "$(cat "$work/ngproxy/nginx.pid")" | head -1)
declare -A all
for round in $(seq "$ROUNDS"); do
  all[a]+="$(measure "$up_worker" run "http://127.0.0.1:$up/v1/payments")"$'\n'
  all[b]+="$(measure "$ngproxy_worker" run "http://127.0.0.1:$ngproxy/v1/payments")"$'\n'
  all[p]+="$(measure "$barepid" run "http://127.0.0.1:$bare/public/payments")"$'\n'
  all[c]+="$(measure "$kgpid" run "http://127.0.0.1:$proxy/public/payments")"$'\n'
  all[cs]+="$(measure "$kgpid" run "http://127.0.0.1:$proxy/public/payments" "$pk" "$sk")"$'\n'
  all[d]+="$(measure "$kgpid" run "http://127.0.0.1:$proxy/v1/payments" "$pk" "$sk")"$'\n'
  all[g]+="$(measure "$kgpid" $LG run-bearer "http://127.0.0.1:$proxy/v1/payments" "$CONNS" "$SECONDS_PER_RUN" "$BODY" "$bsk")"$'\n'
done
# median_by FIELD LINES: the line (one per round) whose FIELD is the median.
median_by() { grep . <<<"$2" | awk -F"\"$1\":" '{split($2, r, ","); print r[1] "\t" $0}' | sort -n | awk -v n="$ROUNDS" 'NR == int((n + 1) / 2) {sub(/^[^\t]*\t/, ""); print}'; }
# per_round FIELD LINES_X LINES_Y AWK_EXPR FORMAT: AWK_EXPR of ($1 = X's, $2 = Y's FIELD), round by round.
per_round() { paste <(grep . <<<"$2" | sed -E "s/.*\"$1\":([0-9.]+).*/\\1/") <(grep . <<<"$3" | sed -E "s/.*\"$1\":([0-9.]+).*/\\1/") | awk -v f="$5" "{printf \"%s\" f, (NR > 1 ? \", \" : \"\"), $4}"; }
for name in a b p c cs d g; do declare "$name=$(median_by rps "${all[$name]}")"; done
rounds_ratio() { per_round rps "${all[$1]}" "${all[$2]}" '$1 / $2' '%.2f'; }

# The same rows at one offered load (RATE requests/s, paced, staggered over the connections):
# latency added by authentication, not restated throughput. Interleaved rounds; the median
# round by p99.
declare -A paced
for round in $(seq "$ROUNDS"); do
  paced[b]+="$(RATE=$PACED_RATE run "http://127.0.0.1:$ngproxy/v1/payments")"$'\n'
  paced[c]+="$(RATE=$PACED_RATE run "http://127.0.0.1:$proxy/public/payments")"$'\n'
  paced[d]+="$(RATE=$PACED_RATE run "http://127.0.0.1:$proxy/v1/payments" "$pk" "$sk")"$'\n'
done
rounds_p99_gap() { per_round p99_us "${paced[$1]}" "${paced[$2]}" '$1 - $2' '%+d'; }
rss=$(awk '/VmHWM/ {print $2}' "/proc/$kgpid/status")

# The same gateway on Redis.
rport=$($LG free-port); rproxy=$($LG free-port); radmin=$($LG free-port); rmetrics=$($LG free-port)
mkdir "$work/redis"
redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no --dir "$work/redis" >/dev/null &
pids+=($!)
redis_url="redis://127.0.0.1:$rport"
sed -e "s/127.0.0.1:$proxy/127.0.0.1:$rproxy/; s/127.0.0.1:$admin/127.0.0.1:$radmin/; s/127.0.0.1:$metrics/127.0.0.1:$rmetrics/" \
    -e "s|^path = \"$work/keygate.db\"|kind = \"redis\"\nurl = \"$redis_url\"|" "$work/keygate.toml" > "$work/keygate-redis.toml"
until $LG redis-commands "$redis_url" >/dev/null 2>&1; do sleep 0.05; done
# Enough fresh keys for (f) at up to 12,000 requests/s.
fresh=$((SECONDS_PER_RUN * 12000))
$LG seed-redis "$redis_url" "$MASTER" "$fresh" "$work/fresh.keys"
KEYGATE_MASTER_KEY=$MASTER KEYGATE_ADMIN_TOKEN=bench-token RUST_LOG=error \
  $KG serve --config "$work/keygate-redis.toml" 2>"$work/keygate-redis.err" &
pids+=($!)
$LG wait "http://127.0.0.1:$radmin/readyz"
read -r rpk rsk < <($LG mint "http://127.0.0.1:$radmin" bench-token)
run "http://127.0.0.1:$rproxy/v1/payments" "$rpk" "$rsk" >/dev/null
# Redis commands per second over one run: the counter's difference over the run's length.
with_cmds() {
  local before after out
  # Let the previous run's last usage flush (once a second) land outside this window.
  sleep 2
  before=$($LG redis-commands "$redis_url")
  out=$("$@")
  after=$($LG redis-commands "$redis_url")
  sed -E "s/}$/,\"redis_cmds\":$((after - before))}/" <<<"$out"
}
e=$(with_cmds run "http://127.0.0.1:$rproxy/v1/payments" "$rpk" "$rsk")
f=$(with_cmds $LG run-keys "http://127.0.0.1:$rproxy/v1/payments" "$CONNS" "$SECONDS_PER_RUN" "$BODY" "$work/fresh.keys")
u1=$(with_cmds $LG run-unknown "http://127.0.0.1:$rproxy/v1/payments" "$CONNS" "$SECONDS_PER_RUN" "$BODY" 1000)
u0=$(with_cmds $LG run-unknown "http://127.0.0.1:$rproxy/v1/payments" "$CONNS" "$SECONDS_PER_RUN" "$BODY" 0)

echo "## keygate load benchmark — $(date -u +%Y-%m-%dT%H:%MZ)"
echo
echo "$(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB; ${CONNS} connections × ${SECONDS_PER_RUN} s each, median of ${ROUNDS} interleaved rounds; POST ${BODY} B; keygate threads=${THREADS}; nginx 1 worker; client: examples/loadgen (1 thread)"
echo
echo "| run | requests/s | p50 µs | p99 µs | errors | rps vs (a) | rps vs (b) | rps vs (c) | rps vs (c') | CPU µs/request | CPU vs (c) |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
ra=$(field "$a" rps); rb=$(field "$b" rps); rc=$(field "$c" rps); rcs=$(field "$cs" rps); cc=$(field "$c" cpu_us)
for name in a b p c cs d g; do
  r=${!name}
  label=$(case $name in a) echo "(a) upstream direct";; b) echo "(b) nginx proxy_pass, keep-alive";; p) echo "(p) pingora, no filters (the floor)";; c) echo "(c) keygate, public route";; cs) echo "(c') keygate, public route, client signing";; d) echo "(d) keygate, hmac-v1 cached key";; g) echo "(g) keygate, bearer cached key";; esac)
  rps=$(field "$r" rps)
  printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n" "$label" "$rps" "$(field "$r" p50_us)" "$(field "$r" p99_us)" \
    "$(field "$r" non_2xx_or_errors)" "$(ratio "$rps" "$ra")" "$(ratio "$rps" "$rb")" "$(ratio "$rps" "$rc")" "$(ratio "$rps" "$rcs")" \
    "$(field "$r" cpu_us)" "$(ratio "$(field "$r" cpu_us)" "$cc")"
done
echo
echo "(c)/(p) per round: $(rounds_ratio c p); (d)/(p) per round: $(rounds_ratio d p)"
echo "(d)/(c) per round: $(rounds_ratio d c); (d)/(c') per round: $(rounds_ratio d cs); (d)/(b) per round: $(rounds_ratio d b)"
echo "p99 (d) − p99 (c) at saturation: $(( $(field "$d" p99_us) - $(field "$c" p99_us) )) µs (each row at its own maximum rate: mostly the throughput difference)"
echo
echo "At one offered load, ${PACED_RATE} requests/s (paced; a request whose slot passed is timed from its slot), median round by p99:"
echo
echo "| run | requests/s | p50 µs | p99 µs | p99.9 µs | errors | behind schedule |"
echo "|---|---:|---:|---:|---:|---:|---:|"
for name in b c d; do
  r=$(median_by p99_us "${paced[$name]}")
  label=$(case $name in b) echo "(b) nginx proxy_pass";; c) echo "(c) keygate, public route";; d) echo "(d) keygate, hmac-v1 cached key";; esac)
  printf "| %s | %s | %s | %s | %s | %s | %s |\n" "$label" "$(field "$r" rps)" "$(field "$r" p50_us)" "$(field "$r" p99_us)" "$(field "$r" p999_us)" "$(field "$r" non_2xx_or_errors)" "$(field "$r" late)"
done
echo
echo "p99 (d) − p99 (c) per round at ${PACED_RATE} requests/s: $(rounds_p99_gap d c) µs"
echo
echo "keygate peak RSS after the runs: ${rss} KiB"
echo
echo "On Redis (same gateway config, store.kind = \"redis\"; a private redis-server; cache.negative_ttl 5 s):"
echo
echo "| run | requests/s | p50 µs | p99 µs | errors | rps vs (e) | Redis commands | per request |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
re=$(field "$e" rps)
for name in e f u1 u0; do
  r=${!name}
  label=$(case $name in e) echo "(e) cached key";; f) echo "(f) every request a fresh key";; u1) echo "(u) unknown keys, pool of 1,000 (answered 401)";; u0) echo "(u) unknown keys, all distinct (answered 401)";; esac)
  rps=$(field "$r" rps); n=$(field "$r" requests); cmds=$(field "$r" redis_cmds)
  printf "| %s | %s | %s | %s | %s | %s | %s | %s |\n" "$label" "$rps" "$(field "$r" p50_us)" "$(field "$r" p99_us)" \
    "$(field "$r" non_2xx_or_errors)" "$(ratio "$rps" "$re")" "$cmds" "$(ratio "$cmds" "$n")"
done
echo
mem=$(target/release/examples/cachemem 1000000)
echo "Memory per cached key (examples/cachemem, keygate's KeyCache holding 1,000,000 hmac-v1 keys, each then used once): $(field "$mem" bytes_per_key) B; RSS $(field "$mem" rss_before_kib) → $(field "$mem" rss_after_kib) KiB, after use $(field "$mem" rss_after_use_kib) KiB"
nm=$(target/release/examples/cachemem 1000000 nonces)
echo
echo "Memory per used nonce (examples/cachemem nonces, 1,000,000 through the embedded store, journal writes included): $(field "$nm" bytes_per_nonce) B; the same nonces as strings in a HashMap (the earlier layout, same run): $(field "$nm" string_map_bytes_per_nonce) B. The set holds every nonce of 2 × clock_skew: requests/s × 600 s × this."
if command -v wrk >/dev/null; then
  echo
  echo "wrk cross-check (GET, ${CONNS} connections, 1 thread, ${SECONDS_PER_RUN} s):"
  echo
  for url in "http://127.0.0.1:$up/x" "http://127.0.0.1:$proxy/public/x"; do
    wrk -t1 -c"$CONNS" -d"${SECONDS_PER_RUN}s" --latency "$url" | awk -v u="$url" '/Requests\/sec/ {r=$2} /99%/ {p=$2} END {printf "- %s: %s req/s, p99 %s\n", u, r, p}'
  done
fi
