#!/bin/sh
# Fuzz one target (or all, one after the other) for a given time, then print
# what happened: executions, coverage (libFuzzer's cov/ft), corpus size, and
# the findings (crash-/timeout-/oom- files in fuzz/artifacts/TARGET/).
#
#   fuzz/run.sh TARGET|all SECONDS [--merge]
#
# SECONDS 0 fuzzes nothing (with --merge: only the merge of an earlier run).
# Runs `cargo fuzz run --sanitizer none` (stable Rust: no sanitizer), one process
# with debug assertions (overflow checks) on. New inputs go to fuzz/work/TARGET/
# (git-ignored); the committed corpus fuzz/corpus/TARGET/ and the reproducers in
# fuzz/regressions/TARGET/ (and fuzz/regressions/streams/ for the targets that
# take a whole stream) are read as seeds. With --merge the committed corpus
# is then replaced by a minimised merge (libFuzzer -merge=1, what `cargo fuzz
# cmin` does) of its own and the work corpus's small inputs (4 to 64 KiB, see
# `keep`; the large fixture seeds come back from fuzz/seed.sh). The log of the run is
# fuzz/work/TARGET.log. Exits 1 when a run left a new finding.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"

usage() {
    echo "usage: fuzz/run.sh TARGET|all SECONDS [--merge]" >&2
    echo "targets: $(targets | tr '\n' ' ')" >&2
    exit 2
}
targets() { sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.toml | grep -v '^savevm-format-fuzz$'; }

[ $# -ge 2 ] || usage
target=$1
secs=$2
merge=${3:-}
case "$secs" in '' | *[!0-9]*) usage ;; esac
[ -z "$merge" ] || [ "$merge" = --merge ] || usage
command -v cargo-fuzz >/dev/null 2>&1 || {
    echo "cargo-fuzz is not installed: cargo install cargo-fuzz" >&2
    exit 2
}

# Per-target libFuzzer options (input size, dictionary).
options() {
    case "$1" in
    decode_stream) echo "-max_len=600000 -dict=decode_stream.dict" ;;
    recv_sink | incoming_guest) echo "-max_len=262144 -dict=decode_stream.dict" ;;
    decode_multifd_channel) echo "-max_len=600000" ;;
    xbzrle) echo "-max_len=8192" ;;
    *) echo "-max_len=65536" ;;
    esac
}

# Largest input (KiB) kept in the committed corpus: the corpora stay small (about
# 2 MB in all; the big fixture seeds come back from seed.sh).
keep() {
    case "$1" in
    decode_stream | incoming_guest) echo 16 ;;
    postcopy_dest) echo 32 ;;
    decode_multifd_channel) echo 5 ;;
    recv_sink) echo 4 ;;
    *) echo 64 ;;
    esac
}

run_one() {
    t=$1
    targets | grep -qx "$t" || usage
    mkdir -p "work/$t" "corpus/$t" "regressions/$t" "artifacts/$t"
    before=$(ls "artifacts/$t" | wc -l)
    if [ "$secs" -gt 0 ]; then
        fuzz_one "$t"
    fi
    if [ "$merge" = --merge ]; then
        cargo fuzz build --sanitizer none --debug-assertions "$t" >"work/$t.build.log" 2>&1
        bin=$(ls -d target/*/release/"$t" | head -n 1)
        new=$(mktemp -d)
        small=$(mktemp -d)
        cap=$(keep "$t")
        find "corpus/$t" "work/$t" -type f -size -$((cap + 1))k -exec cp {} "$small/" \;
        # shellcheck disable=SC2046
        "$bin" -merge=1 -timeout=10 $(options "$t") "$new" "$small" >"work/$t.merge.log" 2>&1
        rm -rf "corpus/$t" "$small"
        mv "$new" "corpus/$t"
        chmod 755 "corpus/$t"
        echo "  corpus merged: $(ls "corpus/$t" | wc -l) files, $(du -sh "corpus/$t" | cut -f1)"
    fi
}

fuzz_one() {
    t=$1
    log="work/$t.log"
    echo "== $t: fuzzing for $secs s (log: fuzz/$log)"
    # shellcheck disable=SC2046 # options are words on purpose
    extra=
    case "$t" in
    decode_stream | recv_sink | incoming_guest) extra=regressions/streams ;;
    postcopy_dest) extra="corpus/incoming_guest regressions/streams" ;;
    esac
    # shellcheck disable=SC2086 # $extra is empty or directories
    cargo fuzz run --sanitizer none --debug-assertions "$t" "work/$t" "corpus/$t" "regressions/$t" $extra -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="artifacts/$t/" $(options "$t") >"$log" 2>&1 || true
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    last=$(grep -E '^#[0-9]+' "$log" | tail -n 1 || true)
    cov=$(echo "$last" | sed -n 's/.*cov: \([0-9]*\).*/\1/p')
    ft=$(echo "$last" | sed -n 's/.* ft: \([0-9]*\).*/\1/p')
    corp=$(echo "$last" | sed -n 's/.* corp: \([^ ]*\).*/\1/p')
    after=$(ls "artifacts/$t" | wc -l)
    echo "$t: executions ${execs:-?}, cov ${cov:-?}, ft ${ft:-?}, corpus ${corp:-?}, new findings $((after - before))"
    if [ "$after" -gt "$before" ]; then
        ls -t "artifacts/$t" | head -n $((after - before)) | sed "s|^|  fuzz/artifacts/$t/|"
        grep -m 3 -E 'panicked|ERROR: libFuzzer|allocation guard' "$log" | sed 's/^/  /' || true
        found=1
    fi
    if [ -z "${execs:-}" ]; then
        echo "  the run did not finish cleanly: see fuzz/$log" >&2
        tail -n 20 "$log" >&2
        found=1
    fi
}

found=0
if [ "$target" = all ]; then
    for t in $(targets); do run_one "$t"; done
else
    run_one "$target"
fi
exit $found
