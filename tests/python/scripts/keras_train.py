"""Keras 3 training checks for one backend (KERAS_BACKEND is set by the caller).

Usage: python keras_train.py OUT_DIR

Trains a small MLP on scikit-learn's digits with ``tv.keras.Hook`` and checks what the run
holds against values this script computes itself; then trains with a learning rate far too
high and checks that ExplodingTensor stops ``fit``. Prints one JSON line: ``{"backend",
"failures": [...], "facts": {...}}``; exits 0 even when checks fail (the test reads the JSON).
"""

import json
import os
import sys

import keras
import numpy as np
from sklearn.datasets import load_digits

import tensorvigil as tv

OUT = sys.argv[1]
BACKEND = keras.backend.backend()
FULL = BACKEND in ("tensorflow", "torch")  # gradients and layer outputs
failures: list = []
facts: dict = {"backend": BACKEND}


def check(cond, what):
    if not cond:
        failures.append(what)


def close(a, b, rtol=1e-5, atol=1e-6):
    return np.allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=rtol, atol=atol)


def mlp(seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(32, activation="relu", name="hidden"),
            keras.layers.Dense(10, name="logits"),
        ],
        name="mlp",
    )


class Recorder(keras.callbacks.Callback):
    """Independent record of the weights each train batch starts from."""

    def __init__(self):
        super().__init__()
        self.weights = []
        self.epoch_end = []

    def on_train_batch_begin(self, batch, logs=None):
        self.weights.append(
            [np.array(keras.ops.convert_to_numpy(w)) for w in self.model.trainable_weights]
        )

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_end.append(
            [np.array(keras.ops.convert_to_numpy(w)) for w in self.model.trainable_weights]
        )


d = load_digits()
x = (d.data / 16.0).astype("float32")
y = d.target.astype("int32")
xt, yt, xv, yv = x[:1280], y[:1280], x[1280:1536], y[1280:1536]
BATCH, EPOCHS, LR = 64, 2, 0.5
loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

# -- 1. a healthy run: read back and compare -----------------------------------------------------
model = mlp(0)
model.compile(optimizer=keras.optimizers.SGD(LR), loss=loss_fn, metrics=["accuracy"])
rec = Recorder()
run_dir = os.path.join(OUT, "good")
hook = tv.keras.Hook(
    run_dir,
    collections=["default", "outputs"],
    save=tv.SaveConfig(every=1),
    rules=[tv.rules.get("ExplodingTensor")],
    strict=True,
)
hist = model.fit(
    xt,
    yt,
    batch_size=BATCH,
    epochs=EPOCHS,
    shuffle=False,
    validation_data=(xv, yv),
    callbacks=[rec, hook],
    verbose=0,
)
final = model.evaluate(xv, yv, batch_size=BATCH, callbacks=[hook], verbose=0, return_dict=True)
hook.close()
facts["val_accuracy"] = float(final["accuracy"])
check(final["accuracy"] > 0.8, f"training did not learn: val accuracy {final['accuracy']}")
check(not [f for f in hook.findings if f.fired], f"healthy run fired: {hook.findings}")

