"""tv.plot figures and the HTML report (``write_report``, ``tensorvigil report``).

Runs are captured from real (tiny) PyTorch training loops with ``tv.torch.Hook``: a badly
initialised CNN (every weight Uniform(-1, 1), lr 0.001) and a default-initialised one, as in
the demo. The report is checked by decoding every embedded image, through the command line in a
subprocess, and by loading it in headless Chromium (console errors, loaded images, screenshot).
"""

import base64
import html
import io
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import tensorvigil as tv

torch = pytest.importorskip("torch")
pytest.importorskip("matplotlib")
Image = pytest.importorskip("PIL.Image")
nn = torch.nn

from matplotlib.figure import Figure  # noqa: E402

import tensorvigil.plot as tvplot  # noqa: E402
from tensorvigil.report import SECTIONS, write_report  # noqa: E402

STEPS = 14
EVERY = 2
TORCH_SECTIONS = (
    "summary",
    "findings",
    "loss",
    "gradients",
    "gradient-animation",
    "gradient-variance",
    "activations",
    "weights",
    "weight-updates",
)
IMG_RE = re.compile(r'<img class="plot" src="data:(image/(?:png|gif));base64,([A-Za-z0-9+/=]+)"')


def _model():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 16),
        nn.ReLU(),
        nn.Linear(16, 4),
    )


def train(out, *, bad, reductions_only=False, rules=True):
    """Trains the tiny CNN on synthetic 8x8 images, captured like the demo captures."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(128, 1, 8, 8, generator=g)
        y = (x[:, :, :4].mean((1, 2, 3)) > 0).long() * 2 + (x[:, :, :, :4].mean((1, 2, 3)) > 0)
        model = _model()
        if bad:
            for p in model.parameters():
                nn.init.uniform_(p, -1.0, 1.0)
        opt = torch.optim.SGD(model.parameters(), lr=0.001 if bad else 0.05)
        hook = tv.torch.Hook(
            out,
            collections=["weights", "biases", "gradients", "relu_input", "losses"],
            save=tv.SaveConfig(every=EVERY),
            reductions_only=reductions_only,
            hist_bins=16,
            rules=tv.rules.defaults() if rules else None,
            on_finding=lambda f: None,
            strict=True,
        )
        hook.register(model, optimizer=opt)
        with hook:
            for step in range(STEPS):
                model.train()
                i = torch.arange(step * 16, step * 16 + 32) % len(x)
                loss = nn.functional.cross_entropy(model(x[i]), y[i])
                hook.record_loss(loss)
                opt.zero_grad()
                loss.backward()
                opt.step()
            model.eval()
            with torch.no_grad():
                hook.record_loss(nn.functional.cross_entropy(model(x), y))
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("report_runs")
    return {
        "bad": train(str(base / "bad"), bad=True),
        "good": train(str(base / "good"), bad=False),
    }


@pytest.fixture(scope="module")
def stats_only_run(tmp_path_factory):
    """Statistics and 16-bin histograms only: plots must fall back to the stored histograms."""
    return train(
        str(tmp_path_factory.mktemp("report_stats") / "stats"),
        bad=False,
        reductions_only=True,
        rules=False,
    )


def labelled_axes(fig):
    """Axes of ``fig`` that hold data (not colour bars)."""
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>" and ax.get_visible()]


def assert_readable(fig, *, legend=False):
    assert isinstance(fig, Figure)
    axes = labelled_axes(fig)
    assert axes
    for ax in axes:
        assert ax.get_title().strip(), "every panel has a title"
        assert ax.get_xlabel().strip(), f"x label missing on {ax.get_title()!r}"
    assert axes[0].get_ylabel().strip(), "y label missing"
    if legend:
        assert any(ax.get_legend() is not None for ax in axes)
    png = tvplot.to_png(fig)
    with Image.open(io.BytesIO(png)) as im:
        assert im.format == "PNG"
        w, h = im.size
        assert 300 <= w <= 2000 and 200 <= h <= 2000, (w, h)


# -- tv.plot ---------------------------------------------------------------------------------------


def test_plot_is_lazy_and_has_the_api():
    code = (
        "import sys, tensorvigil as tv; print('matplotlib' in sys.modules); "
        "tv.plot.heatmap, tv.report.write_report; print('matplotlib' in sys.modules)"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(tv.__file__))
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    # Neither importing tensorvigil nor loading tv.plot / tv.report imports matplotlib.
    assert out.stdout.split() == ["False", "False"]


def test_every_plot_returns_a_labelled_figure(runs):
    bad, good = runs["bad"], runs["good"]
    assert_readable(tv.plot.stat(bad, r"weight/grad$", stat="l2", logy=True), legend=True)
    assert_readable(tv.plot.stat(tv.open(bad), "loss", stat="mean"), legend=True)
    assert_readable(tv.plot.loss([bad, good]), legend=True)
    assert_readable(tv.plot.distribution(bad, "0.weight", steps=[0, 4]), legend=True)
    assert_readable(tv.plot.distribution([bad, good], "1/input"), legend=True)
    assert_readable(tv.plot.grad_variance_ratio([bad, good]), legend=True)
    assert_readable(tv.plot.update_ratio(bad), legend=True)
    fig = tv.plot.heatmap([bad, good], "3.weight/grad")
    assert_readable(fig)
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 1 and bars[0].get_ylabel() == "fraction of elements per bin"
    anim = tv.plot.animation([bad, good], ["0.weight/grad", "9.weight/grad"])
    assert_readable(anim.figure)
    assert anim.figure.get_suptitle().startswith("Histogram over steps")


def test_heatmap_is_the_stored_values_histogram(runs):
    """Each heat-map column is numpy's histogram of the stored values, as fractions."""
    run = tv.open(runs["bad"])
    name = "4/input"
    (ser,) = tvplot._series(
        tvplot.as_runs(run), name, mode="train", rank=0, bins=32, value_range="minmax", share=True
    )
    t = run.tensor(name)
    assert ser.steps == t.steps(mode="train")
    assert ser.fallback == 0
    for step, row in zip(ser.steps, ser.frac):
        v = t.value(step).astype(np.float64).ravel()
        ref = np.histogram(v, bins=ser.edges)[0] / v.size
        np.testing.assert_allclose(row, ref, rtol=0, atol=1e-12)
    # "minmax" spans every value of every step: nothing is outside.
    assert ser.outside == 0.0
    assert np.allclose(ser.frac.sum(axis=1), 1.0)


