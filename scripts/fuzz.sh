#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for SECONDS each (default 60) and
# prints, per target, the executions, the rate and the crashes found.
#
#   bash scripts/fuzz.sh [SECONDS] [TARGET...]
#
# cargo-fuzz is installed into $LLMOS_CACHE/tools on first use. The targets
# are built with libFuzzer's coverage instrumentation and no sanitizer (the
# code under test is safe Rust: what a fuzzer finds there is a panic, an
# abort, a timeout or memory blow-up). Each target starts from the seeds in
# fuzz/seeds/TARGET plus the corpus earlier runs grew in
# $LLMOS_CACHE/fuzz/corpus/TARGET; crashes are written to
# $LLMOS_CACHE/fuzz/artifacts/TARGET/ and make the script fail.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$LLMOS_ROOT"
SECONDS_EACH=${1:-60}
shift || true
CARGO_FUZZ_VERSION=0.13.2
TOOLS=$LLMOS_CACHE/tools
export PATH=$TOOLS/bin:$PATH
if ! cargo fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
  echo "[fuzz] installing cargo-fuzz $CARGO_FUZZ_VERSION into $TOOLS" >&2
  cargo install -q --locked cargo-fuzz --version "$CARGO_FUZZ_VERSION" --root "$TOOLS" >&2
fi
# libFuzzer's flags need a nightly compiler's options; the stable one
# accepts them with RUSTC_BOOTSTRAP (the machine has only stable).
export RUSTC_BOOTSTRAP=1
# A panic a target catches on purpose prints one line, not a backtrace.
export RUST_BACKTRACE=0
# Apart from the main build: other RUSTFLAGS would rebuild it all.
export CARGO_TARGET_DIR=$LLMOS_CACHE/fuzz-target
WORK=$LLMOS_CACHE/fuzz
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cd fuzz && cargo fuzz list)
fi
echo "[fuzz] building ${#targets[@]} targets" >&2
(cd fuzz && cargo fuzz build -O --sanitizer none >&2)
rc=0
summary=()
for t in "${targets[@]}"; do
  corpus=$WORK/corpus/$t
  artifacts=$WORK/artifacts/$t/
  # This run's crashes only (copy one worth keeping into fuzz/seeds/$t).
  rm -rf "$artifacts"
  mkdir -p "$corpus" "$artifacts" "fuzz/seeds/$t"
  log=$WORK/$t.log
  echo "[fuzz] $t: ${SECONDS_EACH}s" >&2
  set +e
  (cd fuzz && cargo fuzz run -O --sanitizer none "$t" "$corpus" "seeds/$t" -- \
      -max_total_time="$SECONDS_EACH" -timeout=10 -rss_limit_mb=4096 -max_len=65536 \
      -artifact_prefix="$artifacts" -print_final_stats=1) >"$log" 2>&1
  status=$?
  set -e
  runs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' | tail -n1)
  rate=$(grep -oE 'stat::average_exec_per_sec: *[0-9]+' "$log" | grep -oE '[0-9]+$' | tail -n1)
  if [ "$status" -ne 0 ]; then
    rc=1
    echo "[fuzz] $t FAILED (exit $status); the end of $log:" >&2
    tail -n 40 "$log" >&2
  fi
  summary+=("$(printf '%-20s %12s runs %8s/s  exit %s  %s' "$t" "${runs:-?}" "${rate:-?}" "$status" "$(ls "$artifacts" | tr '\n' ' ')")")
done
echo "[fuzz] ${SECONDS_EACH}s per target:"
printf '  %s\n' "${summary[@]}"
exit $rc