run = tv.open(run_dir)
train_steps = run.steps(mode="train")
eval_steps = run.steps(mode="eval")
n_batches = len(xt) // BATCH
facts["train_steps"] = len(train_steps)
facts["eval_steps"] = len(eval_steps)
check(len(train_steps) == n_batches * EPOCHS, f"train steps {train_steps}")
check(len(eval_steps) == (len(xv) // BATCH) * (EPOCHS + 1), f"eval steps {eval_steps}")
names = run.tensor_names()
facts["names"] = names
expect = ["hidden.kernel", "hidden.bias", "logits.kernel", "logits.bias", "loss", "metric/accuracy"]
if FULL:
    expect += [n + "/grad" for n in expect[:4]] + ["hidden/output", "logits/output"]
check(sorted(expect) == names, f"names {names}")
cols = run.collections()
check(cols.get("weights") == ["hidden.kernel", "logits.kernel"], f"weights {cols.get('weights')}")
if FULL:
    check(cols.get("relu_output") == ["hidden/output"], f"relu_output {cols.get('relu_output')}")

wnames = ["hidden.kernel", "hidden.bias", "logits.kernel", "logits.bias"]
checked = 0
for i, step in enumerate(train_steps):
    w = rec.weights[i]
    for n, wv in zip(wnames, w):
        check(np.array_equal(run.tensor(n).value(step), wv), f"{n} at train step {i}")
    b = slice((i % n_batches) * BATCH, (i % n_batches + 1) * BATCH)
    h = np.maximum(xt[b] @ w[0] + w[1], 0.0)
    logits = h @ w[2] + w[3]
    expect_loss = float(keras.ops.convert_to_numpy(loss_fn(yt[b], logits)))
    if FULL:
        check(close(run.tensor("loss").value(step), expect_loss), f"batch loss at step {i}")
        check(close(run.tensor("hidden/output").value(step), h, atol=1e-5), f"hidden/output {i}")
        check(close(run.tensor("logits/output").value(step), logits, atol=1e-4), f"logits {i}")
        nxt = rec.weights[i + 1] if i + 1 < len(rec.weights) else rec.epoch_end[-1]
        for n, before, after in zip(wnames, w, nxt):
            g = run.tensor(n + "/grad").value(step)
            # plain SGD: w_next = w - lr * g
            check(close(g, (before - after) / LR, rtol=1e-3, atol=2e-5), f"{n}/grad at step {i}")
    checked += 1
facts["checked_steps"] = checked
# eval steps see the weights at the end of the epoch they follow
per_epoch = len(xv) // BATCH
for e in range(EPOCHS):
    for step in eval_steps[e * per_epoch : (e + 1) * per_epoch]:
        check(
            np.array_equal(run.tensor("hidden.kernel").value(step), rec.epoch_end[e][0]),
            f"eval step {step} weights",
        )
        check(run.tensor("loss").steps(mode="eval").count(step) == 1, f"eval loss at {step}")
check(
    close(run.tensor("metric/accuracy").value(eval_steps[-1]), final["accuracy"]),
    "final eval accuracy",
)

# -- 1b. every 3rd step, two fits with a compile between ------------------------------------------
# Unsaved batches must run Keras' own train function (on TensorFlow the hook swaps in its
# capture function for saved batches only); a new compile makes a new train function.
class FunctionProbe(keras.callbacks.Callback):
    """Records which train function each batch runs (placed after the hook)."""

    def __init__(self):
        super().__init__()
        self.fns = []

    def on_train_batch_begin(self, batch, logs=None):
        self.fns.append(self.model.train_function)


model3 = mlp(4)
rec3, probe = Recorder(), FunctionProbe()
every_dir = os.path.join(OUT, "every3")
hook3 = tv.keras.Hook(every_dir, save=tv.SaveConfig(every=3), strict=True)
keras_fns = []
hist3 = None
for fit_no in range(2):
    # the first fit XLA-compiled on TensorFlow (as Keras' "auto" chooses on a GPU), the second not
    jit = fit_no == 0 and BACKEND == "tensorflow"
    model3.compile(
        optimizer=keras.optimizers.SGD(LR), loss=loss_fn, metrics=["accuracy"], jit_compile=jit
    )
    hist3 = model3.fit(
        xt, yt, batch_size=BATCH, epochs=1, shuffle=False, callbacks=[rec3, hook3, probe], verbose=0
    )
    keras_fns.append(model3.train_function)
    check(model3.jit_compile == jit, f"jit_compile {model3.jit_compile} in fit {fit_no}")
hook3.close()
check(sorted(hist3.history) == ["accuracy", "loss"], f"history keys {sorted(hist3.history)}")
run3 = tv.open(every_dir)
saved = run3.tensor("hidden.kernel").steps()
facts["every3_saved"] = saved
check(saved == list(range(0, 2 * n_batches, 3)), f"every=3 saved steps {saved}")
for i, fn in enumerate(probe.fns):
    own = keras_fns[i // n_batches]
    check((fn is own) == (i not in saved or BACKEND != "tensorflow"), f"train function at {i}")
if FULL:
    check(run3.tensor("hidden.kernel/grad").steps() == saved, "every=3 gradient steps")
    check(run3.tensor("loss").steps() == saved, "every=3 loss steps")
    for i in saved:
        w = rec3.weights[i]
        nxt = rec3.weights[i + 1] if i + 1 < len(rec3.weights) else rec3.epoch_end[-1]
        for n, before, after in zip(wnames, w, nxt):
            g = run3.tensor(n + "/grad").value(i)
            check(close(g, (before - after) / LR, rtol=1e-3, atol=2e-5), f"every=3 {n}/grad {i}")
        b = slice((i % n_batches) * BATCH, (i % n_batches + 1) * BATCH)
        logits = np.maximum(xt[b] @ w[0] + w[1], 0.0) @ w[2] + w[3]
        expect_loss = float(keras.ops.convert_to_numpy(loss_fn(yt[b], logits)))
        check(close(run3.tensor("loss").value(i), expect_loss), f"every=3 batch loss at {i}")

# -- 2. injected fault: learning rate far too high ----------------------------------------------
# A linear regression head on raw pixel values (0..16) with SGD at lr=0.01, far above 2 / the
# largest curvature: gradient descent diverges geometrically and reaches Inf within a few steps.
keras.utils.set_random_seed(1)
bad = keras.Sequential([keras.Input((64,)), keras.layers.Dense(16), keras.layers.Dense(1)])
bad.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
fault_dir = os.path.join(OUT, "fault")
fhook = tv.keras.Hook(
    fault_dir,
    save=tv.SaveConfig(every=1),
    reductions_only=True,
    rules=[tv.rules.get("ExplodingTensor")],
    on_finding="stop",
    strict=True,
)
bad_epochs = 40
bad.fit(
    d.data.astype("float32")[:1280],
    yt.astype("float32"),
    batch_size=BATCH,
    epochs=bad_epochs,
    callbacks=[fhook],
    verbose=0,
)
fhook.close()
fired = [f for f in fhook.findings if f.fired]
fruns = tv.open(fault_dir)
facts["fault_steps"] = len(fruns.steps())
facts["fault_finding"] = fired[0].rule if fired else None
facts["fault_finding_step"] = fired[0].step if fired else None
facts["fault_tensors"] = fired[0].evidence.get("tensors", [])[:4] if fired else []
check(
    bool(fired) and fired[0].rule == "ExplodingTensor",
    f"no ExplodingTensor finding: {fhook.findings}",
)
check(len(fruns.steps()) < n_batches * bad_epochs, "fit was not stopped early")
check(bad.stop_training, "model.stop_training not set")


# -- 3. argument errors ---------------------------------------------------------------------------
def raises(fn, text):
    try:
        fn()
    except tv.InvalidArgumentError as e:
        check(text in str(e), f"error message {e!r} lacks {text!r}")
    else:
        failures.append(f"no InvalidArgumentError ({text})")


raises(lambda: tv.keras.Hook(os.path.join(OUT, "e"), save=10), "save must be a tv.SaveConfig")
raises(
    lambda: tv.keras.Hook(os.path.join(OUT, "e"), collections=["gradient"]), "unknown collection"
)
strict = tv.keras.Hook(os.path.join(OUT, "e"), strict=True)
raises(lambda: strict.set_model(object()), "expected a keras.Model")
strict.set_model(mlp(2))
raises(lambda: strict.set_model(mlp(3)), "already attached to another model")
strict.close()

print(json.dumps({"failures": failures, "facts": facts}))
