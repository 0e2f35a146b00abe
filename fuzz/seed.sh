#!/bin/sh
# Regenerate the seed corpora in fuzz/corpus/<target>/ from tests/fixtures/.
#
#   decode_stream          main streams (*.mig but not *.chN.mig): the first
#                          64 KiB of each, and the whole file when under 600 KB;
#                          plus a whole stream spliced from the xbzrle fixture
#                          and small synthetic streams from gen_seeds.py
#   decode_multifd_channel the first 64 KiB of each multifd channel file (*.chN.mig),
#                          the whole file when under 600 KB (all are: ~530 KB,
#                          so whole zlib/zstd packets get decompressed), and a
#                          small synthetic zlib channel from gen_seeds.py
#   decode_return_path     the return-path captures (*.rp.bin)
#   xbzrle                 a few hand-made deltas (a real QEMU 7.2 record among them)
#   recv_sink,             the decode_stream seeds of at most 128 KiB, and streams
#   incoming_guest         of the harnesses' blocks with 1, 4 and 64 KiB pages
#
# Existing corpus files are kept (libFuzzer adds what it finds there); seeds are
# named after their fixture, so re-running the script just overwrites them.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
fix="$here/../tests/fixtures"
out="$here/corpus"
limit=600000
mkdir -p "$out/decode_stream" "$out/decode_multifd_channel" "$out/xbzrle" "$out/decode_return_path"

n=0
for f in "$fix"/*.mig; do
    base=$(basename "$f" .mig)
    case "$base" in
    *.ch[0-9]*)
        head -c 65536 "$f" >"$out/decode_multifd_channel/seed-$base-64k"
        if [ "$(wc -c <"$f")" -lt "$limit" ]; then
            cp "$f" "$out/decode_multifd_channel/seed-$base-full"
        fi
        ;;
    *)
        size=$(wc -c <"$f")
        if [ "$size" -gt 65536 ]; then
            head -c 65536 "$f" >"$out/decode_stream/seed-$base-64k"
        fi
        if [ "$size" -lt "$limit" ]; then
            cp "$f" "$out/decode_stream/seed-$base-full"
        fi
        ;;
    esac
    n=$((n + 1))
done

# The xbzrle fixture is too big to seed whole and its first 64 KiB hold only
# plain pages. Splice a complete, valid stream out of it: header, configuration
# and the RAM START section (block list), bytes 0..193; a made-up PART section
# with one ZERO record that names block `pc.ram` (the records that follow use
# CONTINUE); then everything from the first PART section with XBZRLE records
# (byte 1116095) to the end (XBZRLE PART/END sections, the q35 devices, EOF and
# the vmdesc). Offsets are for the fixture with sha256 621cb081...8de53a.
xf="$fix/xbzrle-q35-kvm-busy-16m-zero.mig"
{
    head -c 193 "$xf"
    printf '\002\000\000\000\002'                  # PART, section 2 (ram)
    printf '\000\000\000\000\000\000\000\002\006pc.ram\000' # ZERO at 0 of pc.ram, fill 0
    printf '\000\000\000\000\000\000\000\020'   # EOS
    printf '\176\000\000\000\002'                  # footer
    tail -c +1116096 "$xf"
} >"$out/decode_stream/seed-xbzrle-q35-spliced"

# Small synthetic streams for paths the fixtures miss (see gen_seeds.py).
if command -v python3 >/dev/null 2>&1; then
    python3 "$here/gen_seeds.py" "$fix" "$out"
else
    echo "python3 not found: skipping the synthetic decode_stream seeds" >&2
fi

x="$out/xbzrle"
# Eight 2-byte changes at 8-byte strides, from a real 7.2 stream.
printf '\000\002\301\266\006\002\151\233\006\002\121\237\006\002\071\243\006\002\041\247\006\002\011\253\006\002\361\256\006\002\331\262' >"$x/seed-qemu-record"
# One run of 4 bytes after a 2-byte ULEB zero run (0x81 0x01 = 129).
printf '\201\001\004abcd' >"$x/seed-uleb2"
# A delta that runs to the very end of the page: zrun 4092, nzrun 4.
printf '\374\037\004wxyz' >"$x/seed-page-end"
# Round-trip material: split byte, size byte, then old bytes and patch triples.
printf '\200\000old-page-bytes\000\001A\017\377B\010\000C' >"$x/seed-roundtrip"

# Return-path seeds: the destination's messages captured from QEMU 7.2.
mkdir -p "$out/decode_return_path"
for f in "$fix"/*.rp.bin; do
    cp "$f" "$out/decode_return_path/seed-$(basename "$f" .rp.bin)"
done

# The whole-path targets start from the decode_stream seeds of at most 128 KiB
# (gen_seeds.py adds streams whose blocks are their guest's regions).
for t in recv_sink incoming_guest; do
    mkdir -p "$out/$t"
    find "$out/decode_stream" -name 'seed-*' -size -129k -exec cp {} "$out/$t/" \;
done

echo "seeded from $n fixture files:"
for t in decode_stream decode_multifd_channel decode_return_path xbzrle recv_sink incoming_guest; do
    echo "  $t: $(ls "$out/$t" | wc -l) files, $(du -sh "$out/$t" | cut -f1)"
done
