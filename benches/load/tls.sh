#!/usr/bin/env bash
# TLS on the proxy listener against nginx terminating TLS with the same certificate (ECDSA
# P-256), one invocation, all on loopback:
#   handshakes/s, full (`openssl s_time -new`) and resumed (`-reuse`), and the server's CPU µs
#   per handshake (/proc/<pid>/stat), for keygate and for nginx (1 worker);
#   requests/s on kept-alive connections to a public route (wrk): keygate over plain HTTP,
#   keygate over TLS, nginx over TLS (proxy_pass with keep-alive to the same upstream);
#   signed requests/s (examples/loadgen: cached hmac-v1 key, 1 KiB POST, fresh nonce, the
#   default Ed25519 assertion) over plain HTTP/1.1, TLS HTTP/1.1 and TLS h2, beside nginx
#   proxying the same POST over TLS HTTP/1.1 and h2 (nginx checks nothing).
# s_time is one client thread, so handshakes/s can be client-bound: the CPU µs per handshake
# of the server is the comparable figure. Knobs: DURATION=5 CONNS=16.
set -euo pipefail
cd "$(dirname "$0")/../.."
source benches/load/common.sh
DURATION=${DURATION:-5}
CONNS=${CONNS:-16}
cargo build --release --locked --bin keygate --example loadgen >&2
KG=target/release/keygate
LG=target/release/examples/loadgen
for tool in nginx wrk openssl; do
  command -v $tool >/dev/null || { echo "$tool missing: scripts/dev load installs it" >&2; exit 1; }
done

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

# A CA and a leaf it signed (rustls, in the load generator, refuses a CA as the leaf).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=bench-ca \
  -days 1 -keyout "$work/ca.key" -out "$work/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=localhost \
  -keyout "$work/key.pem" -out "$work/leaf.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' > "$work/leaf.ext"
openssl x509 -req -in "$work/leaf.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" \
  -CAcreateserial -days 1 -extfile "$work/leaf.ext" -out "$work/cert.pem" 2>/dev/null

up=$($LG free-port); ngtls=$($LG free-port)
plain=$($LG free-port); tls=$($LG free-port)
upstream_nginx "$work" "$up"
nginx -c "$work/nginx.conf" -p "$work" &
pids+=($!)
mkdir "$work/ngtls"
cat > "$work/ngtls/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
pid $work/ngtls/nginx.pid;
error_log $work/ngtls/nginx.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 10000000;
  upstream up { server 127.0.0.1:$up; keepalive 64; }
  ssl_protocols TLSv1.2 TLSv1.3;
  ssl_session_cache shared:SSL:10m;
  server {
    listen 127.0.0.1:$ngtls ssl http2;
    ssl_certificate $work/cert.pem;
    ssl_certificate_key $work/key.pem;
    location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
NGINX
nginx -c "$work/ngtls/nginx.conf" -p "$work/ngtls" &
ngpid=$!
pids+=($!)

MASTER=$(head -c 32 /dev/urandom | base64)
declare -A kgpid adminport
for side in plain tls; do
  mkdir "$work/$side"
  a=$($LG free-port); m=$($LG free-port)
  adminport[$side]=$a
  keygate_toml "${!side}" "$a" "$m" "$work/$side/keygate.db" "$up" 1 > "$work/$side/keygate.toml"
  if [ "$side" = tls ]; then
    printf '[server.tls]\ncert_file = "%s"\nkey_file = "%s"\n' "$work/cert.pem" "$work/key.pem" >> "$work/$side/keygate.toml"
  fi
  printf '[log]\naccess = false\n' >> "$work/$side/keygate.toml"
  KEYGATE_MASTER_KEY=$MASTER KEYGATE_ADMIN_TOKEN=bench-token RUST_LOG=error \
    "$KG" serve --config "$work/$side/keygate.toml" >"$work/$side/keygate.out" 2>&1 &
  kgpid[$side]=$!
  pids+=($!)
  $LG wait "http://127.0.0.1:$a/readyz"
done
# nginx's worker is the child of its master.
ngworker=$(pgrep -P "$ngpid" | head -1)

# handshakes PID PORT ARGS…: "conns/s cpu_us_per_conn" (ARGS: -new or -reuse, a version).
handshakes() {
  local pid=$1 port=$2 before after out n secs
  shift 2
  before=$(ticks "$pid")
  out=$(openssl s_time -connect "127.0.0.1:$port" "$@" -time "$DURATION" 2>/dev/null | grep 'connections in' | tail -1)
  after=$(ticks "$pid")
  n=$(awk '{print $1}' <<<"$out"); secs=$(awk '{print $4}' <<<"$out")
  awk -v n="$n" -v s="$secs" -v d=$((after - before)) -v t="$TCK" 'BEGIN { printf "%.0f %.0f\n", (s > 0 ? n / s : 0), (n > 0 ? d * 1e6 / t / n : 0) }'
}
# requests PID URL: "req/s cpu_us_per_req" over kept-alive connections.
requests() {
  local pid=$1 url=$2 before after out n
  before=$(ticks "$pid")
  out=$(wrk -t1 -c"$CONNS" -d"${DURATION}s" "$url" 2>/dev/null)
  after=$(ticks "$pid")
  n=$(awk '/requests in/ {print $1}' <<<"$out")
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  awk -v r="$rps" -v n="$n" -v d=$((after - before)) -v t="$TCK" 'BEGIN { printf "%.0f %.1f\n", r, (n > 0 ? d * 1e6 / t / n : 0) }'
}

echo "| row | per second | server CPU µs each |"
echo "|---|---|---|"
# s_time cannot resume TLS 1.3 (its tickets arrive after the handshake it times): resumption
# is measured with TLS 1.2 session ids.
for args in "-new -tls1_3" "-new -tls1_2" "-reuse -tls1_2"; do
  case "$args" in
    "-new -tls1_3") name="full handshakes, TLS 1.3" ;;
    "-new -tls1_2") name="full handshakes, TLS 1.2" ;;
    *) name="resumed handshakes, TLS 1.2" ;;
  esac
  # shellcheck disable=SC2086
  read -r r c < <(handshakes "${kgpid[tls]}" "$tls" $args); echo "| keygate, $name | $r | $c |"
  # shellcheck disable=SC2086
  read -r r c < <(handshakes "$ngworker" "$ngtls" $args); echo "| nginx, $name | $r | $c |"
