"""``tensorvigil fsck``: finds every kind of damage, rebuilds missing indexes, destroys nothing."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import tensorvigil as tv
from tensorvigil.store.fsck import fsck

SHARD = os.path.join("rank-00000", "shard-00000000.tvs")


def _make_run(path, steps=5, **kw):
    values = {}
    with tv.StoreWriter(path, **kw) as w:
        for step in range(steps):
            for k in range(3):
                v = np.arange(3000, dtype=np.float32) * (step + 1) + k
                values[(f"t{k}", step)] = v
                w.write(f"t{k}", step, v)
            w.commit(step)
    return values


def _read_all(path, strict=True):
    run = tv.open(path, strict=strict)
    return {
        (n, s): run.tensor(n).value(s) for n in run.tensor_names() for s in run.tensor(n).steps()
    }


def _cli(*args):
    r = subprocess.run(
        [sys.executable, "-m", "tensorvigil", "fsck", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return r.returncode, r.stdout + r.stderr


def _frame_ends(data: bytes):
    """Offsets after each frame of a shard (walking frame headers)."""
    pos, ends = 32, []
    while pos + 32 <= len(data):
        meta_len = int.from_bytes(data[pos + 8 : pos + 12], "little")
        payload_len = int.from_bytes(data[pos + 16 : pos + 24], "little")
        if data[pos + 4] == 4:  # INDEX
            break
        pos += 32 + meta_len + payload_len
        ends.append(pos)
    return ends


def test_clean_run_is_clean_and_cli_exits_0(tmp_run):
    _make_run(tmp_run)
    rep = fsck(tmp_run)
    assert rep.clean, rep.to_json()
    assert [s.state for s in rep.shards] == ["ok"]
    assert rep.shards[0].values_checked == 15
    code, out = _cli(tmp_run)
    assert code == 0, out
    assert "15 values verified" in out
    code, out = _cli(tmp_run, "--json")
    assert code == 0 and json.loads(out)["clean"] is True


def test_not_a_run_is_exit_2(tmp_path):
    code, out = _cli(str(tmp_path / "nothing"))
    assert code == 2 and "not a tensorvigil run" in out


def test_unsealed_shard_is_reported_and_repaired_without_losing_bytes(tmp_run):
    values = _make_run(tmp_run)
    shard = os.path.join(tmp_run, SHARD)
    good = Path(shard).read_bytes()
    ends = _frame_ends(good)
    # Cut inside the 4th step's frames: 3 complete steps, a partial step, then a torn frame.
    cut = ends[4 * 3 + 1] + 17
    Path(shard).write_bytes(good[:cut])
    before = _read_all(tmp_run)
    assert sorted({s for _, s in before}) == [0, 1, 2]

    rep = fsck(tmp_run)
    (s,) = rep.shards
    assert s.state == "unsealed" and s.index_state == "absent" and s.needs_repair
    assert s.discard_frames == 2 and s.discard_bytes == cut - ends[11]
    assert not rep.clean
    code, out = _cli(tmp_run)
    assert code == 1 and "UNSEALED" in out and "--repair" in out

    code, out = _cli(tmp_run, "--repair")
    assert code == 1 and "REPAIRED" in out, out
    tail = Path(f"{shard}.tail-{ends[11]}")
    assert tail.read_bytes() == good[ends[11] : cut]  # nothing destroyed
    fixed = Path(shard).read_bytes()
    assert fixed[: ends[11]] == good[: ends[11]]  # committed bytes kept verbatim
    assert fixed[-32:-24] == b"TVFOOTER"
    after = _read_all(tmp_run)
    assert after.keys() == before.keys()
    for k, v in after.items():
        np.testing.assert_array_equal(v, values[k])
    rep = fsck(tmp_run)
    assert rep.clean and rep.shards[0].state == "ok"
    assert _cli(tmp_run)[0] == 0


def test_damaged_footer_and_index_are_rebuilt(tmp_run):
    values = _make_run(tmp_run)
    shard = os.path.join(tmp_run, SHARD)
    good = Path(shard).read_bytes()
    # Damaged footer: the reader falls back to scanning; fsck rebuilds the footer and index.
    bad = bytearray(good)
    bad[-10] ^= 0xFF
    Path(shard).write_bytes(bytes(bad))
    rep = fsck(tmp_run, repair=True)
    assert rep.shards[0].index_state == "footer_damaged"
    assert rep.repaired
    assert Path(shard).read_bytes() == good  # same frames, so the same index and footer
    assert Path(
        f"{shard}.tail-{len(good) - len(bad) + int.from_bytes(good[-24:-16], 'little')}"
    ).read_bytes() == bytes(bad[int.from_bytes(good[-24:-16], "little") :])
    assert fsck(tmp_run).clean
    assert _read_all(tmp_run).keys() == values.keys()
    # Damaged index (footer intact). A reader opening the shard through its tensor index never
    # decodes the shard's index and still serves only verified values; without the tensor
    # index, strict readers refuse the shard until fsck rebuilds its index.
    Path(shard).write_bytes(good)
    index_off = int.from_bytes(good[-24:-16], "little")
    bad = bytearray(good)
    bad[index_off + 32 + 50] ^= 0x01
    Path(shard).write_bytes(bytes(bad))
    got = _read_all(tmp_run)
    assert got.keys() == values.keys()
    for k, v in got.items():
        np.testing.assert_array_equal(v, values[k])
    tindex = Path(shard[:-1] + "t")
    tindex_bytes = tindex.read_bytes()
    tindex.unlink()
    with pytest.raises(tv.DataCorruptionError):
        _read_all(tmp_run)
    tindex.write_bytes(tindex_bytes)
    rep = fsck(tmp_run)
    assert rep.shards[0].index_state == "index_corrupt" and rep.shards[0].state == "damaged"
    for p in Path(shard).parent.glob("*.tail-*"):
        p.unlink()
    rep = fsck(tmp_run, repair=True)
    assert rep.repaired
    assert Path(shard).read_bytes() == good
    got = _read_all(tmp_run)
    assert got.keys() == values.keys()
    for k, v in got.items():
        np.testing.assert_array_equal(v, values[k])


def test_corrupt_value_is_reported_not_hidden(tmp_run):
    _make_run(tmp_run, codec="raw")
    shard = os.path.join(tmp_run, SHARD)
    data = bytearray(Path(shard).read_bytes())
    # Flip a byte deep inside the first frame's payload (raw float data).
    meta_len = int.from_bytes(data[32 + 8 : 32 + 12], "little")
    data[32 + 32 + meta_len + 100] ^= 0x40
    Path(shard).write_bytes(bytes(data))
    rep = fsck(tmp_run, repair=True)
    (s,) = rep.shards
    assert s.state == "corrupt" and not rep.repaired
    assert any("checksum mismatch in chunk 0" in p and "'t0' step 0" in p for p in s.problems)
    assert fsck(tmp_run, verify_values=False).clean  # structure is fine: only values were hit
    code, out = _cli(tmp_run)
    assert code == 1 and "CORRUPT" in out


def test_foreign_shard_and_bad_side_files(tmp_run):
    _make_run(tmp_run)
    Path(tmp_run, "rank-00000", "shard-00000001.tvs").write_bytes(b"\x7fELF" + os.urandom(200))
    Path(tmp_run, "collections.json").write_text("[1, 2")
    rep = fsck(tmp_run, repair=True)
    assert any("collections.json" in p for p in rep.problems)
    states = {s.seq: s.state for s in rep.shards}
    assert states == {0: "ok", 1: "corrupt"}
    assert not rep.repaired  # nothing to rebuild in a foreign file
    assert Path(tmp_run, "rank-00000", "shard-00000001.tvs").stat().st_size == 204


WRITER = textwrap.dedent(
    """
    import sys, numpy as np, tensorvigil as tv
    w = tv.StoreWriter(sys.argv[1], fsync=False)
    step = 0
    while True:
        w.write("x", step, np.full(20000, step, dtype=np.float32))
        w.commit(step)
        w.flush()
        if step == 5:
            print("ready", flush=True)
        step += 1
    """
)


def test_live_writer_is_not_touched_then_killed_writer_is_repaired(tmp_run):
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, tmp_run], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        rep = fsck(tmp_run, repair=True)
        (s,) = rep.shards
        assert s.state == "live" and not rep.repaired and rep.clean
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
    steps_before = tv.open(tmp_run).steps()
    rep = fsck(tmp_run, repair=True)
    assert rep.shards[0].state == "unsealed" and len(rep.repaired) == 1
    run = tv.open(tmp_run)
    assert run.steps() == steps_before
    np.testing.assert_array_equal(
        run.tensor("x").value(steps_before[-1]), np.full(20000, steps_before[-1], np.float32)
    )
    # The rank can be written again after the repair.
    with tv.StoreWriter(tmp_run) as w:
        w.write("x", 10_000, np.zeros(3, np.float32))
        w.commit(10_000)
    assert fsck(tmp_run).clean
    assert tv.open(tmp_run).steps()[-1] == 10_000


def test_repair_holds_the_rank_lock(tmp_run, monkeypatch):
    _make_run(tmp_run)
    shard = os.path.join(tmp_run, SHARD)
    good = Path(shard).read_bytes()
    Path(shard).write_bytes(good[:-40])
    import tensorvigil.store.fsck as F

    real = F._repair
    refused = []

    def slow_repair(rep, chk):
        with pytest.raises(tv.FailedPreconditionError, match="another writer"):
            tv.StoreWriter(tmp_run)
        refused.append(True)
        real(rep, chk)

    monkeypatch.setattr(F, "_repair", slow_repair)
    assert fsck(tmp_run, repair=True).repaired and refused
    with tv.StoreWriter(tmp_run):  # released afterwards
        pass
