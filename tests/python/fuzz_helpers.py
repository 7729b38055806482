"""Shard mutation helpers shared by test_fuzz_smoke.py and tests/fuzz/fuzz_open.py (atheris).

``fix_checksums`` recomputes every CRC-32C it can locate in a (mutated) shard, the Python twin
of the fix-up in tests/fuzz/fuzz_shard.cpp, so that mutated lengths, counts and shapes reach
the parsers behind the checksums instead of stopping at the first one.
"""

from __future__ import annotations

import struct

_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _TABLE.append(_c)


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of ``data`` (docs/FORMAT.md §2.4)."""
    c = 0xFFFFFFFF
    t = _TABLE
    for b in data:
        c = t[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


assert crc32c(b"123456789") == 0xE3069283

_FRAME_MAGIC = 0x46525654


def _fix_header(b: bytearray, at: int) -> None:
    struct.pack_into("<I", b, at + 28, crc32c(bytes(b[at : at + 28])))


def fix_checksums(b: bytearray) -> None:
    """Recomputes shard header, frame header, meta, chunk table, chunk, index and footer CRCs."""
    size = len(b)
    if size < 32:
        return
    _fix_header(b, 0)
    pos = 32
    while size - pos >= 32:
        if struct.unpack_from("<I", b, pos)[0] != _FRAME_MAGIC:
            break
        kind = b[pos + 4]
        meta_len = struct.unpack_from("<I", b, pos + 8)[0]
        payload_len = struct.unpack_from("<Q", b, pos + 16)[0]
        m = pos + 32
        if meta_len > size - m:
            break
        if kind == 4 and meta_len >= 4:  # INDEX: fix each entry's header and meta copies
            count = struct.unpack_from("<I", b, m)[0]
            e = m + 4
            for _ in range(count):
                if m + meta_len - e < 40:
                    break
                ml = struct.unpack_from("<I", b, e + 16)[0]
                if ml > m + meta_len - e - 40:
                    break
                struct.pack_into("<I", b, e + 20, crc32c(bytes(b[e + 40 : e + 40 + ml])))
                _fix_header(b, e + 8)
                e += 40 + ml
        struct.pack_into("<I", b, pos + 12, crc32c(bytes(b[m : m + meta_len])))
        p = m + meta_len
        if payload_len >= 8 and payload_len <= size - p:
            n = struct.unpack_from("<I", b, p + 4)[0]
            table = 8 + 8 * n
            if table <= payload_len:
                struct.pack_into("<I", b, pos + 24, crc32c(bytes(b[p : p + table])))
                q = p + table
                for i in range(n):
                    sl = struct.unpack_from("<I", b, p + 8 + 8 * i)[0]
                    if sl > p + payload_len - q:
                        break
                    struct.pack_into("<I", b, p + 12 + 8 * i, crc32c(bytes(b[q : q + sl])))
                    q += sl
        _fix_header(b, pos)
        if payload_len > size - p:
            break
        pos = p + payload_len
    if size >= 64 and b[size - 32 : size - 24] == b"TVFOOTER":
        _fix_header(b, size - 32)


_INTERESTING = (
    0,
    1,
    0x7F,
    0x80,
    0xFF,
    0xFFFF,
    0x7FFFFFFF,
    0xFFFFFFFF,
    1 << 40,
    (1 << 63) - 1,
    1 << 64,
)


def mutate(data: bytes, rng) -> bytearray:
    """One random structural mutation of a shard: flips, overwritten integers, cuts, splices."""
    b = bytearray(data)
    op = rng.integers(6)
    n = len(b)
    if n == 0:
        return b
    if op == 0:  # bit flips
        for _ in range(int(rng.integers(1, 4))):
            b[int(rng.integers(n))] ^= 1 << int(rng.integers(8))
    elif op == 1:  # an "interesting" integer over a length / count / shape field
        v = _INTERESTING[int(rng.integers(len(_INTERESTING)))]
        width = (1, 2, 4, 8)[int(rng.integers(4))]
        at = int(rng.integers(max(1, n - width)))
        b[at : at + width] = (v % (1 << (8 * width))).to_bytes(width, "little")
    elif op == 2:  # truncation
        del b[int(rng.integers(n)) :]
    elif op == 3:  # duplicate a slice (overlapping frames, repeated entries)
        a = int(rng.integers(n))
        z = min(n, a + int(rng.integers(1, 256)))
        at = int(rng.integers(n))
        b[at:at] = b[a:z]
    elif op == 4:  # delete a slice
        a = int(rng.integers(n))
        del b[a : a + int(rng.integers(1, 128))]
    else:  # random bytes
        a = int(rng.integers(n))
        k = int(rng.integers(1, 16))
        b[a : a + k] = rng.integers(0, 256, size=k, dtype="u1").tobytes()
    return b


def fix_tensor_index_checksums(b: bytearray) -> None:
    """Recomputes the checksums of a (mutated) tensor index (FORMAT.md §3.8) where its layout
    can still be followed: every block's, the directory's, the header's."""
    if len(b) < 72:
        return
    ncommits, nnames, nshapes = struct.unpack_from("<III", b, 36)
    (dir_len,) = struct.unpack_from("<Q", b, 48)
    end = min(len(b), 72 + dir_len)
    pos = 72 + 32 * ncommits
    try:
        for _ in range(nshapes):
            pos += 1 + 8 * b[pos]
        for _ in range(nnames):
            off, count, _crc, nlen = struct.unpack_from("<QIIH", b, pos)
            if off + 168 * count <= len(b):
                struct.pack_into("<I", b, pos + 12, crc32c(bytes(b[off : off + 168 * count])))
            pos += 18 + nlen
    except (IndexError, struct.error):
        pass
    struct.pack_into("<I", b, 56, crc32c(bytes(b[72:end])))
    struct.pack_into("<I", b, 68, crc32c(bytes(b[:68])))


def run_mutations(path, fix, check, count, seed, typed_errors, finding) -> tuple:
    """Writes ``count`` mutations of the file at ``path`` (half with ``fix`` applied to their
    checksums) and calls ``check(fixed)`` after each. Returns (ok, typed): checks that passed
    and those that ended in one of ``typed_errors``. Anything else saves the mutation to
    ``finding``, prints the traceback and exits 1 (the caller is a child process)."""
    import sys
    import traceback

    import numpy as np

    good = open(path, "rb").read()
    rng = np.random.default_rng(seed)
    ok = typed = 0
    for _ in range(count):
        b = mutate(good, rng)
        fixed = bool(rng.integers(2))
        if fixed:
            fix(b)
        with open(path, "wb") as f:
            f.write(b)
        try:
            check(fixed)
            ok += 1
        except typed_errors:
            typed += 1
        except BaseException:
            with open(finding, "wb") as f:
                f.write(bytes(b))
            traceback.print_exc()
            sys.exit(1)
    return ok, typed
