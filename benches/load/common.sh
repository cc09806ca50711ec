# Shared by benches/load/run.sh and benches/load/ab.sh (sourced, not run).

# upstream_nginx DIR PORT: writes DIR/nginx.conf for an nginx that answers 200 "ok" on PORT.
upstream_nginx() {
  cat > "$1/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
pid $1/nginx.pid;
error_log $1/nginx.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 10000000;
  client_body_buffer_size 64k;
  server { listen 127.0.0.1:$2; location / { return 200 "ok\n"; } }
}
NGINX
}

# keygate_toml PROXY ADMIN METRICS DB UPSTREAM THREADS: a gateway in front of UPSTREAM with a
# signed route (POST /v1/payments) and a public one (/public/*), keys cached for an hour.
keygate_toml() {
  cat <<TOML
[server]
listen = "127.0.0.1:$1"
threads = $6
[admin]
listen = "127.0.0.1:$2"
[metrics]
listen = "127.0.0.1:$3"
[store]
path = "$4"
[cache]
ttl = "1h"
[[upstreams]]
name = "nginx"
endpoints = ["127.0.0.1:$5"]
[[routes]]
name = "create-payment"
methods = ["POST"]
path = "/v1/payments"
scope = "payments.create"
upstream = "nginx"
[[routes]]
name = "public"
path = "/public/*"
upstream = "nginx"
public = true
TOML
}

# CPU time (user + system, all threads) of a process, in clock ticks.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
TCK=$(getconf CLK_TCK)

# row PID LOADGEN_RUN_ARGS…: one `loadgen run` as "rps cpu_us", the CPU µs per request being
# that of the process PID (the gateway) over the row. Needs $LG.
row() {
  local pid=$1 before after out n rps
  shift
  before=$(ticks "$pid")
  out=$($LG run "$@")
  after=$(ticks "$pid")
  n=$(sed -E 's/.*"requests":([0-9]+).*/\1/' <<<"$out")
  rps=$(sed -E 's/.*"rps":([0-9.]+).*/\1/' <<<"$out")
  awk -v r="$rps" -v d=$((after - before)) -v n="$n" -v t="$TCK" 'BEGIN { printf "%.0f %.1f\n", r, (n > 0 ? d * 1e6 / t / n : 0) }'
}

# bench_init: knobs (DURATION=5 seconds per row, CONNS=16, ROUNDS=3), the release build of
# keygate and loadgen ($KG, $LG), nginx, and $work, a temp dir removed on exit after the
# processes in $pids are killed, last started first.
bench_init() {
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
  trap bench_cleanup EXIT
}
bench_cleanup() {
  # Last started first, each waited for: Redis stays up until the gateways are gone. TERM,
  # not INT: background jobs of a script ignore SIGINT (Python's would never stop).
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill -TERM "${pids[i]}" 2>/dev/null || true
    wait "${pids[i]}" 2>/dev/null || true
  done
  rm -rf "$work"
}

# median ROWS COLUMN: the median over $ROUNDS rows of "rps cpu" lines.
median() { grep . <<<"$1" | sort -n -k"$2" | awk -v n="$ROUNDS" -v k="$2" 'NR == int((n + 1) / 2) {print $k}'; }

# report TITLE BASELINE NAME…: the markdown table of res[NAME] (rows from `row`), each name
# against BASELINE.
report() {
  local title=$1 base=$2 r0 c0 rps cpu name
  shift 2
  echo "| $title | req/s | CPU µs/req | req/s vs $base | CPU µs/req over $base |"
  echo "|---|---|---|---|---|"
  r0=$(median "${res[$base]}" 1); c0=$(median "${res[$base]}" 2)
  for name in "$@"; do
    rps=$(median "${res[$name]}" 1); cpu=$(median "${res[$name]}" 2)
    awk -v m="$name" -v r="$rps" -v c="$cpu" -v r0="$r0" -v c0="$c0" \
      'BEGIN { printf "| %s | %d | %.1f | %.2f | %+.1f |\n", m, r, c, r / r0, c - c0 }'
  done
}
