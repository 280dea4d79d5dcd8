#!/usr/bin/env bash
# Runs every cargo-fuzz target for a bounded time (default 60 s each) and
# prints one summary line per target. Needs the nightly toolchain and
# cargo-fuzz (cargo install cargo-fuzz). Each target starts from its
# committed seeds (fuzz/seeds/<target>/, which `cargo test` also replays)
# and keeps what it finds in fuzz/corpus/<target>/. Builds go to
# ${CARGO_TARGET_DIR:-fuzz/target}/fuzz; crashes land in fuzz/artifacts/<target>/.
set -euo pipefail

seconds="${1:-60}"
case "$seconds" in
    '' | *[!0-9]*) echo "usage: $0 [seconds per target]" >&2; exit 2 ;;
esac

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root/fuzz"
target_dir="${CARGO_TARGET_DIR:-$root/fuzz/target}/fuzz"
targets=$(cargo +nightly fuzz list)

status=0
for t in $targets; do
    mkdir -p "corpus/$t"
    log="$(mktemp)"
    seeds=()
    [ -d "seeds/$t" ] && seeds=("seeds/$t")
    if cargo +nightly fuzz run --target-dir "$target_dir" "$t" "corpus/$t" "${seeds[@]}" -- \
        -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1; then
        result=ok
    else
        result=FAILED
        status=1
    fi
    runs=$(grep -a 'stat::number_of_executed_units' "$log" | awk '{print $2}' | tail -1)
    secs=$(grep -a 'stat::average_exec_per_sec' "$log" | awk '{print $2}' | tail -1)
    echo "$t: $result, ${runs:-?} executions in ${seconds}s (${secs:-?}/s)"
    if [ "$result" = FAILED ]; then
        tail -n 40 "$log" >&2
    fi
    rm -f "$log"
done
exit "$status"
