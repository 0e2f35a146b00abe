#!/usr/bin/env python3
"""Write small synthetic streams into corpus/decode_stream/ for paths the QEMU
fixtures do not reach: configuration subsections (target-page-bits,
capabilities with x-ignore-shared, uuid), block lists with GPAs, compressed
(zlib) pages, XBZRLE records, MULTIFD_FLUSH, commands between sections, and
8 KiB target pages. Device sections, EOF and vmdesc are copied from the end of
the precopy fixture. Also a small zlib multifd channel with compressible pages
(the fixtures' channels carry only random pages) into
corpus/decode_multifd_channel/. Called by seed.sh; usage:
gen_seeds.py FIXTURES CORPUS_DIR."""
import os
import struct
import sys
import zlib

fix, corpus = sys.argv[1], sys.argv[2]
out = os.path.join(corpus, "decode_stream")

ZERO, MEM_SIZE, PAGE, EOS, CONT, XBZRLE, COMPRESS, FLUSH = 0x2, 0x4, 0x8, 0x10, 0x20, 0x40, 0x100, 0x200


def be16(v): return struct.pack(">H", v)
def be32(v): return struct.pack(">I", v)
def be64(v): return struct.pack(">Q", v)
def cstr(s): return bytes([len(s)]) + s.encode()


def config(machine, bits=None, caps=(), uuid=None):
    v = b"\x07" + be32(len(machine)) + machine.encode()
    sub = lambda n: b"\x05" + cstr(n) + be32(1)
    if bits is not None:
        v += sub("configuration/target-page-bits") + be32(bits)
    if caps:
        v += sub("configuration/capabilities") + be32(len(caps)) + b"".join(cstr(c) for c in caps)
    if uuid is not None:
        v += sub("configuration/uuid") + uuid
    return v


def start(sid, idstr, inst, ver): return b"\x01" + be32(sid) + cstr(idstr) + be32(inst) + be32(ver)
def part(sid): return b"\x02" + be32(sid)
def end(sid): return b"\x03" + be32(sid)
def footer(sid): return b"\x7e" + be32(sid)
def command(n, payload=b""): return b"\x08" + be16(n) + be16(len(payload)) + payload


def rec(offset, flags, name=None):
    return be64(offset | flags) + (cstr(name) if name is not None else b"")


def page(tps, seed):
    return bytes((i * seed + (i >> 5)) & 0xFF for i in range(tps))


def device_tail():
    d = open(os.path.join(fix, "precopy-none-16m-mixed32-s1.mig"), "rb").read()
    # The timer section (FULL, id 0, "timer") through EOF and vmdesc.
    i = d.rindex(b"\x04\x00\x00\x00\x00\x05timer")
    return d[i:]


def stream(bits, caps, uuid, blocks, body_pages):
    tps = 1 << bits
    s = b"QEVM" + be32(3) + config("pc-q35-7.2", bits, caps, uuid)
    s += command(1)  # OPEN_RETURN_PATH
    s += command(2, be32(7))  # PING 7
    s += start(2, "ram", 0, 4)
    total = sum(l for _, l in blocks)
    s += rec(total, MEM_SIZE)
    for gpa, (name, length) in enumerate(blocks):
        s += cstr(name) + be64(length)
        if "x-ignore-shared" in caps:
            s += be64(gpa << 32)
    s += rec(0, EOS) + footer(2)
    s += part(2) + body_pages(tps) + rec(0, EOS) + footer(2)
    s += command(2, be32(8))
    s += end(2) + rec(0, EOS) + footer(2)
    return s + device_tail()


def body(tps, names):
    a, b = names
    p1, p2 = page(tps, 3), page(tps, 5)
    delta = b"\x00\x02\xc1\xb6\x06\x02\x69\x9b\x81\x01\x04abcd"  # onto page 0 of a
    comp = zlib.compress(p2)
    v = rec(0, PAGE, a) + p1
    v += rec(tps, ZERO | CONT) + b"\x00"
    v += rec(2 * tps, COMPRESS | CONT) + be32(len(comp)) + comp
    v += rec(0, XBZRLE | CONT) + b"\x01" + be16(len(delta)) + delta
    v += rec(0, FLUSH)
    v += rec(tps, PAGE, b) + p2
    v += rec(0, ZERO | CONT) + b"\x00"
    return v


