"""atheris (coverage-guided, libFuzzer-driven) target for the Python side of opening a run:
``manifest.json``, ``collections.json``, ``findings.jsonl`` and a shard, through ``tv.open``,
``Run.collections()``, ``Run.findings()``, ``Run.stats()`` and every ``Tensor.value``.

Only tensorvigil errors may escape; anything else is a finding. The Python modules of
tensorvigil are instrumented for coverage; the native parsers are fuzzed with coverage by
tests/fuzz/fuzz_shard.cpp (tools/fuzz.sh).

Usage (pip install 'tensorvigil[fuzz]'):
    python tests/fuzz/fuzz_open.py build/fuzz/corpus_py -max_total_time=300
"""

import os
import shutil
import sys
import tempfile

import atheris

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

with atheris.instrument_imports(include=["tensorvigil"]):
    import numpy as np

    import tensorvigil as tv

from fuzz_helpers import fix_checksums  # noqa: E402

_SEED_SHARD = b""
_DIR = tempfile.mkdtemp(prefix="tv-fuzz-py-")
_RUN = os.path.join(_DIR, "run")


def _seed_shard() -> bytes:
    run = os.path.join(_DIR, "seed")
    with tv.StoreWriter(run, chunk_size=4096) as w:
        for step in range(2):
            w.write("w", step, np.linspace(-1, 1, 300, dtype=np.float32), hist_bins=4)
            w.write("i", step, np.arange(9, dtype=np.int16), exp_hist=True)
            w.commit(step)
    with open(os.path.join(run, "rank-00000", "shard-00000000.tvs"), "rb") as f:
        data = f.read()
    shutil.rmtree(run)
    return data


def _write(name: str, data: bytes) -> None:
    with open(os.path.join(_RUN, name), "wb") as f:
        f.write(data)


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    manifest = (
        fdp.PickValueInList(
            [
                b'{"format": "tensorvigil-store", "format_version": [1, 0]}',
                b'{"format": "tensorvigil-store", "format_version": [1, 0], "x": [[[[]]]]}',
            ]
        )
        if fdp.ConsumeBool()
        else fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 200))
    )
    collections = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 200))
    findings = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 300))
    shard = bytearray(_SEED_SHARD)
    for _ in range(fdp.ConsumeIntInRange(0, 4)):  # structured edits of the seed shard
        if not shard:
            break
        at = fdp.ConsumeIntInRange(0, len(shard) - 1)
        shard[at : at + 8] = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 8))
    if fdp.ConsumeBool():
        del shard[fdp.ConsumeIntInRange(0, len(shard)) :]
    if fdp.ConsumeBool():
        fix_checksums(shard)
    shutil.rmtree(_RUN, ignore_errors=True)
    os.makedirs(os.path.join(_RUN, "rank-00000"))
    _write("manifest.json", manifest)
    if collections:
        _write("collections.json", collections)
    if findings:
        _write("findings.jsonl", findings)
    _write(os.path.join("rank-00000", "shard-00000000.tvs"), bytes(shard))
    try:
        run = tv.open(_RUN, strict=fdp.ConsumeBool())
        run.collections()
        run.findings()
        run.stats()
        for name in run.tensor_names():
            t = run.tensor(name)
            for s in t.steps():
                t.stats(s)
                try:
                    t.value(s)
                except tv.TensorVigilError:
                    pass
    except tv.TensorVigilError:
        pass


def main() -> None:
    global _SEED_SHARD
    _SEED_SHARD = _seed_shard()
    atheris.Setup(sys.argv, test_one_input)
    try:
        atheris.Fuzz()
    finally:
        shutil.rmtree(_DIR, ignore_errors=True)


if __name__ == "__main__":
    main()
