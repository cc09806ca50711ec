#!/usr/bin/env bash
# Soak: signed traffic through one keygate (embedded store) for MINUTES, its RSS sampled
# every 2 s; writes benches/soak/rss.csv and benches/soak/rss.png, prints the curve's
# figures. Memory must plateau: nonces expire (signing.clock_skew = 15s keeps them 30 s),
# caches are bounded. With --check (CI) it fails when the RSS of the last quarter is more
# than 10% above that of the second quarter, or any request failed.
# Knobs: MINUTES=30 RATE=400 (requests/s, paced) CONNS=8 PROFILE=release|debug
# OUT=benches/soak (where rss.csv and rss.png go).
set -euo pipefail
cd "$(dirname "$0")/../.."
source benches/load/common.sh
MINUTES=${MINUTES:-30}
RATE=${RATE:-400}
CONNS=${CONNS:-8}
PROFILE=${PROFILE:-release}
OUT=${OUT:-benches/soak}
check=${1:-}
if [ "$PROFILE" = release ]; then
  cargo build --release --locked --bin keygate --example loadgen >&2
else
  cargo build --locked --bin keygate --example loadgen >&2
fi
KG=target/$PROFILE/keygate
LG=target/$PROFILE/examples/loadgen
work=$(mktemp -d)
pids=()
trap bench_cleanup EXIT

up=$($LG free-port); proxy=$($LG free-port); admin=$($LG free-port); metrics=$($LG free-port)
# The upstream: answers 200 to anything, keep-alive.
python3 - "$up" <<'PY' &
import sys, http.server
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def answer(self):
        n = int(self.headers.get("content-length") or 0)
        if n: self.rfile.read(n)
        self.send_response(200); self.send_header("content-length", "3"); self.end_headers()
        self.wfile.write(b"ok\n")
    do_GET = do_POST = answer
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
PY
pids+=($!)
# On a busy machine Python may take a while to listen: the first requests would fail.
$LG wait "http://127.0.0.1:$up/"
keygate_toml "$proxy" "$admin" "$metrics" "$work/keygate.db" "$up" 1 > "$work/keygate.toml"
printf '[signing]\nclock_skew = "15s"\n[log]\naccess = false\n' >> "$work/keygate.toml"
KEYGATE_MASTER_KEY=$(head -c 32 /dev/urandom | base64) KEYGATE_ADMIN_TOKEN=soak-token RUST_LOG=error \
  "$KG" serve --config "$work/keygate.toml" 2>"$work/keygate.err" &
kg=$!
pids+=($!)
$LG wait "http://127.0.0.1:$admin/readyz"
read -r pk sk < <($LG mint "http://127.0.0.1:$admin" soak-token)

secs=${SOAK_SECONDS:-$((MINUTES * 60))}
mkdir -p "$OUT"
csv=$OUT/rss.csv
echo "seconds,rss_kib" > "$csv"
(
  start=$(date +%s)
  while kill -0 "$kg" 2>/dev/null; do
    rss=$(awk '/^VmRSS/ {print $2}' "/proc/$kg/status")
    echo "$(( $(date +%s) - start )),$rss" >> "$csv"
    sleep 2
  done
) &
sampler=$!
out=$(RATE=$RATE $LG run "http://127.0.0.1:$proxy/v1/payments" "$CONNS" "$secs" 256 "$pk" "$sk")
kill "$sampler" 2>/dev/null || true
echo "$out"
python3 benches/soak/plot.py "$csv" "$OUT/rss.png" "$((secs / 60)) min, $RATE req/s, $PROFILE" "$out" ${check:+--check}
