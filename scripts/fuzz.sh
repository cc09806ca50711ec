#!/usr/bin/env bash
# Coverage-guided fuzzing (cargo-fuzz, libFuzzer) of keygate's untrusted-input parsers.
#   scripts/dev fuzz TARGET [SECONDS]   one target (default 600 s); TARGET=all runs each in turn
#   scripts/dev fuzz list               the targets
# Seeds come from the signing vectors (examples/fuzz_seeds.rs) plus fuzz/regressions/TARGET
# (inputs that once crashed: kept forever, also run by tests/fuzz_smoke.rs on stable).
# A crash leaves its input in fuzz/artifacts/TARGET/: copy it into fuzz/regressions/TARGET/,
# fix, and commit both. FUZZ_TOOLCHAIN=stable forces the stable path. Uses nightly Rust when rustup has it; otherwise the stable compiler
# with RUSTC_BOOTSTRAP=1 (cargo-fuzz needs -Z flags), without a sanitizer: keygate forbids
# unsafe code, so libFuzzer's coverage and the targets' own invariants do the finding.
set -euo pipefail
cd "$(dirname "$0")/.."
targets=(credentials string_to_sign body_nonce route_matching config admin_json store_record)
target=${1:-}
secs=${2:-600}
if [ -z "$target" ] || [ "$target" = list ]; then
  printf '%s\n' "${targets[@]}"
  exit 0
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "scripts/dev fuzz: installing cargo-fuzz (crates.io)" >&2
  cargo install --locked cargo-fuzz >&2
fi
# FUZZ_TOOLCHAIN=stable forces the stable path where nightly exists (to check it).
if [ "${FUZZ_TOOLCHAIN:-}" != stable ] && rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  fuzz=(cargo +nightly fuzz)
  sanitizer=address
else
  export RUSTC_BOOTSTRAP=1
  fuzz=(cargo fuzz)
  sanitizer=none
fi
cargo run --locked --quiet --example fuzz_seeds -- fuzz/corpus
"${fuzz[@]}" build -s "$sanitizer" >&2
[ "$target" = all ] && run=("${targets[@]}") || run=("$target")
status=0
for t in "${run[@]}"; do
  mkdir -p "fuzz/corpus/$t" "fuzz/regressions/$t" "fuzz/artifacts/$t"
  log=$(mktemp)
  # -timeout: one input taking over 10 s is a hang, reported like a crash.
  if "${fuzz[@]}" run -s "$sanitizer" "$t" "fuzz/corpus/$t" "fuzz/regressions/$t" -- \
      -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
    result=ok
  else
    result=CRASH
    status=1
    grep -E 'panicked|ERROR|SUMMARY|Test unit written' "$log" | head -20 >&2
  fi
  execs=$(awk '/stat::number_of_executed_units/ {print $NF}' "$log")
  cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -1 | cut -d' ' -f2)
  echo "fuzz $t: $result, ${execs:-0} executions in ${secs} s, coverage ${cov:-?} edges, corpus $(ls "fuzz/corpus/$t" | wc -l) inputs"
  rm -f "$log"
done
exit $status
