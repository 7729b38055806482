"""TensorBoard export: what TensorBoard's own loader reads back equals what ``tv.open`` reads.

Runs come from real PyTorch training loops captured with ``tv.torch.Hook`` (train and eval
steps, a rule that fires), exported with the ``tensorvigil export`` command in a subprocess or
mirrored live through the hook's ``tensorboard_dir``; the event files are read back with
TensorBoard's ``EventAccumulator``.
"""

import json
import logging
import math
import os
import subprocess
import sys
import time
import types

import numpy as np
import pytest

import tensorvigil as tv
from tensorvigil.export import tensorboard as tb_export

torch = pytest.importorskip("torch")
pytest.importorskip("tensorboardX")
pytest.importorskip("tensorboard")
nn = torch.nn

STATS = ("mean", "std", "min", "max", "l2", "nan_frac", "inf_frac", "zero_frac")


# -- helpers --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def load():
    """Reads a TensorBoard run directory with TensorBoard's EventAccumulator (keeping all)."""
    # TensorBoard's loader with its stub TF API (what TensorBoard uses without TensorFlow);
    # otherwise a TensorFlow installed beside it is imported (seconds) only to read files.
    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def _load(path):
        assert os.path.isdir(path), f"no TensorBoard run at {path}"
        ea = EventAccumulator(path, size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
        ea.Reload()
        return ea

    return _load


def env():
    e = dict(os.environ)
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(tv.__file__)))
    e["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, e.get("PYTHONPATH")) if p)
    return e


def cli(*args, ok=True):
    p = subprocess.run(
        [sys.executable, "-m", "tensorvigil", *args],
        capture_output=True,
        text=True,
        env=env(),
        timeout=240,
    )
    if ok:
        assert p.returncode == 0, f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    return p


def expected_tag(name, hooked=True):
    """The tag of a tensor's statistics, from the naming rules in docs/TENSORBOARD.md.

    ``hooked``: the run has the hook's collections.json (else groups follow the names).
    """
    if name == "loss" or name.startswith("loss/"):
        return f"losses/{name}"
    if name.startswith("metric/"):
        return f"metrics/{name[len('metric/') :]}"
    if name.endswith("/grad"):
        return f"gradients/{name[: -len('/grad')]}"
    if not hooked:
        return f"tensors/{name}"
    if name.rsplit(".", 1)[-1] == "bias":
        return f"biases/{name}"
    return f"weights/{name}"


def expected_scalars(row, hooked=True):
    numel = row["numel"]
    if numel == 1 and (row["tensor"] == "loss" or row["tensor"].startswith(("loss/", "metric/"))):
        if row["nan"]:
            v = math.nan
        elif row["posinf"]:
            v = math.inf
        elif row["neginf"]:
            v = -math.inf
        else:
            v = row["mean"]
        return {expected_tag(row["tensor"], hooked): v}
    d = {
        "nan_frac": row["nan"] / numel,
        "inf_frac": (row["posinf"] + row["neginf"]) / numel,
        "zero_frac": row["zeros"] / numel,
    }
    return {f"{expected_tag(row['tensor'], hooked)}/{s}": d.get(s, row.get(s)) for s in STATS}


def same_f32(got, expected):
    e = np.float32(expected)
    return (np.isnan(got) and np.isnan(e)) or np.float32(got) == e


def check_export(load, run_path, tb_dir, *, hist="auto", hist_bins=30, step_axis="global"):
    hooked = os.path.exists(os.path.join(run_path, "collections.json"))
    """Every record of the run is in the export, once, with the run's values; nothing else.

    Returns the number of histograms checked.
    """
    run = tv.open(run_path)
    rows = run.stats().to_pylist()
    assert rows
    by_run = {}
    for row in rows:
        by_run.setdefault((row["rank"], str(tv.Mode(row["mode"]))), []).append(row)
    n_hist = 0
    for (rank, mode), rrows in by_run.items():
        ea = load(os.path.join(tb_dir, f"rank{rank}", mode))
        tags = ea.Tags()
        want_tags = set()
        for row in rrows:
            want_tags.update(expected_scalars(row, hooked))
        assert set(tags["scalars"]) == want_tags, (rank, mode)
        got = {}
        for tag in tags["scalars"]:
            events = ea.Scalars(tag)
            steps = [e.step for e in events]
            assert len(steps) == len(set(steps)), f"duplicate steps in {tag}: {steps}"
            got[tag] = {e.step: e.value for e in events}
        expected_count = {}
        for row in rrows:
            tb_step = row["step"] if step_axis == "global" else row["mode_step"]
            for tag, v in expected_scalars(row, hooked).items():
                assert tb_step in got[tag], f"{tag} lacks step {tb_step}"
                assert same_f32(got[tag][tb_step], v), (tag, tb_step, got[tag][tb_step], v)
                expected_count[tag] = expected_count.get(tag, 0) + 1
        assert {t: len(v) for t, v in got.items()} == expected_count
        # histograms
        hists = {
            t: {e.step: e.histogram_value for e in ea.Histograms(t)} for t in tags["histograms"]
        }
        want_hist_tags = set()
        for row in rrows:
            if row["numel"] <= 1 or hist == "none":
                continue
            st = run.tensor(row["tensor"]).stats(row["step"], rank)
            if st.hist is None:
                if hist == "stored" or not row["has_value"]:
                    continue
                st = tv.compute_stats(
                    run.tensor(row["tensor"]).value(row["step"], rank), hist_bins=hist_bins
                )
            tag = f"{expected_tag(row['tensor'], hooked)}/hist"
            want_hist_tags.add(tag)
            hv = hists[tag][row["step"] if step_axis == "global" else row["mode_step"]]
            counts, edges = st.hist, st.hist_edges
            nz = np.flatnonzero(counts)
            a, b = (nz[0], nz[-1] + 1) if len(nz) else (0, 0)
            below, above = st.hist_below, st.hist_above
            want_buckets = [below] * bool(below) + counts[a:b].tolist() + [above] * bool(above)
            want_limits = [edges[0]] * bool(below) + edges[a + 1 : b + 1].tolist()
            want_limits += [st.max] * bool(above)
            assert list(hv.bucket) == [float(c) for c in want_buckets], tag
            assert list(hv.bucket_limit) == want_limits, tag
            assert hv.min == st.min and hv.max == st.max and hv.num == st.finite
            assert hv.sum == pytest.approx(st.sum, rel=1e-12, abs=1e-300)
            assert hv.sum_squares == pytest.approx(st.l2**2, rel=1e-12, abs=1e-300)
            # TensorBoard reads bucket i as (limit[i-1], limit[i]], the first from min and the
            # last up to max: min lies in the first bucket, max in the last one
            lims = list(hv.bucket_limit)
            assert len(lims) == len(hv.bucket) and hv.min <= lims[0]
            assert len(lims) == 1 or hv.max >= lims[-2]
            n_hist += 1
        assert set(tags["histograms"]) == want_hist_tags
        for tag in tags["histograms"]:
            assert len(ea.Histograms(tag)) == len(hists[tag]), f"duplicate histograms in {tag}"
    return n_hist


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 12)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(12, 3)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class EveryFourth(tv.Rule):
    """Fires at every train step divisible by 4 (so findings exist at known steps)."""

    needs = tv.Needs(collections=["losses"])

    def evaluate(self, step):
        if str(step.mode) == "train" and step.step % 4 == 0:
            return self.finding(step, f"step {step.step} is a multiple of 4", {"k": step.step})
        return None


