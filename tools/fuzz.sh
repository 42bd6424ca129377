#!/usr/bin/env bash
# Run every fuzz target (cargo fuzz, libFuzzer) for a bounded time: first
# once over the reproducers of past crashes in fuzz/regressions/TARGET/,
# then for SECONDS (default 20) of new inputs grown from fuzz/corpus/TARGET/.
# Usage: bash tools/fuzz.sh [SECONDS] [TARGET...]
# A crash fails the run; its reproducer is in fuzz/artifacts/TARGET/.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds="${1:-20}"
shift || true
command -v cargo-fuzz >/dev/null || cargo install --quiet --locked cargo-fuzz

# No sanitizer: the stable toolchain can't build one, and the targets check
# their own invariants (with debug assertions on, as cargo fuzz builds them).
cargo fuzz build --sanitizer none
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo fuzz list)
log=$(mktemp)
trap 'rm -f "$log"' EXIT
run() {
  local target=$1
  shift
  if ! cargo fuzz run --sanitizer none "$target" "$@" >"$log" 2>&1; then
    tail -n 60 "$log"
    echo "fuzz target $target failed; the input is in fuzz/artifacts/$target/"
    exit 1
  fi
}
for target in "${targets[@]}"; do
  mkdir -p "corpus/$target"
  regressions=(regressions/"$target"/*)
  [ ! -e "${regressions[0]}" ] || run "$target" "${regressions[@]}"
  run "$target" "corpus/$target" -- -max_total_time="$seconds" -print_final_stats=1
  echo "$target: $(grep -Eo 'number_of_executed_units: *[0-9]+' "$log" | grep -Eo '[0-9]+') inputs in ${seconds}s, no failure"
done