def test_fallback_to_stored_histograms_is_said(runs, stats_only_run):
    fig = tv.plot.heatmap(stats_only_run, "3.weight/grad")
    assert "from stored histograms (no values)" in labelled_axes(fig)[0].get_title()
    fig = tv.plot.distribution(stats_only_run, "1/input")
    assert "from stored histograms" in labelled_axes(fig)[0].get_title()
    values_fig = tv.plot.heatmap(runs["good"], "3.weight/grad")
    assert "stored histograms" not in labelled_axes(values_fig)[0].get_title()
    # The fallback re-bins the stored 16-bin histogram: fractions still sum to 1 per step.
    (ser,) = tvplot._series(
        tvplot.as_runs(stats_only_run),
        "1/input",
        mode="train",
        rank=0,
        bins=64,
        value_range="minmax",
        share=True,
    )
    assert ser.fallback == len(ser.steps) > 1
    np.testing.assert_allclose(ser.frac.sum(axis=1), 1.0, rtol=1e-9)
    # Weight updates need values: a statistics-only run has none.
    with pytest.raises(tv.NotFoundError, match="weight values"):
        tv.plot.update_ratio(stats_only_run)


def test_rebin_is_exact_on_aligned_edges():
    counts = np.array([3.0, 0.0, 5.0, 2.0])
    edges = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    np.testing.assert_array_equal(tvplot._rebin(counts, edges, edges), counts)
    np.testing.assert_array_equal(
        tvplot._rebin(counts, edges, np.array([0.0, 2.0, 4.0])), [3.0, 7.0]
    )
    # Half a bin of overlap gets half its count; a constant tensor lands in one bin.
    np.testing.assert_allclose(tvplot._rebin(counts, edges, np.array([0.5, 2.5])), [4.0])
    np.testing.assert_array_equal(
        tvplot._rebin(np.array([7.0]), np.array([1.5, 1.5]), edges), [0.0, 7.0, 0.0, 0.0]
    )


def test_plot_errors_are_typed(runs, tmp_path):
    bad = runs["bad"]
    with pytest.raises(tv.InvalidArgumentError, match="unknown statistic 'median'"):
        tv.plot.stat(bad, "loss", stat="median")
    with pytest.raises(tv.TensorNotFoundError, match="nope"):
        tv.plot.heatmap(bad, "nope")
    with pytest.raises(tv.StepNotAvailableError, match="no saved step 3"):
        tv.plot.distribution(bad, "0.weight", steps=[3])
    with pytest.raises(tv.NotFoundError, match="does not exist"):
        tv.plot.loss(str(tmp_path / "missing"))
    with pytest.raises(tv.InvalidArgumentError, match="value_range"):
        tv.plot.heatmap(bad, "0.weight", value_range=(1.0, 0.0))
    with pytest.raises(tv.InvalidArgumentError, match="2 labels for 1 runs"):
        tv.plot.loss(bad, labels=["a", "b"])


