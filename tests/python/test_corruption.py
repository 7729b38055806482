"""Corrupt, truncated and foreign files raise DataCorruptionError; they never crash or hang."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

import tensorvigil as tv


def _make_run(path, steps=4):
    rng = np.random.default_rng(0)
    values = {}
    with tv.StoreWriter(path) as w:
        for step in range(steps):
            for k in range(3):
                v = rng.standard_normal(2000).astype(np.float32)
                values[(k, step)] = v
                w.write(f"t{k}", step, v)
            w.commit(step)
    return values, os.path.join(path, "rank-00000", "shard-00000000.tvs")


def _read_all(path):
    run = tv.open(path)
    out = {}
    for name in run.tensor_names():
        t = run.tensor(name)
        for step in t.steps():
            out[(int(name[1:]), step)] = t.value(step)
    return out


def test_bit_flips_are_detected_or_harmless(tmp_run):
    values, shard = _make_run(tmp_run)
    good = Path(shard).read_bytes()
    rng = np.random.default_rng(7)
    detected = 0
    for pos in rng.choice(len(good), size=150, replace=False):
        bad = bytearray(good)
        bad[pos] ^= 1 << int(rng.integers(8))
        Path(shard).write_bytes(bytes(bad))
        try:
            got = _read_all(tmp_run)
        except tv.DataCorruptionError:
            detected += 1
            continue
        # Undetected flips (footer, commit copies in a sealed shard) change nothing served.
        assert got.keys() == values.keys()
        for k, v in got.items():
            np.testing.assert_array_equal(v, values[k])
    assert detected > 100


def test_truncation_keeps_a_prefix_of_committed_steps(tmp_run):
    values, shard = _make_run(tmp_run, steps=6)
    good = Path(shard).read_bytes()
    for cut in range(0, len(good), max(1, len(good) // 60)):
        Path(shard).write_bytes(good[:cut])
        got = _read_all(tmp_run)
        steps = sorted({s for _, s in got})
        assert steps == list(range(len(steps)))
        for k, v in got.items():
            np.testing.assert_array_equal(v, values[k])


def test_foreign_and_bad_manifest(tmp_run):
    _make_run(tmp_run)
    manifest = os.path.join(tmp_run, "manifest.json")
    doc = json.loads(Path(manifest).read_text())
    Path(manifest).write_text(json.dumps({**doc, "format_version": [2, 0]}))
    with pytest.raises(tv.DataCorruptionError, match="format version"):
        tv.open(tmp_run)
    Path(manifest).write_text("{not json")
    with pytest.raises(tv.DataCorruptionError, match="not valid JSON"):
        tv.open(tmp_run)
    Path(manifest).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(tv.DataCorruptionError, match="manifest"):
        tv.open(tmp_run)


def test_non_strict_open_reports_problems(tmp_run):
    values, shard = _make_run(tmp_run, steps=6)
    good = Path(shard).read_bytes()
    # Without the footer the shard is scanned; damage a frame header in the middle.
    bad = bytearray(good[: len(good) - 32])
    pos = 32
    while pos < len(bad) // 2:
        meta_len = int.from_bytes(bad[pos + 8 : pos + 12], "little")
        payload_len = int.from_bytes(bad[pos + 16 : pos + 24], "little")
        pos += 32 + meta_len + payload_len
    bad[pos] ^= 0xFF
    Path(shard).write_bytes(bytes(bad))
    with pytest.raises(tv.DataCorruptionError, match="corrupt frame header"):
        tv.open(tmp_run)
    run = tv.open(tmp_run, strict=False)
    assert len(run.problems) == 1 and "shard-00000000.tvs" in run.problems[0]
    assert 0 < len(run.steps()) < 6
