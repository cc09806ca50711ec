#!/usr/bin/env bash
# What OTLP span export costs through the proxy, in one invocation: two keygates in front of
# the same nginx, identical but for `[tracing] otlp_endpoint` (one exports every request's span
# to a small collector that reads and discards OTLP/HTTP bodies, the other exports nothing).
# Signed 1 KiB POSTs (examples/loadgen); rows interleaved round by round; reported: median
# requests/s and the gateway's CPU µs per request, and export against none.
# Knobs: DURATION=5 (seconds per row) CONNS=16 ROUNDS=3. All traffic stays on loopback.
set -euo pipefail
cd "$(dirname "$0")/../.."
source benches/load/common.sh
bench_init


up=$($LG free-port); otlp=$($LG free-port)
upstream_nginx "$work" "$up"
nginx -c "$work/nginx.conf" -p "$work" &
pids+=($!)
# The collector: counts bytes received, answers 200 with an empty ExportTraceServiceResponse.
python3 - "$otlp" "$work/collected" <<'PY' &
import sys, http.server
port, out = int(sys.argv[1]), sys.argv[2]
total = 0
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        global total
        total += len(self.rfile.read(int(self.headers["content-length"])))
        open(out, "w").write(str(total))
        self.send_response(200); self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0"); self.end_headers()
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
PY
pids+=($!)

declare -A kg pk sk port
for mode in none otlp; do
  port[$mode]=$($LG free-port); admin=$($LG free-port); metrics=$($LG free-port)
  keygate_toml "${port[$mode]}" "$admin" "$metrics" "$work/$mode.db" "$up" 1 > "$work/$mode.toml"
  printf '[log]\naccess = false\n' >> "$work/$mode.toml"
  [ "$mode" = otlp ] && printf '[tracing]\notlp_endpoint = "http://127.0.0.1:%s/v1/traces"\n' "$otlp" >> "$work/$mode.toml"
  KEYGATE_MASTER_KEY=$(head -c 32 /dev/urandom | base64) KEYGATE_ADMIN_TOKEN=bench-token RUST_LOG=error \
    OTEL_BSP_SCHEDULE_DELAY=1000 "$KG" serve --config "$work/$mode.toml" 2>"$work/$mode.err" &
  kg[$mode]=$!
  pids+=($!)
  $LG wait "http://127.0.0.1:$admin/readyz"
  read -r pk[$mode] sk[$mode] < <($LG mint "http://127.0.0.1:$admin" bench-token)
  $LG run "http://127.0.0.1:${port[$mode]}/v1/payments" 2 1 "$BODY" "${pk[$mode]}" "${sk[$mode]}" >/dev/null
done

declare -A res
for round in $(seq "$ROUNDS"); do
  for mode in none otlp; do
    res[$mode]+="$(row "${kg[$mode]}" "http://127.0.0.1:${port[$mode]}/v1/payments" "$CONNS" "$DURATION" "$BODY" "${pk[$mode]}" "${sk[$mode]}")"$'\n'
  done
done
sleep 2 # the last batch
report "span export" none none otlp
echo "collector received $(cat "$work/collected" 2>/dev/null || echo 0) bytes of OTLP"
