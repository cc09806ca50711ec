#!/usr/bin/env bash
# A/B of two keygate binaries in one invocation: the same nginx upstream, the same client
# (examples/loadgen), the rows interleaved round by round so a slow spell of this shared
# machine hits both alike. Rows: a public route (c) and a cached hmac-v1 key with a 1 KiB
# POST (d). Reports per binary the median requests/s and CPU µs per request of the gateway
# process, and the B/A ratios per round.
#   benches/load/ab.sh A_BINARY B_BINARY        (e.g. a build of main and of a branch)
# Knobs: DURATION=5 (seconds per row) CONNS=16 ROUNDS=3. All traffic stays on loopback.
set -euo pipefail
cd "$(dirname "$0")/../.."
source benches/load/common.sh
A=${1:?usage: ab.sh A_BINARY B_BINARY}
B=${2:?usage: ab.sh A_BINARY B_BINARY}
DURATION=${DURATION:-5}
CONNS=${CONNS:-16}
ROUNDS=${ROUNDS:-3}
BODY=1024
cargo build --release --locked --example loadgen >&2
LG=target/release/examples/loadgen
command -v nginx >/dev/null || { echo "nginx missing: apt-get install -y nginx-light" >&2; exit 1; }

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

up=$($LG free-port)
upstream_nginx "$work" "$up"
nginx -c "$work/nginx.conf" -p "$work" &
pids+=($!)

MASTER=$(head -c 32 /dev/urandom | base64)
declare -A proxy kgpid pk sk
for side in A B; do
  bin=${!side}
  p=$($LG free-port); a=$($LG free-port); m=$($LG free-port)
  mkdir "$work/$side"
  keygate_toml "$p" "$a" "$m" "$work/$side/keygate.db" "$up" 1 > "$work/$side/keygate.toml"
  KEYGATE_MASTER_KEY=$MASTER KEYGATE_ADMIN_TOKEN=bench-token RUST_LOG=error \
    "$bin" serve --config "$work/$side/keygate.toml" 2>"$work/$side/keygate.err" &
  kgpid[$side]=$!
  pids+=($!)
  proxy[$side]=$p
  $LG wait "http://127.0.0.1:$a/readyz"
  read -r k s < <($LG mint "http://127.0.0.1:$a" bench-token)
  pk[$side]=$k
  sk[$side]=$s
  $LG run "http://127.0.0.1:$p/v1/payments" 2 1 "$BODY" "$k" "$s" >/dev/null
done

declare -A res
for round in $(seq "$ROUNDS"); do
  for side in A B; do
    p=${proxy[$side]}
    res[$side,c]+="$(row "${kgpid[$side]}" "http://127.0.0.1:$p/public/payments" "$CONNS" "$DURATION" "$BODY")"$'\n'
    res[$side,d]+="$(row "${kgpid[$side]}" "http://127.0.0.1:$p/v1/payments" "$CONNS" "$DURATION" "$BODY" "${pk[$side]}" "${sk[$side]}")"$'\n'
  done
done
median() { grep . <<<"$1" | sort -n -k"$2" | awk -v n="$ROUNDS" -v k="$2" 'NR == int((n + 1) / 2) {print $k}'; }
echo "| row | A req/s | B req/s | A CPU µs/req | B CPU µs/req | B/A req/s by round |"
echo "|---|---|---|---|---|---|"
for r in c d; do
  per=$(paste <(grep . <<<"${res[A,$r]}") <(grep . <<<"${res[B,$r]}") | awk '{printf "%s%.2f", (NR > 1 ? ", " : ""), ($1 > 0 ? $3 / $1 : 0)}')
  name=$([ "$r" = c ] && echo "(c) public route" || echo "(d) hmac-v1, 1 KiB POST")
  echo "| $name | $(median "${res[A,$r]}" 1) | $(median "${res[B,$r]}" 1) | $(median "${res[A,$r]}" 2) | $(median "${res[B,$r]}" 2) | $per |"
done
