import subprocess
import sys


def test_import_is_light():
    code = (
        "import sys, tensorvigil\n"
        "heavy = [m for m in ('torch', 'pyarrow', 'matplotlib', 'pandas') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import tensorvigil pulled in: {out.stdout.strip()}"


def test_cli_ls_and_stats(tmp_path):
    import numpy as np

    import tensorvigil as tv

    run = str(tmp_path / "run")
    with tv.StoreWriter(run) as w:
        for step in range(3):
            w.write("fc1.weight", step, np.full((4, 4), step, np.float32))
            w.write("loss", step, np.float32(1.0 / (step + 1)))
            w.commit(step)
    cli = [sys.executable, "-m", "tensorvigil"]
    out = subprocess.run([*cli, "ls", run], capture_output=True, text=True, check=True).stdout
    assert "steps    3 committed (0..2)" in out
    assert "fc1.weight" in out and "float32" in out and "[4, 4]" in out
    out = subprocess.run(
        [*cli, "stats", run, "--tensor", "loss"], capture_output=True, text=True, check=True
    ).stdout
    assert "loss" in out and "0.3333" in out
    bad = subprocess.run([*cli, "ls", str(tmp_path / "nope")], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.startswith("tensorvigil: error: no run at")
    assert "Traceback" not in bad.stderr


def test_demo_runs(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tensorvigil",
            "demo",
            "--out",
            str(tmp_path / "demo"),
            "--steps",
            "60",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "[good]" in out and "[bad]" in out
    assert "tensorvigil ls" in out
