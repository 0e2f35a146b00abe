#!/bin/bash
# A long fuzz campaign: every named target for SECONDS of wall clock, JOBS at a
# time, each at `nice -n 19` (the fuzzers only soak up idle CPU), then one table
# row per target (Markdown) in fuzz/work/campaign/table.md.
#
#   fuzz/campaign.sh SECONDS JOBS TARGET...
#
# The targets are built first (`cargo fuzz build --sanitizer none
# --debug-assertions`, as fuzz/run.sh does) and their binaries copied to
# fuzz/work/campaign/bin/, so that editing the sources during the campaign
# neither rebuilds nor changes what runs. Options, seeds and outputs are those
# of fuzz/run.sh (same per-target -max_len and dictionary; new inputs in
# fuzz/work/TARGET/, findings in fuzz/artifacts/TARGET/), plus -rss_limit_mb and
# -malloc_limit_mb (the latter needs sanitizer hooks, so on stable the
# allocation guard every target installs is what bounds single allocations).
# A target's row: wall time, executions, executions/s, corpus size at the end
# (files in fuzz/work/TARGET/ plus the seeds libFuzzer kept), cov/ft, and the
# crash-/oom-/timeout- files it left. Set NO_BUILD=1 to reuse the copied binaries.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"

[ $# -ge 3 ] || {
    echo "usage: fuzz/campaign.sh SECONDS JOBS TARGET..." >&2
    exit 2
}
secs=$1
jobs=$2
shift 2
out=work/campaign
mkdir -p "$out/bin"

options() {
    case "$1" in
    decode_stream) echo "-max_len=600000 -dict=decode_stream.dict" ;;
    recv_sink | incoming_guest) echo "-max_len=262144 -dict=decode_stream.dict" ;;
    decode_multifd_channel) echo "-max_len=600000" ;;
    xbzrle) echo "-max_len=8192" ;;
    *) echo "-max_len=65536" ;;
    esac
}

# Seed directories besides the target's own corpus and reproducers.
seeds() {
    case "$1" in
    decode_stream | recv_sink | incoming_guest) echo regressions/streams ;;
    multifd_recv) echo corpus/decode_multifd_channel ;;
    postcopy_dest) echo "corpus/incoming_guest regressions/streams" ;;
    esac
}

if [ "${NO_BUILD:-}" != 1 ]; then
    for t in "$@"; do
        nice -n 10 cargo fuzz build --sanitizer none --debug-assertions "$t" >"$out/build.log" 2>&1
        cp "$(ls -d target/*/release/"$t" | head -n 1)" "$out/bin/$t"
    done
fi

one() {
    t=$1
    mkdir -p "work/$t" "corpus/$t" "regressions/$t" "artifacts/$t"
    log="$out/$t.log"
    start=$(date +%s)
    # shellcheck disable=SC2046,SC2086 # options and seeds are words on purpose
    nice -n 19 "$out/bin/$t" "work/$t" "corpus/$t" "regressions/$t" $(seeds "$t") \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=1024 \
        -print_final_stats=1 -artifact_prefix="artifacts/$t/" $(options "$t") >"$log" 2>&1 || true
    end=$(date +%s)
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
    last=$(grep -E '^#[0-9]+' "$log" | tail -n 1 || true)
    cov=$(echo "$last" | sed -n 's/.*cov: \([0-9]*\).*/\1/p')
    ft=$(echo "$last" | sed -n 's/.* ft: \([0-9]*\).*/\1/p')
    corp=$(echo "$last" | sed -n 's/.* corp: \([^ ]*\).*/\1/p')
    crash=$(find "artifacts/$t" -name 'crash-*' -newer "$out/start.$t" | wc -l)
    oom=$(find "artifacts/$t" -name 'oom-*' -newer "$out/start.$t" | wc -l)
    slow=$(find "artifacts/$t" -name 'timeout-*' -newer "$out/start.$t" | wc -l)
    echo "| \`$t\` | $(((end - start) / 60)) min | ${execs:-?} | ${rate:-?} | ${corp:-?} | ${cov:-?} / ${ft:-?} | $crash / $oom / $slow |" >"$out/$t.row"
}

: >"$out/pids"
for t in "$@"; do
    # Wait for a free slot.
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n || true; done
    touch "$out/start.$t"
    echo "$(date -u +%H:%M:%S) start $t"
    one "$t" &
    echo "$! $t" >>"$out/pids"
done
wait
{
    echo "| target | wall | executions | exec/s | corpus (files/size) | cov / ft | crash / oom / timeout |"
    echo "| --- | --- | --- | --- | --- | --- | --- |"
    for t in "$@"; do cat "$out/$t.row"; done
} >"$out/table.md"
cat "$out/table.md"