def vmdesc_device_stream():
    """A FULL section `dev/x` decoded only through the vmdesc: every field type
    the vmdesc reader knows, a struct array and a subsection."""
    import json
    sub = {"vmsd_name": "x/sub", "version": 2,
           "fields": [{"name": "flag", "type": "bool", "size": 1}]}
    inner = {"vmsd_name": "pair", "version": 1,
             "fields": [{"name": "a", "type": "uint16", "size": 2}, {"name": "b", "type": "int8", "size": 1}]}
    dev = {"name": "dev/x", "instance_id": 1, "vmsd_name": "x", "version": 3,
           "fields": [
               {"name": "u8", "type": "uint8", "size": 1},
               {"name": "i32", "type": "int32", "size": 4},
               {"name": "u64", "type": "uint64", "size": 8, "array_len": 2},
               {"name": "t", "type": "timer", "size": 8},
               {"name": "buf", "type": "buffer", "size": 5},
               {"name": "pad", "type": "unused_buffer", "size": 3},
               {"name": "cfg", "type": "pci config", "size": 4},
               {"name": "p", "type": "struct", "size": 3, "array_len": 2, "struct": inner},
               {"name": "d", "type": "uint8", "size": 1, "index": 0},
               {"name": "d", "type": "uint8", "size": 1, "index": 1},
           ],
           "subsections": [sub]}
    j = json.dumps({"page_size": 4096, "devices": [dev]}, separators=(",", ":")).encode()
    body = b"\x01" + be32(0xFFFFFFF0) + be64(1) + be64(2) + b"\xff" * 8 + b"hello" + b"\0\0\0"
    body += b"\x86\x80\x00\x01" + be16(3) + b"\xfe" + be16(4) + b"\x05" + b"\x07\x08"
    body += b"\x05" + cstr("x/sub") + be32(2) + b"\x01"
    s = b"QEVM" + be32(3) + config("pc-q35-7.2")
    s += b"\x04" + be32(9) + cstr("dev/x") + be32(1) + be32(3) + body + footer(9)
    return s + b"\x00\x06" + be32(len(j)) + j


uuid = bytes(range(16))
seeds = {
    "synth-caps-4k": stream(
        12, ["x-ignore-shared", "validate-uuid"], uuid,
        [("pc.ram", 16 * 4096), ("/rom@etc/acpi/tables", 4 * 4096)],
        lambda tps: body(tps, ("pc.ram", "/rom@etc/acpi/tables"))),
    "synth-8k-pages": stream(
        13, [], None, [("mem", 8 * 8192), ("vga.vram", 4 * 8192)],
        lambda tps: body(tps, ("mem", "vga.vram"))),
}
seeds["synth-vmdesc-device"] = vmdesc_device_stream()
for name, data in seeds.items():
    with open(os.path.join(out, "seed-" + name), "wb") as f:
        f.write(data)


def multifd_zlib_channel():
    """Initial packet, SYNC, two zlib packets continuing one deflate stream
    (QEMU 7.2 ends each packet with Z_SYNC_FLUSH), SYNC."""
    def packet(flags, offsets, payload, num):
        h = be32(0x11223344) + be32(1) + be32(flags) + be32(128) + be32(len(offsets))
        h += be32(len(payload)) + be64(num) + bytes(32)
        h += b"mem".ljust(256, b"\0")
        h += b"".join(be64(o) for o in offsets) + bytes(8 * (128 - len(offsets)))
        return h + payload
    init = be32(0x11223344) + be32(1) + bytes(16) + b"\x00" + bytes(39)
    z = zlib.compressobj()
    p1 = b"".join(page(4096, k) for k in (3, 5, 7))
    c1 = z.compress(p1) + z.flush(zlib.Z_SYNC_FLUSH)
    p2 = page(4096, 9)
    c2 = z.compress(p2) + z.flush(zlib.Z_SYNC_FLUSH)
    v = init + packet(1, [], b"", 0)
    v += packet(2, [0, 4096, 3 * 4096], c1, 1)
    v += packet(2, [8 * 4096], c2, 2)
    return v + packet(1, [], b"", 3)


with open(os.path.join(corpus, "decode_multifd_channel", "seed-synth-zlib-channel"), "wb") as f:
    f.write(multifd_zlib_channel())


# The whole-path targets (recv_sink, incoming_guest): streams whose blocks are the
# harnesses' guest regions / RAM files (`a` 1 MiB, `pc.bios` 256 KiB, `mem` 8 MiB),
# with 1 KiB, 4 KiB and 64 KiB target pages.
whole = {
    "synth-a-bios-1k": stream(10, [], None, [("a", 1 << 20), ("pc.bios", 256 << 10)],
                              lambda tps: body(tps, ("a", "pc.bios"))),
    "synth-a-bios-4k": stream(12, [], None, [("a", 1 << 20), ("pc.bios", 256 << 10)],
                              lambda tps: body(tps, ("a", "pc.bios"))),
    "synth-a-bios-64k": stream(16, [], None, [("a", 1 << 20), ("pc.bios", 256 << 10)],
                               lambda tps: body(tps, ("a", "pc.bios"))),
    "synth-mem-4k": stream(12, [], None, [("mem", 8 << 20)], lambda tps: body(tps, ("mem", "mem"))),
}
for t in ("recv_sink", "incoming_guest"):
    os.makedirs(os.path.join(corpus, t), exist_ok=True)
    for name, data in whole.items():
        with open(os.path.join(corpus, t, "seed-" + name), "wb") as f:
            f.write(data)
