"""Runs written by several ranks: real torchrun jobs (4 processes, gloo on CPU)."""

import os
import subprocess
import sys

import numpy as np
import pytest

import tensorvigil as tv

torch = pytest.importorskip("torch")

SCRIPTS = os.path.join(os.path.dirname(__file__), "scripts")
STEPS = 24


def _torchrun(out, fault, nproc=4):
    from s3_server import free_port

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}",
            os.path.join(SCRIPTS, "torchrun_train.py"),
            str(out),
            fault,
            str(STEPS),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return tv.open(out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("ranks")
    return {f: _torchrun(base / f, f) for f in ("none", "nan-rank", "desync", "die")}


def _fired(run, **params):
    rule = tv.rules.get("RankDivergence", **params)
    return [f for f in tv.rules.evaluate_run(run, [rule], record=False) if f.fired]


def test_four_ranks_are_one_run_with_per_rank_statistics(runs):
    run = runs["none"]
    assert run.ranks() == [0, 1, 2, 3]
    assert run.steps() == list(range(STEPS))
    assert all(run.ended(r) for r in run.ranks())
    table = run.stats("loss").to_pandas()
    assert sorted(table["rank"].unique()) == [0, 1, 2, 3]
    assert len(table) == 4 * STEPS
    # Each rank trains on its own data: losses differ by rank ...
    per_rank = table[table["step"] == 5].set_index("rank")["mean"]
    assert per_rank.nunique() == 4
    # ... while DDP keeps weights and averaged gradients identical on every rank.
    for name in ("0.weight", "2.weight/grad"):
        values = [run.tensor(name).value(7, rank=r) for r in run.ranks()]
        for v in values[1:]:
            np.testing.assert_allclose(v, values[0], rtol=1e-6, atol=1e-7)


def test_rank_divergence_is_silent_on_a_healthy_run(runs):
    assert _fired(runs["none"]) == []


def test_rank_divergence_finds_the_rank_with_nan_loss(runs):
    fired = _fired(runs["nan-rank"])
    assert fired, "a NaN loss on rank 2 must be found"
    f = fired[0]
    assert f.step == STEPS // 2 and f.evidence["ranks"] == [2]
    assert "loss" in f.evidence["tensors"]


def test_rank_divergence_finds_the_desynchronised_replica(runs):
    fired = _fired(runs["desync"])
    assert fired
    f = fired[0]
    # rank 1 scales its weights after the optimizer step of step 12: seen when step 13 opens
    assert f.step == STEPS // 2 + 1 and f.evidence["ranks"] == [1]
    assert f.evidence["tensors"] == ["0.weight"]
    # Through the command line, as a separate process: exit code 1, the rank named.
    out = subprocess.run(
        [sys.executable, "-m", "tensorvigil", "check", runs["desync"].path, "--rules",
         "RankDivergence"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1 and "rank(s) [1]" in out.stdout


def test_a_dead_rank_is_reported_and_stops_holding_back_steps(runs):
    run = runs["die"]
    assert run.ranks() == [0, 1, 2, 3]
    assert not run.ended(3) and all(run.ended(r) for r in (0, 1, 2))
    # By default a step is complete when every rank committed it: the dead rank holds it back.
    assert run.steps() == list(range(STEPS // 2 - 1))
    status = run.rank_status(timeout=0.0)
    assert status[3]["state"] == "dead" and status[3]["last_step"] == STEPS // 2 - 2
    assert all(status[r]["state"] == "ended" for r in (0, 1, 2))
    # With a timeout, ranks that died count no more: the survivors' steps are complete.
    assert run.steps(rank_timeout=0.0) == list(range(STEPS))
    # The checker says so, and evaluates every step.
    out = subprocess.run(
        [sys.executable, "-m", "tensorvigil", "check", run.path, "--rules", "LossNotDecreasing",
         "--rank-timeout", "0"],
        capture_output=True,
        text=True,
    )
    assert "rank 3 is dead" in out.stdout + out.stderr
    assert f"{STEPS} steps checked" in out.stdout


def test_rank_divergence_parameters_are_checked():
    with pytest.raises(tv.InvalidArgumentError, match="stat"):
        tv.rules.get("RankDivergence", stat="median")
    with pytest.raises(tv.InvalidArgumentError, match="loss_factor"):
        tv.rules.get("RankDivergence", loss_factor=1.0)
    with pytest.raises(tv.InvalidArgumentError, match="rtol"):
        tv.rules.get("RankDivergence", rtol=0)
