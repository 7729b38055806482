"""Hostile input beyond fuzzing: crafted tensor names, code execution on open, webhooks that
never answer, malformed side files."""

import logging
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import tensorvigil as tv
from tensorvigil.rules.actions import Webhook
from tensorvigil.rules.base import Finding
from tensorvigil.store.fsck import fsck

PKG = Path(tv.__file__).parent

HOSTILE_NAMES = [
    "../../etc/x",
    "../../../../../../tmp/escape",
    "/etc/passwd",
    "..",
    ".",
    "rank-00001/shard-00000009.tvs",
    "manifest.json",
    "a\x00b",
    "line\nbreak",
    "\u202eevil\u202c",
    "C:\\Windows\\system32",
    "%s%n%x",
    "x" * 4096,
]


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*"))


def test_hostile_tensor_names_stay_inside_frames(tmp_path):
    """Names are bytes inside frames (FORMAT.md §3.2): never a path, never parsed."""
    run_dir = tmp_path / "deep" / "run"
    before = _tree(tmp_path)
    with tv.StoreWriter(str(run_dir)) as w:
        for i, name in enumerate(HOSTILE_NAMES):
            w.write(name, 0, np.full(3, i, np.float32))
        w.commit(0)
    created = sorted(set(_tree(tmp_path)) - set(before))
    assert created == [
        "deep",
        "deep/run",
        "deep/run/manifest.json",
        "deep/run/rank-00000",
        "deep/run/rank-00000/shard-00000000.tvs",
        "deep/run/rank-00000/shard-00000000.tvt",
        "deep/run/rank-00000/writer.lock",
    ]
    assert not Path("/tmp/escape").exists()
    run = tv.open(str(run_dir))
    assert sorted(run.tensor_names()) == sorted(HOSTILE_NAMES)
    for i, name in enumerate(HOSTILE_NAMES):
        np.testing.assert_array_equal(run.tensor(name).value(0), np.full(3, i, np.float32))
    assert fsck(str(run_dir)).clean
    with pytest.raises(tv.InvalidArgumentError, match="name"):
        tv.StoreWriter(str(tmp_path / "r2")).write("x" * 4097, 0, np.zeros(1))


def test_opening_a_run_executes_nothing(tmp_path):
    """Side files full of pickles and code are data, never executed (no pickle, no eval)."""
    import pickle

    marker = tmp_path / "pwned"

    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bomb = pickle.dumps(Boom())
    run_dir = tmp_path / "run"
    with tv.StoreWriter(str(run_dir)) as w:
        w.write("x", 0, np.zeros(3, np.float32))
        w.commit(0)
    for name in ("collections.json", "findings.jsonl", "stop_request.json"):
        (run_dir / name).write_bytes(bomb)
    (run_dir / "rank-00000" / "shard-00000001.tvs").write_bytes(bomb)
    (run_dir / "findings.x.jsonl").write_text(f'__import__("os").system("touch {marker}")\n')
    run = tv.open(str(run_dir), strict=False)
    run.steps()
    run.findings()
    with pytest.raises(tv.DataCorruptionError):
        run.collections()
    fsck(str(run_dir))
    subprocess.run(
        [sys.executable, "-m", "tensorvigil", "ls", str(run_dir)], capture_output=True, timeout=60
    )
    assert not marker.exists()


def test_package_has_no_code_execution_primitives():
    """No pickle / marshal / eval / exec / allow_pickle anywhere in the package source."""
    bad = re.compile(
        r"\bimport pickle\b|\bpickle\.|\bmarshal\b|(?<![.\w])eval\(|(?<![.\w])exec\("
        r"|allow_pickle\s*=\s*True|torch\.load\("
    )
    hits = [
        f"{p.relative_to(PKG)}:{i}: {line.strip()}"
        for p in PKG.rglob("*.py")
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if bad.search(line)
    ]
    assert not hits, hits


def test_findings_with_bad_utf8_and_non_objects_are_skipped(tmp_run):
    """Fuzz finding (atheris, tests/fuzz/regressions_py): bad UTF-8 raised UnicodeDecodeError."""
    with tv.StoreWriter(tmp_run) as w:
        w.write("x", 0, np.zeros(3, np.float32))
        w.commit(0)
    Path(tmp_run, "findings.jsonl").write_bytes(
        b'\x13\xa73\n1\n[2]\n{"rule": "R", "step": 1}\n{"rule": "to'
    )
    assert tv.open(tmp_run).findings() == [{"rule": "R", "step": 1}]


