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
    assert "steps     3 committed (0..2): train 3" in out
    assert "findings  0" in out
    row = next(line.split() for line in out.splitlines() if line.startswith("fc1.weight"))
    assert row == ["fc1.weight", "-", "float32", "4x4", "3", "0..2", "values"]
    out = subprocess.run(
        [*cli, "stats", run, "--tensor", "loss"], capture_output=True, text=True, check=True
    ).stdout
    rows = [line.split() for line in out.splitlines() if line.startswith("loss")]
    assert [r[2] for r in rows] == ["0", "1", "2"] and rows[2][3] == "train"
    assert rows[2][6] == "0.3333"
    none = subprocess.run(
        [*cli, "stats", run, "--tensor", "loss", "--mode", "eval"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert none.startswith("no statistics match")
    # A closed pipe (`| head`) ends the command quietly, without a traceback.
    proc = subprocess.Popen([*cli, "stats", run], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode in (0, 141)
    assert b"Traceback" not in err
    bad = subprocess.run([*cli, "ls", str(tmp_path / "nope")], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.startswith("tensorvigil: error: no run at")
    assert "Traceback" not in bad.stderr
