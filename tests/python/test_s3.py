"""Runs in object storage, against a real S3-protocol server on loopback (moto's server mode)."""

import json
import logging
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import tensorvigil as tv

boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto.server")

from s3_server import FaultProxy, MotoServer  # noqa: E402

SCRIPTS = os.path.join(os.path.dirname(__file__), "scripts")
ENV = {
    "AWS_ACCESS_KEY_ID": "tvtest",
    "AWS_SECRET_ACCESS_KEY": "tvtest-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="module")
def server():
    srv = MotoServer()
    yield srv
    srv.stop()


@pytest.fixture
def s3(server, tmp_path, monkeypatch):
    """The server as the environment's S3 endpoint, a fresh bucket, private local dirs."""
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.url)
    monkeypatch.setenv("TV_STAGING_DIR", str(tmp_path / "staging"))
    monkeypatch.setenv("TV_CACHE_DIR", str(tmp_path / "cache"))
    bucket = f"runs-{time.time_ns()}"
    client = boto3.client("s3", endpoint_url=server.url)
    client.create_bucket(Bucket=bucket)
    return client, bucket


def _keys(client, bucket):
    return {o["Key"]: o["Size"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])}


def _write(url, steps, start=0, **opts):
    values = {}
    with tv.StoreWriter(url, roll_seconds=0.2, upload_interval=0.05, fsync=False, **opts) as w:
        for step in range(start, start + steps):
            v = np.random.default_rng(step).standard_normal((64, 32)).astype(np.float32)
            values[step] = v
            w.write("fc.weight", step, v)
            w.write("loss", step, np.float32(1.0 / (step + 1)), stats_only=True)
            w.commit(step)
            time.sleep(0.03)
    return values


def test_writer_uploads_sealed_shards_and_reader_uses_ranged_reads(s3):
    client, bucket = s3
    url = f"s3://{bucket}/exp/one"
    values = _write(url, 30)
    keys = _keys(client, bucket)
    shards = [k for k in keys if k.startswith("exp/one/rank-00000/shard-")]
    assert "exp/one/manifest.json" in keys and len(shards) >= 2, keys
    run = tv.open(url)
    assert run.url == url and run.steps() == list(range(30))
    # Statistics come from the shard indexes alone: far fewer bytes than the shards hold.
    stats = run.stats("loss").to_pandas().sort_values("step")
    assert np.allclose(stats["mean"], [1.0 / (s + 1) for s in range(30)])
    total = sum(keys[k] for k in shards)
    assert run._mirror.bytes_fetched < total / 4
    before = run._mirror.bytes_fetched
    np.testing.assert_array_equal(run.tensor("fc.weight").value(17), values[17])
    # One value: about one frame's bytes (compressed 8 KiB tensor), not a whole shard.
    assert run._mirror.bytes_fetched - before < 12_000
    for step in (0, 29):
        np.testing.assert_array_equal(run.tensor("fc.weight").value(step), values[step])
    # Everything was uploaded: the staging copies are gone (empty seq placeholders stay).
    staged = os.path.join(os.environ["TV_STAGING_DIR"])
    sizes = [
        os.path.getsize(os.path.join(dp, f))
        for dp, _, fs in os.walk(staged)
        for f in fs
        if f.startswith("shard-")
    ]
    assert sizes and all(s == 0 for s in sizes)


def test_a_restarted_writer_never_overwrites_uploaded_shards(s3, tmp_path):
    client, bucket = s3
    url = f"s3://{bucket}/restart"
    first = _write(url, 10)
    before = {k: v for k, v in _keys(client, bucket).items() if "/shard-" in k}
    # A new machine: no staging directory left.
    second = _write(url, 10, start=10, staging_dir=str(tmp_path / "other-machine"))
    after = _keys(client, bucket)
    for k, size in before.items():
        assert after[k] == size
    run = tv.open(url)
    assert run.steps() == list(range(20))
    np.testing.assert_array_equal(run.tensor("fc.weight").value(3), first[3])
    np.testing.assert_array_equal(run.tensor("fc.weight").value(15), second[15])