@pytest.fixture
def silent_server():
    """A TCP server that accepts connections and never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    yield f"http://127.0.0.1:{s.getsockname()[1]}/hook"
    s.close()


def test_webhook_never_blocks_and_times_out(silent_server, caplog):
    hook = Webhook(silent_server, timeout=1.5, max_queue=4)
    f = Finding(rule="R", step=0, message="m")
    t0 = time.perf_counter()
    worst = 0.0
    for _ in range(200):
        t = time.perf_counter()
        hook(f)
        worst = max(worst, time.perf_counter() - t)
    # A call that waited for the server would take the request timeout (1.5 s) or more; the
    # margin below it absorbs scheduler and GIL hiccups of a loaded 2-core machine.
    assert worst < 1.0 and time.perf_counter() - t0 < 1.5
    with caplog.at_level(logging.WARNING, logger="tensorvigil"):
        assert hook.flush(timeout=30)
    assert hook.sent == 0 and hook.failed >= 4 and hook.dropped >= 190
    assert hook.failed + hook.dropped == 200
    warnings = [r for r in caplog.records if "webhook" in r.getMessage()]
    assert len(warnings) == 1 and "timed out" in warnings[0].getMessage()


def test_training_with_a_dead_webhook_keeps_its_speed(tmp_run, silent_server):
    torch = pytest.importorskip("torch")
    nn = torch.nn

    def run(on_finding, out):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))
        nn.init.zeros_(model[0].weight)  # an all-zero tensor: AllZero fires
        model[0].weight.requires_grad_(False)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
        hook = tv.torch.Hook(
            out,
            save=tv.SaveConfig(every=1),
            rules=[tv.rules.get("AllZero", tensor_regex="weight")],
            on_finding=on_finding,
            strict=True,
        )
        hook.register(model, optimizer=opt)
        x = torch.randn(8, 16)
        times = []
        with hook:
            for _ in range(30):
                t = time.perf_counter()
                loss = model(x).pow(2).mean()
                hook.record_loss(loss)
                opt.zero_grad()
                loss.backward()
                opt.step()
                times.append(time.perf_counter() - t)
        return np.median(times), max(times), hook

    base_med, _, _ = run("warn", tmp_run + "-base")
    webhook = Webhook(silent_server, timeout=2.0, max_queue=10)
    med, worst, _ = run(webhook, tmp_run)
    assert webhook.failed + webhook.dropped + webhook._q.unfinished_tasks > 0, (
        "the rule never fired"
    )
    assert webhook.sent == 0
    assert worst < 1.0 and med < base_med * 3 + 0.005, (med, base_med, worst)


def test_a_forged_huge_size_is_refused_before_allocating(tmp_path):
    """An index that declares a 64 TiB tensor over a 16-byte payload: DataCorruptionError, fast,
    without trying to allocate the declared size."""
    import struct

    from fuzz_helpers import fix_checksums

    run = tmp_path / "run"
    with tv.StoreWriter(str(run)) as w:
        w.write("x", 0, np.arange(4, dtype=np.float32), codec="raw")
        w.commit(0)
    (shard,) = (run / "rank-00000").glob("shard-*.tvs")
    data = bytearray(shard.read_bytes())
    numel = 1 << 44  # 64 TiB of float32: allocating it would fail
    for flags in (0, 1, 2, 3):
        old = b"x" + struct.pack("<qQB", 4, 16, flags) + struct.pack("<Q", 4)
        new = b"x" + struct.pack("<qQB", numel, 4 * numel, flags) + struct.pack("<Q", numel)
        data = bytearray(bytes(data).replace(old, new))
    assert bytes(data) != shard.read_bytes(), "the forged fields were not found"
    fix_checksums(data)
    shard.write_bytes(bytes(data))
    t = tv.open(str(run)).tensor("x")
    assert t.record(0).shape == (numel,)  # the forged index itself is well formed
    t0 = time.monotonic()
    with pytest.raises(tv.DataCorruptionError, match="payload can hold"):
        t.value(0)
    assert time.monotonic() - t0 < 1.0
