"""Tensor indexes (FORMAT.md §3.8): a run opens from their directories, a query loads only its
tensor, a live reader picks up newly sealed shards, and fsck checks and rewrites them."""

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

import tensorvigil as tv
from tensorvigil import _core
from tensorvigil.store.fsck import fsck

NAMES = ["conv.weight", "conv.weight/grad", "fc.bias", "loss"]


def _write(run_dir, ranks=2, steps=40, roll_bytes=6000):
    for rank in range(ranks):
        with tv.StoreWriter(run_dir, rank, roll_bytes=roll_bytes, fsync=False) as w:
            for step in range(steps):
                for k, name in enumerate(NAMES):
                    v = np.random.default_rng(step * 7 + k + 100 * rank).standard_normal(32)
                    w.write(name, step, v.astype(np.float32), stats_only=k == 1)
                w.commit(step, mode="eval" if step % 10 == 9 else "train")


def _sorted(table):
    d = table.to_pydict()
    d["tensor"] = [str(x) for x in d["tensor"]]
    keys = sorted(range(table.num_rows), key=lambda i: (d["tensor"][i], d["rank"][i], d["step"][i]))
    return {k: [v[i] for i in keys] for k, v in d.items()}


def _eager_columns(run_dir, name):
    r = _core.RunReader(run_dir, True, False)
    return r.stats_columns(name_ids=[r.name_id(name)])


def test_open_reads_directories_and_a_query_loads_one_tensor(tmp_path):
    run_dir = str(tmp_path / "run")
    _write(run_dir)
    shards = sorted(Path(run_dir).glob("rank-*/shard-*.tvs"))
    assert len(shards) > 6
    assert all(Path(str(s)[:-1] + "t").exists() for s in shards)  # every shard is sealed
    run = tv.open(run_dir)
    total = 2 * 40 * len(NAMES)
    assert run._r.num_deferred_records() == total  # nothing decoded at open...
    assert run.ranks() == [0, 1] and run.steps() == list(range(40))  # ...yet steps and names
    assert run.tensor_names() == sorted(NAMES)
    # One rank's record of one tensor loads that tensor of that rank only.
    assert run.tensor("loss").record(5, rank=1).stats.numel == 32
    assert run._r.num_deferred_records() == total - 40
    assert run.stats("loss", ranks=[1]).num_rows == 40
    assert run._r.num_deferred_records() == total - 40
    total -= 40
    table = run.stats("fc.bias")
    assert table.num_rows == 80
    assert run._r.num_deferred_records() == total - 80  # only that tensor was loaded
    eager = _eager_columns(run_dir, "fc.bias")
    got = _sorted(table)
    order = np.lexsort((eager["step"], eager["rank"]))
    for col in ("rank", "step", "mode", "numel", "mean", "l2", "has_value", "wall_time"):
        np.testing.assert_array_equal(np.asarray(got[col]), eager[col][order], err_msg=col)
    # Values and records go through the same lazily loaded table.
    np.testing.assert_array_equal(
        run.tensor("conv.weight").value(7, rank=1),
        np.random.default_rng(7 * 7 + 0 + 100).standard_normal(32).astype(np.float32),
    )
    assert run.tensor("conv.weight/grad").steps(rank=1) == list(range(40))
    # A query over every tensor loads the rest and agrees with the eager reader row for row.
    everything = _sorted(run.stats())
    assert run._r.num_deferred_records() == 0
    r = _core.RunReader(run_dir, True, False)
    cols = r.stats_columns()
    assert len(everything["step"]) == len(cols["step"]) == total + 40
    assert sorted(everything["mean"]) == sorted(cols["mean"].tolist())
    assert run.problems == []


def test_live_reader_defers_newly_sealed_shards(tmp_path):
    run_dir = str(tmp_path / "run")
    w = tv.StoreWriter(run_dir, 0, roll_bytes=4000, fsync=False)
    for step in range(10):
        w.write("x", step, np.full(16, step, np.float32))
        w.write("y", step, np.full(16, -step, np.float32))
        w.commit(step)
    w.flush()
    run = tv.open(run_dir)
    assert run.stats("x").num_rows == 10
    before = run._r.num_deferred_records()
    for step in range(10, 30):
        w.write("x", step, np.full(16, step, np.float32))
        w.write("y", step, np.full(16, -step, np.float32))
        w.commit(step)
    w.flush()
    assert run.refresh() == 20
    assert run._r.num_deferred_records() > before  # new sealed shards were deferred
    x = run.stats("x")
    assert sorted(x.column("step").to_pylist()) == list(range(30))
    assert sorted(x.column("mean").to_pylist()) == [float(s) for s in range(30)]
    assert run.tensor("y").value(25)[0] == -25
    w.close()
    run.refresh()
    assert run.ended(0)
    assert sorted(run.stats("y").column("step").to_pylist()) == list(range(30))


