#!/usr/bin/env python3
"""Turns recorded Postgres traffic into seeds for the fuzz targets.

Usage: fuzz-corpus.py CAPTURE_DIR [OUT_DIR]

CAPTURE_DIR holds one pair of files per connection, NNN-c2s (what the client
sent) and NNN-s2c (what the server sent), as a byte-for-byte TCP relay between
psql / pgbench / a driver and Postgres writes them (see docs/fuzzing.md).
OUT_DIR (default router/fuzz-corpus) gets <target>/seed-* files in each
target's input format (see router/src/fuzz/).
"""
import hashlib
import os
import struct
import sys

TYPES = [16, 21, 23, 20, 26, 701, 1700, 25, 1042, 2950, 1082, 1114]
MAX = 4096


def startup_frames(b):
    """Untagged frames up to and including the StartupMessage; the rest."""
    out, i = [], 0
    while i + 8 <= len(b):
        n = struct.unpack(">i", b[i:i + 4])[0]
        code = struct.unpack(">i", b[i + 4:i + 8])[0]
        out.append(b[i:i + n])
        i += n
        if code == 196608:
            break
    return out, b[i:]


def tagged_frames(b):
    out, i = [], 0
    while i + 5 <= len(b):
        n = struct.unpack(">i", b[i + 1:i + 5])[0]
        if n < 4 or i + 1 + n > len(b):
            break
        out.append(b[i:i + 1 + n])
        i += 1 + n
    return out


def u16(v):
    return struct.pack("<H", v)


def main():
    cap = sys.argv[1]
    out = sys.argv[2] if len(sys.argv) > 2 else os.path.join(os.path.dirname(__file__), "..", "router", "fuzz-corpus")
    seeds = {t: set() for t in ["frames", "startup", "sql", "copy", "values", "scram"]}
    for name in sorted(os.listdir(cap)):
        if not name.endswith("-c2s"):
            continue
        c2s = open(os.path.join(cap, name), "rb").read()
        s2c_path = os.path.join(cap, name[:-4] + "-s2c")
        s2c = open(s2c_path, "rb").read() if os.path.exists(s2c_path) else b""
        starts, rest = startup_frames(c2s)
        seeds["startup"].add(b"".join(starts))
        seeds["frames"].add(b"\x07\x05\x00\x00" + b"".join(starts))
        frames = tagged_frames(rest)
        # Client streams: the first frames whole, as they came.
        stream = b""
        for f in frames:
            if len(stream) + len(f) > MAX:
                break
            stream += f
        seeds["frames"].add(b"\x06\x07\x00\x00" + stream)
        copy = b""
        sasl = []
        for f in frames:
            tag, body = f[:1], f[5:]
            if tag == b"Q":
                seeds["sql"].add(b"\x01\x05\x09\x0d\x00\x02\x06\x0a" + body.rstrip(b"\0"))
            elif tag == b"P":
                q = body.split(b"\0")
                if len(q) > 1:
                    seeds["sql"].add(b"\x03\x04\x08\x0c\x10\x14\x18\x1c" + q[1])
            elif tag == b"d":
                copy += body
            elif tag == b"p":
                sasl.append(body)
        if copy:
            csv = b"," in copy.split(b"\n")[0] and b"\t" not in copy
            lines = copy.split(b"\n")
            data = b""
            for line in lines:
                if len(data) + len(line) + 1 > MAX - 16:
                    break
                data += line + b"\n"
            head = bytes([1 if csv else 0]) + u16(1 if csv else 0) + u16(0) + u16(4000) + b"\x05\x40\x00\x00"
            seeds["copy"].add(head + data)
            head = bytes([1 if csv else 0]) + u16(1 if csv else 0) + u16(1) + u16(200) + b"\x03\x11\x00\x00"
            seeds["copy"].add(head + data)
        if sasl:
            seeds["scram"].add(b"\x00" + b"|".join(sasl))
        # Server streams: skip the answer to an SSLRequest.
        srv = s2c[1:] if s2c[:1] in (b"N", b"S") else s2c
        sframes = tagged_frames(srv)
        auth = b"".join(f for f in sframes[:6] if f[:1] in (b"R", b"S", b"K", b"Z"))
        seeds["scram"].add(b"\x02" + auth[:MAX])
        stream = b""
        for f in sframes:
            if len(stream) + len(f) > MAX:
                break
            stream += f
        seeds["frames"].add(b"\x06\x0b\x00\x00" + stream)
        types = []
        columns = {}
        for f in sframes:
            tag, body = f[:1], f[5:]
            if tag == b"T":
                n = struct.unpack(">h", body[:2])[0]
                i, types = 2, []
                for _ in range(n):
                    j = body.index(b"\0", i)
                    oid = struct.unpack(">i", body[j + 7:j + 11])[0]
                    types.append(oid)
                    i = j + 19
            elif tag == b"D":
                n = struct.unpack(">h", body[:2])[0]
                i = 2
                for c in range(n):
                    ln = struct.unpack(">i", body[i:i + 4])[0]
                    i += 4
                    if ln >= 0:
                        if c < len(types) and types[c] in TYPES:
                            columns.setdefault(types[c], []).append(body[i:i + ln])
                        i += ln
        for oid, vals in columns.items():
            vals = sorted(set(vals))[:6]
            for a in vals:
                for b in vals[:3]:
                    seeds["values"].add(u16(TYPES.index(oid)) + a + b"\0" + b)
    # The mutated-client mode of the SCRAM target: each step, each kind of change.
    for step in range(3):
        for how in range(4):
            seeds["scram"].add(b"\x01" + u16(step) + u16(17 + step * 5) + bytes([how]) + b"x=")
    seeds["scram"].add(b"\x01" + u16(0) + u16(0) + b"\x02")  # inserts nothing: logs in
    for target, items in seeds.items():
        d = os.path.join(out, target)
        os.makedirs(d, exist_ok=True)
        for s in sorted(items):
            if not s:
                continue
            h = hashlib.sha1(s).hexdigest()[:16]
            with open(os.path.join(d, "seed-" + h), "wb") as fh:
                fh.write(s[:MAX])
        print(target, len(items))


if __name__ == "__main__":
    main()