# -- the report ------------------------------------------------------------------------------------


def embedded_images(path):
    with open(path, encoding="utf-8") as f:
        page = f.read()
    out = []
    for mime, b64 in IMG_RE.findall(page):
        data = base64.b64decode(b64, validate=True)
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == {"image/png": "PNG", "image/gif": "GIF"}[mime]
            frames = getattr(im, "n_frames", 1)
            size = im.size
            im.verify()  # chunk checksums and structure; raises on a broken file
        with Image.open(io.BytesIO(data)) as im:
            im.seek(frames - 1)
            im.load()  # decodes the pixels (of the last frame, for a GIF)
        out.append((mime, frames, size))
    assert len(out) == page.count("<img"), "every <img> is an embedded data URI we decoded"
    return page, out


def expected_images(run_path):
    """One image per gradient layer, activation input and weight; loss, GIF, two ratios."""
    src = tvplot.RunData(run_path)
    return (
        len(tvplot.layer_gradients(src))
        + len(tvplot.activation_inputs(src))
        + len(tvplot.layer_weights(src))
        + 4
    )


def cli(*args):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (os.path.dirname(os.path.dirname(tv.__file__)), env.get("PYTHONPATH")) if p
    )
    return subprocess.run(
        [sys.executable, "-m", "tensorvigil", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.fixture(scope="module")
def compared(runs, tmp_path_factory):
    """``tensorvigil report bad --compare good`` run as a subprocess: (path, its output)."""
    out = tmp_path_factory.mktemp("report_cli") / "sub" / "cmp.html"
    r = cli(
        "report",
        runs["bad"],
        "--compare",
        runs["good"],
        "-o",
        str(out),
        "--label",
        "bad init",
        "--label",
        "good init",
        "--title",
        "bad vs good",
    )
    return str(out), r


def test_write_report_single_run(runs, tmp_path, capsys):
    single = write_report(runs["good"], tmp_path / "single.html")
    assert single == str(tmp_path / "single.html")
    page, imgs = embedded_images(single)
    assert len(imgs) == expected_images(runs["good"]) == 4 + 3 + 4 + 4
    gifs = [i for i in imgs if i[0] == "image/gif"]
    saved = tv.open(runs["good"]).tensor("0.weight/grad").steps(mode="train")
    assert len(gifs) == 1 and gifs[0][1] == len(saved) > 1, "one GIF frame per saved step"
    for key in TORCH_SECTIONS:
        assert f'<section id="{key}"><h2>' in page, key
    assert "No rule fired." in page
    assert capsys.readouterr().err == "", "no progress output when stderr is not a terminal"


def test_cli_report_compares_two_runs(runs, compared):
    path, r = compared
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"report written to {path} (") and r.stderr == ""
    page, imgs = embedded_images(path)
    assert len(imgs) == expected_images(runs["bad"])
    assert "<title>bad vs good</title>" in page
    assert page.count("<th>bad init</th>") == 1 and page.count("<th>good init</th>") == 1
    gifs = [frames for mime, frames, _ in imgs if mime == "image/gif"]
    assert len(gifs) == 1 and gifs[0] > 1
    # Side by side: heat maps hold two panels (and a colour bar), so they are wide.
    heatmaps = imgs[1:5]  # after the loss curves
    assert all(w > 2.5 * h for mime, _, (w, h) in heatmaps), heatmaps
    fired = [f for f in tv.open(runs["bad"]).findings() if f["kind"] == "fired"]
    assert fired, "the badly initialised run triggers a default rule"
    for f in fired:
        assert f">{f['rule']}</td>" in page
        assert html.escape(f["message"]) in page
        ev = json.dumps(f["evidence"], sort_keys=True, indent=1)
        assert html.escape(ev.splitlines()[1]) in page, "evidence is shown"
    assert os.path.getsize(path) < 4e6


def test_cli_report_errors(runs, tmp_path):
    missing = tmp_path / "no-such-run"
    r = cli("report", str(missing), "-o", str(tmp_path / "x.html"))
    assert r.returncode == 2
    assert r.stderr.startswith("tensorvigil: error: ") and str(missing) in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.html").exists()
    r = cli("report", runs["bad"], "--compare", str(missing), "-o", str(tmp_path / "x.html"))
    assert r.returncode == 2 and str(missing) in r.stderr
    assert not (tmp_path / "x.html").exists()
    r = cli("report", runs["bad"], "--label", "a", "--label", "b")
    assert r.returncode == 2 and "--label given 2 times for 1 run" in r.stderr


def test_sections_without_data_are_one_line_notes(tmp_path, capsys):
    with tv.StoreWriter(str(tmp_path / "lossonly")) as w:
        for step in range(5):
            w.write("loss", step, np.array(2.0 / (step + 1), dtype=np.float32))
            w.commit(step)
    path = write_report(str(tmp_path / "lossonly"), tmp_path / "r.html", progress=True)
    page, imgs = embedded_images(path)
    assert [m for m, _, _ in imgs] == ["image/png"]  # the loss curve only
    notes = re.findall(r'<section id="([\w-]+)" class="omitted"><p class="note">([^<]*)</p>', page)
    omitted = {k for k, _ in notes}
    assert set(TORCH_SECTIONS[3:]) <= omitted
    assert all("omitted" in n and "\n" not in n for _, n in notes)
    assert "no gradients captured" in page
    assert "tensorvigil report: [" in capsys.readouterr().err  # progress=True forces it


def test_sections_can_be_registered(tmp_path):
    from tensorvigil.report import register_section

    with tv.StoreWriter(str(tmp_path / "small")) as w:
        w.write("loss", 0, np.array(1.5, dtype=np.float32))
        w.commit(0)

    def extra(ctx):
        return f"<p id='extra-probe'>{len(ctx.runs)} run(s), first {ctx.runs[0].label}</p>"

    register_section("extra-probe", "Extra", extra, after="loss")
    try:
        keys = [s.key for s in SECTIONS]
        assert keys.index("extra-probe") == keys.index("loss") + 1
        with open(
            write_report(str(tmp_path / "small"), tmp_path / "x.html"), encoding="utf-8"
        ) as f:
            page = f.read()
        assert "<p id='extra-probe'>1 run(s), first small</p>" in page
        assert (
            page.index('id="loss"') < page.index('id="extra-probe"') < page.index('id="gradients"')
        )
    finally:
        SECTIONS[:] = [s for s in SECTIONS if s.key != "extra-probe"]


# -- headless Chromium -----------------------------------------------------------------------------

PROBE = (
    "<script>console.log('tv-probe');window.addEventListener('load',()=>{"
    "const n=[...document.images].filter(i=>i.complete&&i.naturalWidth>0).length;"
    "document.body.setAttribute('data-loaded-images',String(n));});</script>"
)


def chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("Chromium is not installed (bash tools/install-deps.sh --test installs it)")


def run_chromium(exe, url, *args, tmp_path):
    cmd = [
        exe,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--enable-logging=stderr",
        "--v=0",
        f"--user-data-dir={tmp_path / 'profile'}",
        *args,
        url,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_report_renders_in_headless_chromium(runs, compared, tmp_path):
    exe = chromium()
    page, imgs = embedded_images(compared[0])
    assert "<script" not in page and "http://" not in page and "https://" not in page
    # The report itself has no script; a copy with a probe counts the images that decoded.
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    shot = tmp_path / "shot.png"
    r = run_chromium(
        exe,
        probe.as_uri(),
        "--dump-dom",
        f"--screenshot={shot}",
        "--window-size=1200,2400",
        tmp_path=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    m = re.search(r'data-loaded-images="(\d+)"', r.stdout)
    assert m, "the load handler ran"
    assert int(m.group(1)) == len(imgs) == expected_images(runs["bad"])
    console = re.findall(r"CONSOLE[^\]]*\] \"(.*?)\", source", r.stderr)
    assert "tv-probe" in console, "console messages are captured"
    assert [c for c in console if c != "tv-probe"] == [], "no console errors or warnings"
    assert shot.exists(), r.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1200, 2400)
        px = np.asarray(im.convert("RGB"), dtype=np.int32)
    ink = (px.min(axis=2) < 235).mean()
    assert 0.03 < ink < 0.9, f"screenshot looks blank or broken ({ink:.1%} non-white)"
    # The plots carry colour (heat maps, curves): many distinct colours, not just text.
    rgb = (px[..., 0] << 16) | (px[..., 1] << 8) | px[..., 2]
    assert len(np.unique(rgb)) > 500
