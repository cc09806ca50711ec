#!/usr/bin/env bash
# Runs schemathesis (PyPI) against a real keygate admin API with docs/openapi.json.
# Fails on server errors, responses that break the document, and invalid input the API
# accepts. Excluded: positive_data_acceptance — the document cannot say "expires_at must be
# in the future" or "this key id exists", so valid-looking requests are rightly refused.
# Knobs: MAX_EXAMPLES (default 50), SEED (default 1).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${SCHEMATHESIS_VENV:-target/schemathesis-venv}
if [ ! -x "$venv/bin/schemathesis" ]; then
  python3 -m venv "$venv" || { echo "python3-venv missing: apt-get install -y python3-venv" >&2; exit 1; }
  "$venv/bin/pip" install -q 'schemathesis>=4,<5'
fi
cargo build --locked --quiet --bin keygate
work=$(mktemp -d)
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
proxy=$(port); admin=$(port); metrics=$(port)
cat > "$work/keygate.toml" <<TOML
[server]
listen = "127.0.0.1:$proxy"
allow_no_routes = true
[admin]
listen = "127.0.0.1:$admin"
[metrics]
listen = "127.0.0.1:$metrics"
[store]
path = "$work/keygate.db"
TOML
token=$(head -c 18 /dev/urandom | base64)
KEYGATE_MASTER_KEY=$(head -c 32 /dev/urandom | base64) KEYGATE_ADMIN_TOKEN=$token RUST_LOG=error \
  target/debug/keygate serve --config "$work/keygate.toml" 2>"$work/keygate.err" &
pid=$!
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 100); do
  python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$admin/readyz')" 2>/dev/null && break
  sleep 0.1
done
"$venv/bin/schemathesis" run docs/openapi.json --url "http://127.0.0.1:$admin" \
  -H "Authorization: Bearer $token" --checks all --exclude-checks positive_data_acceptance \
  -n "${MAX_EXAMPLES:-50}" --seed "${SEED:-1}"
