"""Writes the golden run of tensorvigil-store v1 (tests/data/format_v1/run).

The run is committed; tests read it back so the format cannot drift silently. Only rerun this
(and commit the result) when the format version changes.

    python tests/data/format_v1/make_golden.py
"""

import os
import shutil

import ml_dtypes
import numpy as np

import tensorvigil as tv

HERE = os.path.dirname(os.path.abspath(__file__))


def golden_tensors(step: int) -> dict:
    """The deterministic content of each step (also used by the tests)."""
    base = np.arange(24, dtype=np.float64).reshape(4, 6) / 8.0 - 1.0 + step
    return {
        "fc1.weight": base.astype(np.float32),
        "fc1.weight/grad": (base * 1e-3).astype(np.float32),
        "fc1.bias": np.array([0.5, -0.25, np.nan, np.inf], dtype=np.float32),
        "emb.weight": base.astype(ml_dtypes.bfloat16),
        "half": base.astype(np.float16),
        "double": base,
        "fp8": base.astype(ml_dtypes.float8_e4m3fn),
        "ids": np.arange(10, dtype=np.int64) * (step + 1),
        "mask": np.arange(7) % 2 == 0,
        "loss": np.float32(2.0 / (step + 1)),
        "relu1/input": base.astype(np.float32),
    }


def main() -> None:
    out = os.path.join(HERE, "run")
    shutil.rmtree(out, ignore_errors=True)
    # roll_bytes=1: every commit seals the shard, so the run holds several sealed shards.
    with tv.StoreWriter(out, roll_bytes=1) as w:
        for step in range(3):
            mode = "eval" if step == 2 else "train"
            for name, value in golden_tensors(step).items():
                codec = {"fc1.weight": "raw", "ids": "zstd"}.get(name)
                w.write(
                    name,
                    step,
                    value,
                    mode=mode,
                    mode_step=0 if step == 2 else step,
                    stats_only=name == "relu1/input",
                    hist_bins=8 if name == "fc1.weight/grad" else 0,
                    exp_hist=name == "fc1.weight/grad",
                    codec=codec,
                )
            w.commit(step, mode=mode, mode_step=0 if step == 2 else step)
    with tv.StoreWriter(out, rank=1) as w:
        w.write("fc1.weight", 0, golden_tensors(0)["fc1.weight"])
        w.commit(0)
    os.remove(os.path.join(out, "rank-00000", "writer.lock"))
    os.remove(os.path.join(out, "rank-00001", "writer.lock"))
    print("wrote", out)


if __name__ == "__main__":
    main()