def test_reader_follows_a_writer_that_rolls_while_it_reads(tmp_path):
    """Queries from another thread while the writer rolls shards see consistent prefixes."""
    run_dir = str(tmp_path / "run")
    w = tv.StoreWriter(run_dir, 0, roll_bytes=3000, fsync=False)
    w.write("x", 0, np.zeros(8, np.float32))
    w.commit(0)
    w.flush()
    run = tv.open(run_dir)
    done = threading.Event()
    seen = []

    def read():
        while not done.is_set():
            run.refresh()
            steps = sorted(run.stats("x").column("step").to_pylist())
            assert steps == list(range(len(steps)))
            seen.append(len(steps))

    t = threading.Thread(target=read)
    t.start()
    for step in range(1, 300):
        w.write("x", step, np.full(8, step, np.float32))
        w.commit(step)
        if step % 50 == 0:
            w.flush()
    w.close()
    time.sleep(0.2)
    done.set()
    t.join(30)
    run.refresh()
    assert sorted(run.stats("x").column("step").to_pylist()) == list(range(300))
    assert seen and seen == sorted(seen)


def _fsck_cli(run_dir, *args):
    r = subprocess.run(
        [sys.executable, "-m", "tensorvigil", "fsck", run_dir, "--json", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return r.returncode, json.loads(r.stdout)


def test_fsck_finds_and_rewrites_damaged_and_stale_tensor_indexes(tmp_path):
    run_dir = str(tmp_path / "run")
    _write(run_dir, ranks=1)
    tvts = sorted(Path(run_dir).glob("rank-00000/shard-*.tvt"))
    originals = {p: p.read_bytes() for p in tvts}
    want = tv.open(run_dir).stats().num_rows
    assert fsck(run_dir).clean
    # One flipped byte in a record block; another shard's index put in place of a third's.
    bad = bytearray(originals[tvts[0]])
    bad[-9] ^= 0x04
    tvts[0].write_bytes(bytes(bad))
    shutil.copyfile(tvts[1], tvts[2])
    # Readers are not misled: they note it and read those shards through their own index
    # (one tensor at a time, so that the damaged block is read).
    run = tv.open(run_dir)
    assert sum(run.stats(n).num_rows for n in NAMES) == want
    assert len(run.problems) == 2 and all("instead" in p for p in run.problems)
    code, rep = _fsck_cli(run_dir)
    assert code == 1 and not rep["clean"]
    states = {Path(s["path"]).name: s for s in rep["shards"]}
    s0, s2 = states[tvts[0].name[:-1] + "s"], states[tvts[2].name[:-1] + "s"]
    assert s0["tensor_index"] == "corrupt" and s0["state"] == "damaged"
    assert s2["tensor_index"] == "stale" and "tensor index stale" in s2["problems"][0]
    assert sum(s["tensor_index"] == "ok" for s in rep["shards"]) == len(tvts) - 2
    code, rep = _fsck_cli(run_dir, "--repair")
    assert code == 1 and len(rep["repaired"]) == 2
    for p, b in originals.items():
        assert p.read_bytes() == b  # rewritten byte for byte
    assert fsck(run_dir).clean
    run = tv.open(run_dir)
    assert run.stats().num_rows == want and run.problems == []


def test_fsck_repair_of_a_crashed_shard_writes_its_tensor_index(tmp_path):
    run_dir = str(tmp_path / "run")
    code = (
        "import os, sys, numpy as np, tensorvigil as tv\n"
        "w = tv.StoreWriter(sys.argv[1], fsync=False)\n"
        "for s in range(6):\n"
        "    w.write('x', s, np.full(64, s, np.float32)); w.commit(s)\n"
        "w.flush(sync=True)\n"
        "os._exit(0)\n"  # no close: the shard stays unsealed
    )
    subprocess.run([sys.executable, "-c", code, run_dir], check=True, timeout=120)
    shard = Path(run_dir, "rank-00000", "shard-00000000.tvs")
    assert not Path(str(shard)[:-1] + "t").exists()
    rep = fsck(run_dir, repair=True)
    assert rep.repaired and "tensor index" in rep.shards[0].action
    assert rep.shards[0].tensor_index == "ok"
    assert Path(str(shard)[:-1] + "t").exists()
    run = tv.open(run_dir)
    assert run._r.num_deferred_records() == 6  # opened through the new tensor index
    assert sorted(run.stats("x").column("mean").to_pylist()) == [float(s) for s in range(6)]
    assert fsck(run_dir).clean


def test_readers_ignore_tensor_indexes_they_cannot_use(tmp_path):
    """An empty file, or one for a shard that is not sealed, never stops a reader."""
    run_dir = str(tmp_path / "run")
    _write(run_dir, ranks=1, steps=10)
    for p in Path(run_dir).glob("rank-00000/shard-*.tvt"):
        p.write_bytes(b"")
    run = tv.open(run_dir)
    assert run.stats("loss").num_rows == 10
    assert run._r.num_deferred_records() == 0
    assert all("truncated" in p for p in run.problems)
