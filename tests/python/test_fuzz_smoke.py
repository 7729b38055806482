"""CI-sized fuzzing of the reader: thousands of mutated shards through ``tv.open`` must end in
correct data or a typed tensorvigil error, never a crash, a hang or an untyped exception.

The reader runs in a subprocess, so a segfault or an abort fails the test instead of killing
pytest. The coverage-guided fuzzers are tests/fuzz/fuzz_shard.cpp (libFuzzer, tools/fuzz.sh)
and tests/fuzz/fuzz_open.py (atheris); fixed findings are replayed from tests/fuzz/regressions.
"""

import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from fuzz_helpers import crc32c, fix_checksums

import tensorvigil as tv

HERE = os.path.dirname(os.path.abspath(__file__))

CHILD = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    sys.path.insert(0, sys.argv[4])
    import tensorvigil as tv
    from fuzz_helpers import fix_checksums, run_mutations

    run, seed, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    shard = os.path.join(run, "rank-00000", "shard-00000000.tvs")
    z = np.load(os.path.join(run, "expected.npz"))
    expected = {"t0": z["t0"], "t1": z["t1"].astype(np.float16), "t2": z["t2"].astype(np.int32)}
    typed = 0

    def check(fixed):
        global typed
        for strict in (True, False):
            r = tv.open(run, strict=strict)
            r.stats()
            for name in r.tensor_names():
                t = r.tensor(name)
                for s in t.steps():
                    t.stats(s)
                    try:
                        v = t.value(s)
                    except tv.TensorVigilError:
                        typed += 1
                        continue
                    # Without the checksum fix-up, a value that decodes is the original:
                    # corruption is detected or harmless, never served.
                    if not fixed:
                        np.testing.assert_array_equal(v, expected[name])

    ok, typed_opens = run_mutations(shard, fix_checksums, check, count, seed,
                                    tv.TensorVigilError, os.path.join(run, "finding.bin"))
    print(ok, typed + typed_opens)
    """
)


def _make_run(path):
    rng = np.random.default_rng(3)
    vals = {f"t{k}": rng.standard_normal(200 + 37 * k).astype(np.float32) for k in range(3)}
    with tv.StoreWriter(path, chunk_size=4096) as w:
        for step in range(3):
            w.write("t0", step, vals["t0"], hist_bins=4)
            w.write("t1", step, vals["t1"].astype(np.float16), codec="zstd")
            w.write("t2", step, vals["t2"].astype(np.int32), exp_hist=True)
            w.write("s", step, np.float64(step), stats_only=True)
            w.commit(step)
    np.savez(os.path.join(path, "expected.npz"), **vals)


@pytest.mark.parametrize("seed", [1])
def test_mutated_shards_give_data_or_typed_errors(tmp_run, seed):
    _make_run(tmp_run)
    r = subprocess.run(
        [sys.executable, "-c", CHILD, tmp_run, str(seed), "1000", HERE],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, f"finding saved in {tmp_run}/finding.bin:\n{r.stderr[-3000:]}"
    ok, typed = map(int, r.stdout.split())
    assert ok + typed >= 1000 and typed > 100 and ok > 50  # both paths were exercised


TINDEX_CHILD = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    sys.path.insert(0, sys.argv[4])
    import tensorvigil as tv
    from tensorvigil import _core
    from fuzz_helpers import fix_tensor_index_checksums, run_mutations

    run, seed, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    path = os.path.join(run, "rank-00000", "shard-00000000.tvt")

    def table(r):
        cols = r.stats_columns()
        order = np.lexsort((cols["step"], cols["name_id"]))
        return {k: v[order] for k, v in cols.items() if k != "name_id"}

    want = table(_core.RunReader(run, True, False))

    def check(fixed):
        for strict in (True, False):
            r = tv.open(run, strict=strict)
            for name in r.tensor_names():
                t = r.tensor(name)
                for s in t.steps():
                    t.stats(s)
                    t.value(s) if name != "s" else None
            got = table(r._r)
            # Unless the mutation came with valid checksums, the statistics are the shard's
            # own: a damaged tensor index is detected, never believed.
            if not fixed:
                for k in want:
                    np.testing.assert_array_equal(got[k], want[k], err_msg=k)

    ok, typed = run_mutations(path, fix_tensor_index_checksums, check, count, seed,
                              tv.TensorVigilError, os.path.join(run, "finding.bin"))
    print(ok, typed)
    """
)