def test_training_to_s3_is_readable_while_it_runs_and_a_watcher_stops_it(s3, tmp_path):
    client, bucket = s3
    url = f"s3://{bucket}/live"
    npz = tmp_path / "trained.npz"
    train = subprocess.Popen(
        [sys.executable, os.path.join(SCRIPTS, "train_to_s3.py"), url, "400", "40", "0.05", npz],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # A reader elsewhere sees committed steps within the roll interval (0.3 s) plus the
        # upload scan (0.1 s): wait for 20 steps, then check it keeps up while training runs.
        deadline = time.monotonic() + 60
        run = None
        while time.monotonic() < deadline:
            try:
                run = run or tv.open(url)
                run.refresh()
                if len(run.steps()) >= 20:
                    break
            except tv.NotFoundError:
                pass
            time.sleep(0.2)
        assert run is not None and len(run.steps()) >= 20
        assert train.poll() is None, "training should still be running"
        # The watcher, in another process, finds the NaN loss and stops training via the store.
        watch = subprocess.run(
            [
                sys.executable,
                "-m",
                "tensorvigil",
                "watch",
                url,
                "--rules",
                "ExplodingTensor",
                "--stop",
                "--timeout",
                "60",
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert watch.returncode == 1, watch.stderr
        out, err = train.communicate(timeout=60)
    finally:
        if train.poll() is None:
            train.kill()
    assert train.returncode == 3, err
    assert "stopped: training stopped by tensorvigil" in out
    committed = [int(line.split()[1]) for line in out.splitlines() if line.startswith("committed")]
    assert 40 <= committed[-1] < 399
    # Every committed step reached the store, with its values.
    run = tv.open(url)
    assert run.steps()[-1] >= committed[-1]
    trained = np.load(npz)
    for step in (0, 25, committed[-1]):
        np.testing.assert_array_equal(run.tensor("0.weight").value(step), trained[str(step)])
    # The watcher's findings are in the store too, next to the run.
    keys = _keys(client, bucket)
    assert any(k.startswith("live/findings.") and k.endswith(".jsonl") for k in keys), keys
    assert "live/stop_request.json" in keys
    assert any(f["rule"] == "ExplodingTensor" for f in run.findings())
    # An offline check from yet another process agrees.
    check = subprocess.run(
        [sys.executable, "-m", "tensorvigil", "check", url, "--rules", "ExplodingTensor"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert check.returncode == 1 and "ExplodingTensor" in check.stdout


def test_failed_uploads_are_retried_and_no_committed_step_is_lost(server, s3, monkeypatch, caplog):
    client, bucket = s3
    proxy = FaultProxy(server.url)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    url = f"s3://{bucket}/flaky"
    try:
        proxy.failing.set()
        values = {}
        with caplog.at_level(logging.WARNING, logger="tensorvigil"):
            w = tv.StoreWriter(url, roll_seconds=0.1, upload_interval=0.05, fsync=False)
            t0 = time.monotonic()
            for step in range(20):
                values[step] = np.full((16, 16), step, np.float32)
                w.write("w", step, values[step])
                w.commit(step)
                time.sleep(0.05)
            writing = time.monotonic() - t0
            deadline = time.monotonic() + 60
            while w._uploader.retries < 2 and time.monotonic() < deadline:
                time.sleep(0.1)  # until the uploader itself failed and retried (twice)
            assert w._uploader.retries >= 2 and proxy.refused > 0
            assert not any("/shard-" in k for k in _keys(client, bucket))
            proxy.failing.clear()  # the store recovers
            w.close()
        # Training was not slowed down by the failing store.
        assert writing < 20 * 0.05 + 3.0
        warnings = [r for r in caplog.records if "upload to" in r.getMessage()]
        assert any("failed" in r.getMessage() for r in warnings)
        assert len([r for r in warnings if "failed" in r.getMessage()]) <= 2  # once, not per try
        run = tv.open(url)
        assert run.steps() == list(range(20))
        for step, v in values.items():
            np.testing.assert_array_equal(run.tensor("w").value(step), v)
    finally:
        proxy.stop()


def test_close_reports_what_could_not_be_uploaded(server, s3, monkeypatch):
    _client, bucket = s3
    proxy = FaultProxy(server.url)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    try:
        w = tv.StoreWriter(f"s3://{bucket}/down", roll_seconds=0.1, upload_interval=0.05)
        w.write("w", 0, np.ones(4, np.float32))
        w.commit(0)
        proxy.failing.set()
        w._uploader.close_timeout = 1.0
        with pytest.raises(tv.StoreIOError, match="staged run is kept in"):
            w.close()
        staged = os.path.join(os.environ["TV_STAGING_DIR"])
        assert any(
            f.startswith("shard-") and os.path.getsize(os.path.join(dp, f)) > 0
            for dp, _, fs in os.walk(staged)
            for f in fs
        )
    finally:
        proxy.stop()


def test_missing_bucket_and_bad_credentials_are_refused_clearly(s3, monkeypatch):
    with pytest.raises(tv.NotFoundError, match="bucket 'no-such-bucket' does not exist"):
        tv.torch.Hook("s3://no-such-bucket/run")
    with pytest.raises(tv.NotFoundError, match="does not exist"):
        tv.open("s3://no-such-bucket/run")
    _client, bucket = s3
    with pytest.raises(tv.NotFoundError, match="no manifest.json"):
        tv.open(f"s3://{bucket}/never-written")
    proc = subprocess.run(
        [sys.executable, "-m", "tensorvigil", "ls", "s3://no-such-bucket/run"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
    # A server that checks credentials (no IAM user exists, so every key is refused).
    strict = MotoServer(env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", strict.url)
        with pytest.raises(tv.AccessDeniedError, match="access denied"):
            tv.torch.Hook("s3://runs/exp")
        with pytest.raises(PermissionError):
            tv.open("s3://runs/exp")
        with pytest.raises(tv.AccessDeniedError):
            tv.StoreWriter("s3://runs/exp")
    finally:
        strict.stop()


def test_any_pyarrow_filesystem_works_as_the_store(tmp_path):
    import pyarrow.fs as pafs

    remote = tmp_path / "bucket"
    remote.mkdir()
    fs = pafs.SubTreeFileSystem(str(remote), pafs.LocalFileSystem())
    target = (fs, "runs/exp")
    values = {}
    with tv.StoreWriter(
        target, roll_seconds=0.1, upload_interval=0.05, staging_dir=str(tmp_path / "stage")
    ) as w:
        for step in range(5):
            values[step] = np.arange(10, dtype=np.float32) * step
            w.write("x", step, values[step])
            w.commit(step)
            time.sleep(0.05)
    assert (remote / "runs/exp/manifest.json").exists()
    run = tv.open(target)
    assert run.steps() == list(range(5))
    np.testing.assert_array_equal(run.tensor("x").value(4), values[4])
    with open(remote / "runs/exp/manifest.json") as f:
        assert json.load(f)["format"] == "tensorvigil-store"
