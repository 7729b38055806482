"""``tensorvigil check`` and ``tensorvigil watch``: exit codes, output, stop, webhook."""

import datetime as dt
import http.server
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import tensorvigil as tv

SCRIPTS = os.path.join(os.path.dirname(__file__), "scripts")


def cli(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "tensorvigil", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write_run(path, *, nan_at=None, steps=6):
    """A small run written with the store directly, shaped like the hook's output."""
    rng = np.random.default_rng(0)
    with tv.StoreWriter(path) as w:
        for s in range(steps):
            g = rng.normal(0, 1e-2, (8, 4)).astype(np.float32)
            if nan_at is not None and s >= nan_at:
                g[0, 0] = np.nan
            w.write("fc.weight/grad", s, g)
            w.write("loss", s, np.float32(1.0 / (s + 1)))
            w.commit(s)
    with open(os.path.join(path, "collections.json"), "w") as f:
        json.dump({"gradients": ["fc.weight/grad"], "losses": ["loss"]}, f)


def test_check_exit_codes_and_readable_output(tmp_run):
    write_run(tmp_run, nan_at=3)
    r = cli("check", tmp_run, "--rules", "ExplodingTensor")
    assert r.returncode == 1, r.stderr
    assert "FIRED" in r.stdout and "ExplodingTensor" in r.stdout and "step 3" in r.stdout
    assert "6 steps checked" in r.stdout
    assert tv.open(tmp_run).findings() == []  # offline check does not write unless --record

    r = cli("check", tmp_run, "--rules", "ExplodingTensor", "--json", "--record")
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert lines[0]["rule"] == "ExplodingTensor" and lines[0]["step"] == 3
    assert lines[-1]["summary"] and lines[-1]["fired"] >= 1
    assert tv.open(tmp_run).findings()[0]["rule"] == "ExplodingTensor"


def test_check_healthy_run_passes_with_defaults(tmp_run):
    write_run(tmp_run)
    r = cli("check", tmp_run)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "rules fired: none" in r.stdout


def test_check_params_and_errors(tmp_run):
    write_run(tmp_run)
    r = cli(
        "check", tmp_run, "--rules", "VanishingGradient", "--param", "VanishingGradient.threshold=1"
    )
    assert r.returncode == 1 and "VanishingGradient" in r.stdout
    r = cli("check", tmp_run, "--rules", "VanishingGradiant")
    assert r.returncode == 2
    assert "unknown rule 'VanishingGradiant'" in r.stderr and "VanishingGradient" in r.stderr
    r = cli("check", tmp_run, "--rules", "LossSpike", "--param", "LossSpike=3")
    assert r.returncode == 2 and "Rule.key=value" in r.stderr
    r = cli("check", tmp_run, "--rules", "LossSpike", "--param", "LossSpike.nope=3")
    assert r.returncode == 2 and "nope" in r.stderr
    r = cli("check", os.path.join(tmp_run, "missing"))
    assert r.returncode == 2 and "no run" in r.stderr


def _start_training(run, nan_step, seconds=60):
    return subprocess.Popen(
        [
            sys.executable,
            os.path.join(SCRIPTS, "train_until_stopped.py"),
            run,
            str(nan_step),
            str(seconds),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_watch_stops_a_training_process_and_posts_webhook(tmp_run):
    received = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server API
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append(json.loads(body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    train = _start_training(tmp_run, nan_step=15)
    try:
        watch = subprocess.run(
            [
                sys.executable,
                "-m",
                "tensorvigil",
                "watch",
                tmp_run,
                "--rules",
                "ExplodingTensor,LossSpike",
                "--stop",
                "--webhook",
                url,
                "--timeout",
                "30",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        out, err = train.communicate(timeout=60)
    finally:
        train.kill()
        server.shutdown()
        server.server_close()
    assert watch.returncode == 1, watch.stdout + watch.stderr
    assert "stop requested: ExplodingTensor fired at step 15" in watch.stdout
    assert train.returncode == 3, out + err
    assert "training stopped by tensorvigil: ExplodingTensor fired at step 15" in out
    committed = {
        int(p[1]): float(p[2]) for p in (x.split() for x in out.splitlines()) if p[0] == "committed"
    }
    last = max(committed)
    assert 15 <= last <= 15 + 40, "training did not stop soon after the finding"
    finding = next(f for f in tv.open(tmp_run).findings() if f["rule"] == "ExplodingTensor")
    assert finding["step"] == 15
    found_at = dt.datetime.fromisoformat(finding["time"]).timestamp()
    assert found_at - committed[15] < 2.0, "finding later than 2 s after the commit"
    assert any(d["rule"] == "ExplodingTensor" and d["step"] == 15 for d in received)


def test_watch_json_ends_with_the_run(tmp_run):
    train = _start_training(tmp_run, nan_step=10**9, seconds=2)
    try:
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "tensorvigil",
                "watch",
                tmp_run,
                "--json",
                "--rules",
                "ExplodingTensor",
                "--timeout",
                "30",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        train.communicate(timeout=60)
    finally:
        train.kill()
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads(r.stdout.splitlines()[-1])
    assert summary["fired"] == 0 and summary["steps_evaluated"] >= 5


@pytest.mark.parametrize("cmd", ["check", "watch"])
def test_help_lists_options(cmd):
    r = cli(cmd, "--help")
    assert r.returncode == 0 and "--rules" in r.stdout and "--param" in r.stdout
