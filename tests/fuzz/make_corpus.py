"""Writes the fuzz seed corpus: a control byte + the bytes of shard files of small real runs
(every codec, histograms, stats-only frames, sealed and unsealed, several steps), one file per
shard and control byte.

Usage: python tests/fuzz/make_corpus.py OUT_DIR
"""

import os
import shutil
import sys
import tempfile

import numpy as np

import tensorvigil as tv


def _runs(tmp):
    rng = np.random.default_rng(0)
    for i, codec in enumerate(("raw", "zstd", "shuffle-zstd")):
        run = os.path.join(tmp, f"run{i}")
        with tv.StoreWriter(run, codec=codec, chunk_size=4096) as w:
            for step in range(2):
                w.write("w", step, rng.standard_normal(1500).astype(np.float32), hist_bins=8)
                w.write("b", step, np.arange(7, dtype=np.int64), exp_hist=True)
                w.write("h", step, rng.standard_normal((3, 5)).astype(np.float16))
                w.write("s", step, np.float64(step), stats_only=True)
                w.write("e", step, np.zeros((0, 3), np.float32))
                w.commit(step)
        yield run, True
    # Unsealed: a writer that never closed (kill is simulated by not closing, fsync off).
    run = os.path.join(tmp, "live")
    w = tv.StoreWriter(run, fsync=False)
    w.write("x", 0, np.ones(300, np.float32))
    w.commit(0)
    w.write("x", 1, np.ones(300, np.float32))
    w.flush()
    yield run, False
    w.close()


def main(out: str) -> int:
    os.makedirs(out, exist_ok=True)
    tmp = tempfile.mkdtemp()
    n = 0
    try:
        for run, _sealed in _runs(tmp):
            rank = os.path.join(run, "rank-00000")
            for name in sorted(os.listdir(rank)):
                if name.endswith(".tvs"):
                    data = open(os.path.join(rank, name), "rb").read()
                    for control in (0, 1):  # even: the harness fixes checksums; odd: as is
                        with open(os.path.join(out, f"seed-{n:03d}-{control}"), "wb") as f:
                            f.write(bytes([control]) + data)
                    n += 1
    finally:
        shutil.rmtree(tmp)
    print(f"{2 * n} seeds in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
