"""The Keras 3 callback on the TensorFlow and PyTorch backends (one subprocess per backend).

Each subprocess (scripts/keras_train.py) trains an MLP on scikit-learn's digits with
``tv.keras.Hook`` and compares the run with values it computes itself (weights, gradients,
batch losses, layer outputs, eval steps), then, saving every 3rd step over two fits (the
first XLA-compiled on TensorFlow), checks that unsaved batches run Keras' own train function
and saved ones still give exact gradients; then that a learning rate far too high is caught
by ExplodingTensor, which stops ``fit``.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

import tensorvigil as tv

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "keras_train.py")
# The subprocess imports the same tensorvigil as this test (installed, or the source tree).
PYTHON_DIR = os.path.dirname(os.path.dirname(os.path.abspath(tv.__file__)))


def _missing(*mods):
    return [m for m in mods if importlib.util.find_spec(m) is None]


@pytest.mark.parametrize("backend", ["tensorflow", "torch"])
def test_keras_fit_read_back_and_fault(tmp_path, backend):
    missing = _missing("keras", backend, "sklearn")
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (pip install 'tensorvigil[keras]')")
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (os.path.abspath(PYTHON_DIR), env.get("PYTHONPATH")) if p
    )
    proc = subprocess.run(
        [sys.executable, SCRIPT, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert proc.returncode == 0 and lines, f"rc={proc.returncode}\n{proc.stderr[-4000:]}"
    result = json.loads(lines[-1])
    facts = result["facts"]
    assert result["failures"] == [], result
    assert facts["backend"] == backend
    assert facts["train_steps"] == 40 and facts["checked_steps"] == 40
    assert facts["eval_steps"] == 12
    assert facts["every3_saved"] == list(range(0, 40, 3))
    assert "hidden.kernel/grad" in facts["names"] and "hidden/output" in facts["names"]
    assert facts["val_accuracy"] > 0.8
    assert facts["fault_finding"] == "ExplodingTensor"
    assert facts["fault_steps"] < 800
