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