def test_mutated_tensor_indexes_give_data_or_typed_errors(tmp_run):
    _make_run(tmp_run)
    r = subprocess.run(
        [sys.executable, "-c", TINDEX_CHILD, tmp_run, "2", "600", HERE],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, f"finding saved in {tmp_run}/finding.bin:\n{r.stderr[-3000:]}"
    ok, typed = map(int, r.stdout.split())
    assert ok + typed >= 600 and ok > 300  # a damaged tensor index is never an error by itself


def _sealed_shard(tmp_run):
    with tv.StoreWriter(tmp_run) as w:
        w.write("x", 0, np.arange(10, dtype=np.float32))
        w.commit(0)
    return Path(tmp_run, "rank-00000", "shard-00000000.tvs")


def test_footer_frame_count_is_bounded_before_allocation(tmp_run):
    """Fuzz finding (tests/fuzz/regressions/oom-footer-num-frames-reserve): the reader reserved
    its record table from the footer's frame count before checking the index, so a forged
    footer made it allocate up to 4G records (~770 GB)."""
    shard = _sealed_shard(tmp_run)
    b = bytearray(shard.read_bytes())
    struct.pack_into("<I", b, len(b) - 8, 0xFFFFFFFF)  # footer num_frames
    struct.pack_into("<I", b, len(b) - 4, crc32c(bytes(b[-32:-4])))
    shard.write_bytes(bytes(b))
    code = (
        "import sys, tensorvigil as tv\ntry:\n    tv.open(sys.argv[1])\n"
        "except tv.DataCorruptionError as e:\n    print('typed', e)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, tmp_run], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and r.stdout.startswith("typed") and "count" in r.stdout, r.stderr[
        -2000:
    ]


def test_index_entry_count_and_huge_lengths_are_bounded(tmp_run):
    shard = _sealed_shard(tmp_run)
    good = shard.read_bytes()
    index_off = struct.unpack_from("<Q", good, len(good) - 24)[0]
    cases = {
        "index count": (index_off + 32, "<I", 0xFFFFFFFF),
        "meta_len": (32 + 8, "<I", 0xFFFFFFF0),
        "payload_len": (32 + 16, "<Q", (1 << 40) - 1),
        "name_len": (32 + 32 + 28, "<H", 0xFFFF),
        "ndim": (32 + 32 + 18, "<B", 200),
    }
    for what, (at, fmt, value) in cases.items():
        b = bytearray(good)
        struct.pack_into(fmt, b, at, value)
        fix_checksums(b)
        shard.write_bytes(bytes(b))
        with pytest.raises(tv.DataCorruptionError):
            r = tv.open(tmp_run)
            r.tensor("x").value(0)
        # Unsealed (no footer): the scan path must bound the same fields.
        shard.write_bytes(bytes(b[:index_off]))
        try:
            r = tv.open(tmp_run)
            r.tensor("x").value(0)
        except tv.TensorVigilError:
            pass
        else:
            assert what == "index count", what  # the index is gone; the frames are intact


@pytest.mark.parametrize(
    "path", sorted(Path(HERE, "..", "fuzz", "regressions").glob("*")), ids=lambda p: p.name
)
def test_fuzz_regressions_replay(tmp_run, path):
    """Inputs of fixed findings (a control byte, then the shard; even: checksums fixed up)."""
    data = path.read_bytes()
    b = bytearray(data[1:])
    if data[0] % 2 == 0:
        fix_checksums(b)
    _sealed_shard(tmp_run).write_bytes(bytes(b))
    code = textwrap.dedent(
        """
        import sys, tensorvigil as tv
        for strict in (True, False):
            try:
                r = tv.open(sys.argv[1], strict=strict)
                for n in r.tensor_names():
                    for s in r.tensor(n).steps():
                        try:
                            r.tensor(n).value(s)
                        except tv.TensorVigilError:
                            pass
            except tv.TensorVigilError:
                pass
        print("ok")
        """
    )
    r = subprocess.run(
        [sys.executable, "-c", code, tmp_run], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
