"""The README's main job: ``tensorvigil demo`` at a reduced size, through the real CLI."""

import base64
import io
import os
import re
import subprocess
import sys

import pytest

import tensorvigil as tv

pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
PIL = pytest.importorskip("PIL.Image")

IMAGE = re.compile(r'src="data:image/(png|gif);base64,([A-Za-z0-9+/=]+)"')


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "tensorvigil", "demo", "--out", str(out), "--steps", "60"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout


def test_bad_run_fires_and_good_run_is_clean(demo):
    out, stdout = demo
    bad = [f for f in tv.open(out / "bad").findings() if f["kind"] == "fired"]
    good = [f for f in tv.open(out / "good").findings() if f["kind"] == "fired"]
    assert {f["rule"] for f in bad} >= {"PoorWeightInitialization"}
    assert bad[0]["step"] <= 10
    assert good == []
    # The output names each run's findings, and says the good run raised nothing.
    bad_part, good_part = stdout.split("[good] init=kaiming")
    assert "[bad] step" in bad_part and "PoorWeightInitialization fired at step" in bad_part
    assert "no rule fired" in good_part
    assert "Traceback" not in stdout


def test_both_runs_captured_what_the_demo_promises(demo):
    out, _ = demo
    for label in ("bad", "good"):
        run = tv.open(out / label)
        names = set(run.tensor_names())
        assert {"conv1.weight", "fc2.bias", "loss", "relu1/input"} <= names
        assert {"conv1.weight/grad", "fc2.weight/grad"} <= set(run.collections()["gradients"])
        assert {"relu1/input", "relu3/input"} <= set(run.collections()["relu_input"])
        assert len(run.steps(mode="train")) == 60
        # Full values were stored: a weight read back has the model's shape.
        assert run.tensor("conv1.weight").value(0).shape == (16, 1, 3, 3)


def test_report_embeds_only_valid_images(demo):
    out, stdout = demo
    report = out / "report.html"
    assert f"report: {report}" in stdout
    html = report.read_text()
    images = IMAGE.findall(html)
    assert len(images) >= 6, "the report should hold the demo's plots"
    assert "http://" not in html and "https://" not in html.replace("https://github", "")
    gifs = 0
    for kind, data in images:
        img = PIL.open(io.BytesIO(base64.b64decode(data)))
        img.verify()  # raises on a truncated or corrupt image
        img = PIL.open(io.BytesIO(base64.b64decode(data)))
        assert img.format.lower() == kind and img.size[0] > 100 and img.size[1] > 100
        if kind == "gif":
            gifs += 1
            assert getattr(img, "n_frames", 1) > 1, "the gradient animation has one frame"
    assert gifs >= 1
    assert os.path.getsize(report) < 20 * 2**20


def test_demo_rejects_too_few_steps(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "tensorvigil", "demo", "--out", str(tmp_path), "--steps", "3"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "demo steps must be an integer >= 20" in proc.stderr
    assert "Traceback" not in proc.stderr