done
read -r r c < <(requests "${kgpid[plain]}" "http://127.0.0.1:$plain/public/x"); echo "| keygate, plain HTTP, public route | $r | $c |"
read -r r c < <(requests "${kgpid[tls]}" "https://127.0.0.1:$tls/public/x"); echo "| keygate, TLS, public route | $r | $c |"
read -r r c < <(requests "$ngworker" "https://127.0.0.1:$ngtls/public/x"); echo "| nginx, TLS, proxy_pass | $r | $c |"

# Signed requests: each keygate mints its own key (separate stores).
declare -A pk sk
for side in plain tls; do
  read -r k s < <($LG mint "http://127.0.0.1:${adminport[$side]}" bench-token)
  pk[$side]=$k; sk[$side]=$s
done
export LG_CA=$work/ca.pem
BODY=1024
signed() { row "$1" "$2" "$CONNS" "$DURATION" "$BODY" "${@:3}"; }
read -r r c < <(LG_H2=0 signed "${kgpid[plain]}" "http://127.0.0.1:$plain/v1/payments" "${pk[plain]}" "${sk[plain]}"); echo "| keygate, plain HTTP/1.1, signed 1 KiB POST | $r | $c |"
read -r r c < <(LG_H2=0 signed "${kgpid[tls]}" "https://127.0.0.1:$tls/v1/payments" "${pk[tls]}" "${sk[tls]}"); echo "| keygate, TLS HTTP/1.1, signed 1 KiB POST | $r | $c |"
read -r r c < <(LG_H2=1 signed "${kgpid[tls]}" "https://127.0.0.1:$tls/v1/payments" "${pk[tls]}" "${sk[tls]}"); echo "| keygate, TLS h2, signed 1 KiB POST | $r | $c |"
read -r r c < <(LG_H2=0 signed "$ngworker" "https://127.0.0.1:$ngtls/v1/payments"); echo "| nginx, TLS HTTP/1.1, 1 KiB POST proxied (no checks) | $r | $c |"
read -r r c < <(LG_H2=1 signed "$ngworker" "https://127.0.0.1:$ngtls/v1/payments"); echo "| nginx, TLS h2, 1 KiB POST proxied (no checks) | $r | $c |"
