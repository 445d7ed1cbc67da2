#!/usr/bin/env bash
# Runs every fuzz target for N seconds each (default 60), two at a time:
#   fuzz/run.sh 600
# cargo-fuzz needs nightly; without a nightly toolchain, stable is used with RUSTC_BOOTSTRAP=1.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-60}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
if rustup toolchain list 2>/dev/null | grep -q nightly; then toolchain=+nightly; else toolchain=; export RUSTC_BOOTSTRAP=1; fi
cargo $toolchain fuzz build -O
run() {
  mkdir -p "corpus/$1"
  cargo $toolchain fuzz run -O "$1" "corpus/$1" "seeds/$1" -- \
    -max_total_time="$secs" -max_len=4096 -print_final_stats=1 >"run-$1.log" 2>&1 \
    && echo "$1: $(grep -E 'DONE +cov' "run-$1.log" | tail -1)" \
    || { echo "$1: FOUND A PROBLEM, see fuzz/run-$1.log and fuzz/artifacts/$1/"; return 1; }
}
status=0
run head & a=$!; run differential & b=$!; wait $a || status=1; wait $b || status=1
run body & a=$!; run connection & b=$!; wait $a || status=1; wait $b || status=1
exit $status