def train(hook, model, opt, steps, *, eval_every=4, seed=0, after_step=None):
    """Trains ``steps`` train steps; an eval step (loss and accuracy) after every ``eval_every``."""
    g = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    for i in range(steps):
        model.train()
        x = torch.randn(16, 6, generator=g)
        y = torch.randint(0, 3, (16,), generator=g)
        loss = loss_fn(model(x), y)
        hook.record_loss(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (i + 1) % eval_every == 0:
            model.eval()
            with torch.no_grad():
                out = model(x)
                hook.record_loss(loss_fn(out, y))
                hook.record_scalar("acc", (out.argmax(1) == y).float().mean())
        if after_step is not None:
            after_step(i)


def make_hook(run, **kw):
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = tv.torch.Hook(
        run,
        collections=[
            tv.Collection("weights", hist_bins=16),
            "biases",
            "gradients",
            "losses",
            "metrics",
        ],
        save=tv.SaveConfig(every=1),
        strict=kw.pop("strict", True),
        **kw,
    )
    hook.register(model, optimizer=opt)
    return hook, model, opt


def event_files(d):
    return sorted(f for f in os.listdir(d) if f.startswith("events.out.tfevents."))


# -- tests ----------------------------------------------------------------------------------------


def test_cli_export_of_training_run_matches_run(tmp_path, load):
    run, tb = str(tmp_path / "run"), str(tmp_path / "tb")
    hook, model, opt = make_hook(run)
    with hook:
        train(hook, model, opt, 8)
    p = cli("export", run, "--tensorboard", tb, "--json")
    out = json.loads(p.stdout)
    r = tv.open(run)
    assert out["records"] == r.stats().num_rows
    assert out["events"] == len(r.steps())  # one event per step (rank 0, train or eval)
    assert sorted(os.listdir(os.path.join(tb, "rank0"))) == sorted(
        [".tensorvigil_export.lock", "eval", "train", "tensorvigil_export.json"]
    )
    n_hist = check_export(load, run, tb)
    # weights have stored histograms (16 bins); biases and gradients get 30-bin ones from values
    assert n_hist == out["histograms"] > 0
    ea = load(os.path.join(tb, "rank0", "train"))
    w = ea.Histograms("weights/fc1.weight/hist")
    assert len(w) == 8 and all(sum(h.histogram_value.bucket) == 72 for h in w)
    assert "gradients/fc1.weight/l2" in ea.Tags()["scalars"]
    assert "losses/loss" in ea.Tags()["scalars"]
    ev = load(os.path.join(tb, "rank0", "eval"))
    assert [e.step for e in ev.Scalars("metrics/acc")] == sorted(
        s for s, m in r.step_modes().items() if m == tv.Mode.EVAL
    )
    assert "gradients/fc1.weight/l2" not in ev.Tags()["scalars"]  # no backward in eval


def test_incremental_export_appends_only_new_steps(tmp_path, load):
    run, tb = str(tmp_path / "run"), str(tmp_path / "tb")
    hook, model, opt = make_hook(run)
    first = {}

    def export_midway(i):
        if i == 4:
            hook.flush()  # steps up to the open one are committed and on disk
            first["out"] = json.loads(cli("export", run, "--tensorboard", tb, "--json").stdout)
            first["steps"] = tv.open(run).steps()

    with hook:
        train(hook, model, opt, 10, after_step=export_midway)
    assert first["out"]["events"] == len(first["steps"]) > 0
    mid = tv.open(run).stats(steps=first["steps"]).num_rows
    assert first["out"]["records"] == mid

    second = json.loads(cli("export", run, "--tensorboard", tb, "--json").stdout)
    r = tv.open(run)
    assert second["records"] == r.stats().num_rows - mid  # only the new records
    assert second["events"] == len(r.steps()) - len(first["steps"])
    assert len(event_files(os.path.join(tb, "rank0", "train"))) == 2
    check_export(load, run, tb)  # every step once: nothing duplicated, nothing missing

    third = tb_export.export_tensorboard(run, tb)
    assert (third.events, third.records, third.files) == (0, 0, [])
    assert len(event_files(os.path.join(tb, "rank0", "train"))) == 2  # no empty file added
    with open(os.path.join(tb, "rank0", tb_export.STATE_NAME)) as f:
        state = json.load(f)
    modes = r.step_modes()
    assert state["last_step"] == {
        "train": max(s for s, m in modes.items() if m == tv.Mode.TRAIN),
        "eval": max(s for s, m in modes.items() if m == tv.Mode.EVAL),
    }


def test_hook_tensorboard_dir_mirrors_while_training(tmp_path, load):
    run, tb = str(tmp_path / "run"), str(tmp_path / "tb")
    hook, model, opt = make_hook(run, tensorboard_dir=tb, rules=[EveryFourth()])
    state_path = os.path.join(tb, "rank0", tb_export.STATE_NAME)
    seen = {}

    def wait_for_mirror(i):
        if i == 5:
            hook.flush()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    with open(state_path) as f:
                        last = json.load(f)["last_step"].get("train", -1)
                except (FileNotFoundError, ValueError):
                    last = -1
                if last >= 4:
                    seen["last"] = last
                    return
                time.sleep(0.05)

    with hook:
        train(hook, model, opt, 12, after_step=wait_for_mirror)
    assert seen.get("last", -1) >= 4, "the mirror exported nothing while training ran"
    r = tv.open(run)
    # the mirror reads no payloads: histograms are the stored ones (weights) only
    n_hist = check_export(load, run, tb, hist="stored")
    assert n_hist == 2 * len(r.steps())  # fc1.weight and fc2.weight at every step
    for mode in ("train", "eval"):
        assert len(event_files(os.path.join(tb, "rank0", mode))) == 1  # one long-lived file
    fired = [f for f in r.findings() if f["kind"] == "fired"]
    assert [f["step"] for f in fired] == [s for s in r.steps("train") if s % 4 == 0]
    ea = load(os.path.join(tb, "rank0", "train"))
    texts = ea.Tensors("findings/EveryFourth")
    assert [t.step for t in texts] == [f["step"] for f in fired]
    for t, f in zip(texts, fired):
        text = t.tensor_proto.string_val[0].decode()
        assert f["message"] in text and "EveryFourth" in text
    meta = ea.SummaryMetadata("findings/EveryFourth")
    assert meta.plugin_data.plugin_name == "text"
    # a later export into the same directory continues from the mirror's state
    assert tb_export.export_tensorboard(run, tb, histograms="stored").events == 0


def test_mirror_error_never_kills_training(tmp_path, caplog):
    run = str(tmp_path / "run")
    blocker = tmp_path / "tb"
    blocker.write_text("a file where the TensorBoard directory should go")
    hook, model, opt = make_hook(run, tensorboard_dir=str(blocker), strict=False)
    with caplog.at_level(logging.ERROR, logger="tensorvigil"):
        with hook:
            train(hook, model, opt, 6)
    assert not hook.disabled  # capture went on
    assert len(tv.open(run).steps("train")) == 6
    errors = [r for r in caplog.records if "TensorBoard mirror" in r.getMessage()]
    assert len(errors) == 1, [r.getMessage() for r in caplog.records]
    assert "is a file" in errors[0].getMessage()

    run2 = str(tmp_path / "run2")
    hook, model, opt = make_hook(run2, tensorboard_dir=str(blocker), strict=True)
    with pytest.raises(tv.InvalidArgumentError, match="is a file"):
        with caplog.at_level(logging.CRITICAL, logger="tensorvigil"):
            with hook:
                train(hook, model, opt, 2)


def test_ranks_become_separate_runs_and_explicit_hist_range(tmp_path, load):
    run, tb = str(tmp_path / "run"), str(tmp_path / "tb")
    rng = np.random.default_rng(7)
    writers = [tv.StoreWriter(run, rank=r) for r in (0, 1)]
    for step in range(5):
        for r, w in enumerate(writers):
            x = rng.normal(loc=r, size=(50,)).astype(np.float32)
            x[:3] = [np.nan, np.inf, 0.0]
            # a range narrower than the data: elements below and above it
            w.write("fc.weight", step, x, hist_bins=10, hist_range=(-0.5, 0.5))
            w.write("fc.weight/grad", step, x * 0.1, stats_only=True)
            # a NaN loss is a NaN scalar; a one-element tensor that is no loss keeps its stats
            loss = np.nan if (r, step) == (1, 4) else 1.0 / (1 + step + r)
            w.write("loss", step, np.float32(loss))
            w.write("scale", step, np.array([np.nan if step == 2 else 0.5], np.float32))
            w.commit(step)
    for w in writers:
        w.close()
    res = tb_export.export_tensorboard(run, tb)
    assert res.events == 10 and res.records == 40
    assert sorted(os.listdir(tb)) == ["rank0", "rank1"]
    check_export(load, run, tb)  # per rank: rank1 values differ from rank0's (loc=1)
    for rank in (0, 1):
        ea = load(os.path.join(tb, f"rank{rank}", "train"))
        st = tv.open(run).tensor("fc.weight").stats(3, rank)
        hv = {e.step: e.histogram_value for e in ea.Histograms("tensors/fc.weight/hist")}[3]
        # below the range, then the bins with counts, then above the range
        assert hv.bucket[0] == st.hist_below > 0 and hv.bucket[-1] == st.hist_above > 0
        assert sum(hv.bucket) == st.finite == 48
        assert hv.bucket_limit[0] == -0.5 and hv.bucket_limit[-1] == st.max
        s = ea.Scalars("tensors/fc.weight/nan_frac")  # no collections.json: group "tensors"
        assert [e.value for e in s] == [np.float32(1 / 50)] * 5
        losses = ea.Scalars("losses/loss")
        assert [e.step for e in losses] == [0, 1, 2, 3, 4]
        assert math.isnan(losses[4].value) == (rank == 1)
        scale = {e.step: e.value for e in ea.Scalars("tensors/scale/nan_frac")}
        assert scale == {0: 0.0, 1: 0.0, 2: 1.0, 3: 0.0, 4: 0.0}
        assert [e.value for e in ea.Scalars("tensors/scale/mean")] == [0.5, 0.5, 0.0, 0.5, 0.5]


def test_collections_steps_stats_and_step_axis(tmp_path, load):
    run = str(tmp_path / "run")
    hook, model, opt = make_hook(run)
    with hook:
        train(hook, model, opt, 8)
    r = tv.open(run)
    tb = str(tmp_path / "tb")
    res = tb_export.export_tensorboard(
        run,
        tb,
        collections="gradients,losses",
        steps="2:7",
        stats=["l2", "max"],
        histograms="none",
        step_axis="mode",
    )
    ea = load(os.path.join(tb, "rank0", "train"))
    names = [
        f"{t}/{s}"
        for t in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
        for s in ("l2", "max")
    ]
    assert sorted(ea.Tags()["scalars"]) == sorted(
        ["losses/loss"] + [f"gradients/{n}" for n in names]
    )
    assert ea.Tags()["histograms"] == []
    train_steps = [s for s in r.steps("train") if 2 <= s < 7]
    got = ea.Scalars("gradients/fc1.weight/l2")
    rows = r.stats("fc1.weight/grad", steps=range(2, 7), mode="train").to_pylist()
    assert [e.step for e in got] == [row["mode_step"] for row in rows]  # mode step axis
    assert [e.value for e in got] == [np.float32(row["l2"]) for row in rows]
    assert res.events == len(train_steps) + len([s for s in r.steps("eval") if 2 <= s < 7])
    # other options into the same directory are refused, with the differences named
    with pytest.raises(tv.InvalidArgumentError, match="step_axis: was 'mode', now 'global'"):
        tb_export.export_tensorboard(run, tb, collections="gradients,losses", stats="l2,max")
    res = tb_export.export_tensorboard(run, tb, overwrite=True)
    assert res.records == r.stats().num_rows
    check_export(load, run, tb)


def test_bad_input_gives_clear_errors(tmp_path):
    run = str(tmp_path / "run")
    with tv.StoreWriter(run) as w:
        w.write("x", 0, np.ones(3, np.float32))
        w.commit(0)
    tb = str(tmp_path / "tb")
    with pytest.raises(tv.NotFoundError, match="no collection"):
        tb_export.export_tensorboard(run, tb, collections=["gradients"])
    for bad in ("5:2", "x:3", "7", "-1:4"):
        with pytest.raises(tv.InvalidArgumentError, match="step"):
            tb_export.export_tensorboard(run, tb, steps=bad)
    with pytest.raises(tv.InvalidArgumentError, match="unknown statistic"):
        tb_export.export_tensorboard(run, tb, stats=["median"])
    with pytest.raises(tv.InvalidArgumentError, match="histograms must be one of"):
        tb_export.export_tensorboard(run, tb, histograms="some")
    with pytest.raises(tv.NotFoundError, match="not a tensorvigil run"):
        tb_export.export_tensorboard(str(tmp_path), tb)
    # one exporter per directory at a time
    with tb_export.TensorBoardExporter(run, tb) as a:
        a.export()
        with pytest.raises(tv.FailedPreconditionError, match="another TensorBoard export"):
            tb_export.export_tensorboard(run, tb)
    assert tb_export.export_tensorboard(run, tb).events == 0  # released on close
    # an export of another run is not appended to
    other = str(tmp_path / "other")
    time.sleep(0.002)
    with tv.StoreWriter(other) as w:
        w.write("x", 0, np.ones(3, np.float32))
        w.commit(0)
    with pytest.raises(tv.InvalidArgumentError, match="another run"):
        tb_export.export_tensorboard(other, tb)
    p = cli("export", run, "--tensorboard", tb, "--steps", "9:3", ok=False)
    assert p.returncode == 2 and "bad step window" in p.stderr
    p = cli("export", run, "--tensorboard", tb, "--collections", "nope", ok=False)
    assert p.returncode == 2 and "no collection(s) 'nope'" in p.stderr


def test_import_stays_light_and_missing_writer_is_explained(tmp_path, monkeypatch):
    code = (
        "import sys, tensorvigil, tensorvigil.export, tensorvigil.cli.main as m; "
        "m.build_parser(); "
        "print(sorted(k for k in ('tensorboardX', 'tensorboard', 'torch', 'pyarrow') "
        "if k in sys.modules))"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env())
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    with pytest.raises(tv.UnsupportedError, match=r"pip install 'tensorvigil\[tensorboard\]'"):
        tb_export.check_available()
    with pytest.raises(tv.UnsupportedError, match="tensorvigil"):
        tv.torch.Hook(str(tmp_path / "run"), tensorboard_dir=str(tmp_path / "tb"))
