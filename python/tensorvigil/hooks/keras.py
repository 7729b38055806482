"""Keras 3 capture: :class:`Hook` is a callback for ``fit`` / ``evaluate`` / ``predict``.

This is the only module of tensorvigil that imports keras at module level; it is loaded when
``tv.keras`` is first used. It works on Keras' TensorFlow and PyTorch backends (everything)
and on its JAX backend (weights, losses and metrics only).

Steps: every batch Keras runs is one step, in the mode of the loop that runs it: ``fit``
batches are train steps, its validation batches and ``evaluate`` batches eval steps,
``predict`` batches predict steps. A step is committed at the end of its batch.

What is captured when (global step ``s``, names as the PyTorch hook's):

- ``weights`` / ``biases``: at the start of the batch (the values its forward pass uses), from
  ``model.trainable_weights``, named by variable path without the model's name:
  ``dense.kernel``, ``dense.bias``, ``conv2d_1.kernel``.
- ``gradients`` (``dense.kernel/grad``) and the batch ``loss``: from a train-step wrapper the
  hook uses when ``fit`` hands it the model (``wrap_train_step=True``). The wrapper runs the
  model's own ``train_step`` and listens to the values it passes to ``optimizer.apply`` and
  returns from ``compute_loss``. On the PyTorch backend (eager) it is installed for the
  whole ``fit`` and saves them at once, at saved steps. On the TensorFlow backend the step
  is a ``tf.function`` (XLA-compiled where Keras chooses so): at the start of ``fit`` the hook
  builds a second train function, with Keras' ``make_train_function``, from the wrapped
  step, which returns the gradients and the loss as extra outputs, and sets
  ``model.train_function`` to it for saved batches only. Unsaved batches run Keras' own
  function, untouched, so they cost what an empty callback costs; the second function is
  traced once, at the first saved batch. Without the wrapper (or on the JAX backend)
  ``loss`` is Keras' ``logs["loss"]``, the running mean of the epoch so far.
- ``losses`` / ``metrics``: at the end of every batch, ``loss`` (train: the batch loss from the
  wrapper; eval: ``logs["loss"]``) and ``metric/<name>`` for every other entry of Keras' batch
  logs (running means over the epoch, as Keras reports them).
- ``outputs`` (``dense/output``; ``relu_output`` for layers with a ReLU activation): from a
  wrapper around each layer's ``call``, installed only when an outputs collection is
  requested. Eager values (PyTorch backend, ``run_eagerly=True``) are saved directly; inside
  a TensorFlow graph a ``tf.numpy_function`` behind a ``tf.cond`` on the save flag hands them
  over, and since XLA cannot compile a host callback the hook then sets
  ``model.jit_compile = False`` (logged). Not available on the JAX backend.

With ``on_finding="stop"`` a finding sets ``model.stop_training``, so ``fit`` ends after the
current batch, as Keras' own ``TerminateOnNaN`` does.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Optional, Sequence, Union

import keras
import numpy as np

from ..errors import InvalidArgumentError, TrainingStopped
from ..modes import Mode
from .base import CapturePlan, CaptureSession, Collection, SaveConfig, SessionHook, guarded

logger = logging.getLogger("tensorvigil")

__all__ = ["Hook", "TrainingStopped"]

_NO_TAGS: frozenset = frozenset()


def _var_name(v: Any, model: Any) -> str:
    path = str(getattr(v, "path", None) or v.name)
    prefix = f"{model.name}/"
    if path.startswith(prefix):
        path = path[len(prefix) :]
    return path.replace("/", ".")


def _relu_tags(layer: Any) -> frozenset:
    act = getattr(layer, "activation", None)
    if act is keras.activations.relu or isinstance(layer, keras.layers.ReLU):
        return frozenset({"relu"})
    if act is keras.activations.tanh:
        return frozenset({"tanh"})
    if act is keras.activations.sigmoid:
        return frozenset({"sigmoid"})
    return _NO_TAGS


def _leaf_layers(model: Any) -> list:
    out: list = []
    stack = list(reversed(getattr(model, "layers", [])))
    while stack:
        layer = stack.pop()
        children = getattr(layer, "layers", None)
        if children:
            stack.extend(reversed(children))
        else:
            out.append(layer)
    return out


class Hook(keras.callbacks.Callback, SessionHook):
    """Captures a Keras 3 model's tensors into a tensorvigil run during ``fit`` and friends.

    Args:
        out_dir: Run directory (created if missing).
        collections: Names of built-in collections and/or :class:`tensorvigil.Collection`
            objects (default ``weights``, ``biases``, ``gradients``, ``losses``, ``metrics``).
            Add ``"outputs"`` (or ``"relu_output"`` ...) for layer outputs.
        save: When to save (default every 10th step of each mode); collections may override.
        reductions_only: Store statistics only, no tensor values (collections may override).
        rules: Rules evaluated during training on a background thread (e.g.
            ``tv.rules.defaults()``); findings go to the run's ``findings.jsonl``.
        on_finding: ``"warn"`` (log each finding), ``"stop"`` (log, then end ``fit`` by
            setting ``model.stop_training``) or a callable(finding).
        strict: Raise errors from the hook instead of logging once and disabling capture.
        ranks: ``"all"``: every process writes its own stream; ``"zero"``: only rank 0.
        hist_bins: Fixed-bin histogram stored with each tensor's statistics (0: none).
        exp_hist: Store the exponent (log2) histogram with each record.
        codec: Codec for float tensors (``"shuffle-zstd"``, ``"zstd"``, ``"raw"``).
        max_pending_bytes: Bound on host memory held by saves not yet on disk.
        policy: When that bound is reached: ``"block"`` or ``"skip"`` (keep statistics only).
        writer_options: Further :class:`tensorvigil.StoreWriter` options.
        wrap_train_step: Install the train-step wrapper (gradients and the batch loss).

    Example:
        >>> hook = tv.keras.Hook("runs/exp1", save=tv.SaveConfig(every=10))
        >>> model.fit(x, y, epochs=3, validation_split=0.1, callbacks=[hook])
        >>> hook.close()

    """

    def __init__(
        self,
        out_dir: Union[str, os.PathLike],
        collections: Optional[Sequence[Union[str, Collection]]] = None,
        save: Optional[SaveConfig] = None,
        reductions_only: bool = False,
        rules: Optional[Sequence[Any]] = None,
        on_finding: Any = "warn",
        *,
        strict: bool = False,
        ranks: str = "all",
        hist_bins: int = 0,
        exp_hist: bool = False,
        codec: str = "shuffle-zstd",
        max_pending_bytes: int = 512 << 20,
        policy: str = "block",
        writer_options: Optional[dict] = None,
        wrap_train_step: bool = True,
    ) -> None:
        super().__init__()
        if save is None:
            save = SaveConfig(every=10)
        elif not isinstance(save, SaveConfig):
            raise InvalidArgumentError(f"save must be a tv.SaveConfig, got {save!r}")
        plan = CapturePlan(collections, save, bool(reductions_only), int(hist_bins))
        opts = {"fsync": False, "codec": codec}  # as the torch hook: see its comment
        opts.update(writer_options or {})
        opts.update(max_pending_bytes=max_pending_bytes, policy=policy)
        self._session = CaptureSession(
            out_dir, plan, strict=strict, ranks=ranks, exp_hist=exp_hist, writer_options=opts
        )
        self._session.attach_rules(rules or [], on_finding)
        self._wrap = bool(wrap_train_step)
        self._backend = keras.backend.backend()
        self._root: Any = None
        self._weights: list[tuple[str, Any, str]] = []
        self._names: dict[int, str] = {}  # id(variable) -> name
        self._undo: list[Callable[[], None]] = []
        self._tf: Optional[_TfChannel] = None  # layer outputs out of a TF graph
        self._batch_loss: Any = None
        self._tf_capture = False  # gradients / loss through a second TF train function
        self._plain_fn: Any = None  # Keras' own train function (unsaved batches)
        self._capture_fn: Any = None  # the one returning gradients and loss (saved batches)
        self._extras: Any = None  # what the capture function returned for this batch
        self._grad_names: list[str] = []  # names of the gradients it returns, in order

    # -- registration ----------------------------------------------------------------------

    def set_model(self, model: Any) -> None:
        """Called by Keras with the model of ``fit`` / ``evaluate`` / ``predict``."""
        super().set_model(model)
        self._register(model)

    @guarded
    def _register(self, model: Any) -> None:
        if self._root is model:
            return
        if self._root is not None:
            raise InvalidArgumentError(
                "this hook is already attached to another model; make one hook per model"
            )
        if not isinstance(model, keras.Model):
            raise InvalidArgumentError(f"expected a keras.Model, got {type(model).__name__}")
        self._root = model
        for v in model.trainable_weights:
            name = _var_name(v, model)
            last = name.rsplit(".", 1)[-1]
            kind = "biases" if "bias" in last or last == "beta" else "weights"
            self._weights.append((name, v, kind))
            self._names[id(v)] = name
        plan = self._session.plan
        if self._wrap and (plan.could_want("gradients") or plan.could_want("losses")):
            if self._backend == "tensorflow":
                self._tf_capture = True  # the capture function is built in on_train_begin
                self._undo.append(lambda: self._use_train_function(False))
            elif self._backend == "torch":
                self._install_train_step(model)
            elif plan.could_want("gradients"):
                logger.info(
                    "tensorvigil: gradients are captured on Keras' TensorFlow and PyTorch "
                    "backends; on '%s' the hook saves weights, losses and metrics",
                    self._backend,
                )
        self._install_layer_wrappers(model)

    def _install_train_step(self, model: Any) -> None:
        """PyTorch backend: the step calls ``model.train_step`` eagerly, each batch."""
        orig = model.train_step

        def train_step(data: Any) -> Any:
            return self._run_train_step(orig, data)

        model.train_step = train_step
        model.train_function = None
        self._undo.append(lambda: _restore(model, "train_step", "train_function"))

    def _prepare_tf_capture(self) -> None:
        """TensorFlow backend, start of ``fit``: pairs Keras' train function with a capture one.

        Keras builds ``model.train_function`` before ``on_train_begin`` and looks the attribute
        up for every batch; the capture function is built once per train function (a new
        ``compile`` makes a new one) from the wrapped step, with ``make_train_function``.
        """
        model = self._root
        fn = model.train_function
        if fn is None or fn is self._capture_fn:  # the latter: a fit that raised mid-batch
            fn = self._plain_fn
        if fn is None:
            model.make_train_function()
            fn = model.train_function
        if fn is not self._plain_fn or self._capture_fn is None:
            self._plain_fn = fn
            self._capture_fn = self._build_capture_function(model, fn)
        model.train_function = fn

    def _build_capture_function(self, model: Any, plain: Any) -> Callable:
        orig_step = model.train_step
        own = vars(model).get("train_step")  # a user's instance override, put back after

        def capture_step(data: Any) -> Any:
            return self._run_train_step(orig_step, data)

        model.train_step = capture_step  # TF's make_train_function binds it at build time
        try:
            model.make_train_function(force=True)
            compiled = model.train_function
        finally:
            if own is None:
                _restore(model, "train_step")
            else:
                model.train_step = own
            model.train_function = plain

        def capture_function(*args: Any, **kwargs: Any) -> Any:
            out, self._extras = compiled(*args, **kwargs)
            return out

        return capture_function

    def _use_train_function(self, capture: bool) -> None:
        """Points ``model.train_function`` at the capture function or back at Keras' own."""
        model = self._root
        if model is None or self._capture_fn is None:
            return
        want = self._capture_fn if capture else self._plain_fn
        if model.train_function is not want:
            model.train_function = want

    def _install_layer_wrappers(self, model: Any) -> None:
        plan = self._session.plan
        wrapped = 0
        for layer in _leaf_layers(model):
            tags = _relu_tags(layer)
            label = layer.name
            if not plan.could_want("outputs", tags, label, f"{label}/output"):
                continue
            if self._backend == "jax":
                logger.info(
                    "tensorvigil: layer outputs are not captured on Keras' JAX backend "
                    "(layers run inside jax.jit)"
                )
                return
            layer.call = self._wrap_call(layer.call, label, tags)
            self._undo.append(lambda layer=layer: _restore(layer, "call"))
            wrapped += 1
        if wrapped and self._backend == "tensorflow":
            self._tf = _TfChannel(self)
        if wrapped and self._backend == "tensorflow" and not model.run_eagerly:
            if model.jit_compile:
                logger.info(
                    "tensorvigil: layer outputs leave the TensorFlow graph through "
                    "tf.numpy_function, which XLA cannot compile: setting "
                    "model.jit_compile = False"
                )
                model.jit_compile = False
            model.train_function = model.test_function = model.predict_function = None

    def _wrap_call(self, orig: Callable, label: str, tags: frozenset) -> Callable:
        def call(*args: Any, **kwargs: Any) -> Any:
            out = orig(*args, **kwargs)
            self._layer_output(label, tags, out)
            return out

        return call

    # -- train step ------------------------------------------------------------------------

    def _run_train_step(self, orig: Callable, data: Any) -> Any:
        model = self._root
        seen: dict = {}
        opt = model.optimizer
        opt_apply = opt.apply
        model_loss = model.compute_loss

        def apply(grads: Any, trainable_variables: Any = None) -> Any:
            seen["grads"] = (list(grads), trainable_variables)
            return opt_apply(grads, trainable_variables)

        def compute_loss(*args: Any, **kwargs: Any) -> Any:
            loss = model_loss(*args, **kwargs)
            seen["loss"] = loss
            return loss

        opt.apply = apply
        model.compute_loss = compute_loss
        try:
            out = orig(data)
        finally:
            _restore(opt, "apply")
            _restore(model, "compute_loss")
        grads, tvars = seen.get("grads", (None, None))
        if tvars is None and grads is not None:
            tvars = model.trainable_weights
        if self._backend == "tensorflow":
            return out, self._extra_outputs(grads, tvars, seen.get("loss"))
        self._train_values(grads, tvars, seen.get("loss"))
        return out

    def _extra_outputs(self, grads: Any, tvars: Any, loss: Any) -> dict:
        """TensorFlow capture function: the gradients and loss, as extra outputs of the step."""
        names = self._names
        staged, tensors = [], []
        for g, v in zip(grads or (), tvars or ()):
            name = names.get(id(v))
            if g is not None and name is not None:
                staged.append(name)
                tensors.append(g)
        self._grad_names = staged
        extras: dict = {"grads": tuple(tensors)}
        if loss is not None:
            extras["loss"] = loss
        return extras

    @guarded
    def _train_values(self, grads: Any, tvars: Any, loss: Any) -> None:
        """Eager train step: saves gradients and keeps the batch loss for the batch end."""
        s = self._session
        if not (s.step_open and s.saving):
            return
        if loss is not None:
            self._batch_loss = loss
        if grads is not None:
            self._save_grads(grads, tvars)

    def _save_grads(self, grads: Any, tvars: Any) -> None:
        names = self._names
        entries = []
        for g, v in zip(grads, tvars):
            name = names.get(id(v))
            if g is not None and name is not None:
                entries.append((name + "/grad", "gradients", _host(g)))
        self._session.save_many(entries)

    # -- layer outputs ---------------------------------------------------------------------

    def _layer_output(self, label: str, tags: frozenset, out: Any) -> None:
        flat = keras.tree.flatten(out)
        if not flat or any(isinstance(t, keras.KerasTensor) for t in flat):
            return  # symbolic construction of a functional model
        if self._tf is not None and not _tf_eager():
            self._tf.stage_output(label, tags, flat)
        else:
            self._save_output(label, tags, flat)

    @guarded
    def _save_output(self, label: str, tags: frozenset, flat: list) -> None:
        s = self._session
        if not (s.step_open and s.saving):
            return
        base = f"{label}/output"
        for i, t in enumerate(flat):
            s.save(base if i == 0 else f"{base}.{i}", "outputs", _host(t), tags, label)

    # -- callback events -------------------------------------------------------------------

    def _begin(self, mode: Mode) -> None:
        s = self._session
        try:
            s.begin_step(mode)
        except TrainingStopped:
            self._stop_model()
            return
        self._batch_loss = None
        if self._tf is not None:
            self._tf.set_flag(s.saving)
        if s.saving and mode == Mode.TRAIN and self._capture_fn is not None:
            self._extras = None
            self._use_train_function(True)  # for this batch only: _end puts Keras' own back
        if s.saving and self._weights:
            if self._backend == "jax":
                # Keras' JAX trainer keeps the weights in its own state during fit; this public
                # hook for callbacks copies them back into the variables.
                sync = getattr(self._root, "jax_state_sync", None)
                if sync is not None:
                    sync()
            s.save_many([(n, k, _host(v.value)) for n, v, k in self._weights])

    def _end(self, logs: Optional[dict]) -> None:
        s = self._session
        if self._capture_fn is not None:
            self._use_train_function(False)
        if s.step_open and s.saving:
            if self._extras is not None and s.mode == Mode.TRAIN:
                self._collect_extras()
            logs = logs or {}
            loss = self._batch_loss if s.mode == Mode.TRAIN else None
            if loss is None:
                loss = logs.get("loss")
            self._batch_loss = None
            entries = []
            if loss is not None:
                entries.append(("loss", "losses", _host(loss)))
            for k, v in logs.items():
                if k != "loss" and isinstance(v, (int, float, np.number)):
                    entries.append((f"metric/{k}", "metrics", np.float64(v)))
            s.save_many(entries)
        s.end_step()
        try:
            s._check_stop()
        except TrainingStopped:
            self._stop_model()

    def _collect_extras(self) -> None:
        """End of a saved TF train batch: saves the gradients the capture function returned."""
        extras, self._extras = self._extras, None
        grads = extras.get("grads", ())
        self._session.save_many(
            [(n + "/grad", "gradients", _host(g)) for n, g in zip(self._grad_names, grads)]
        )
        if "loss" in extras:
            self._batch_loss = np.asarray(_host(extras["loss"]), np.float64)

    def _stop_model(self) -> None:
        if self._root is not None:
            self._root.stop_training = True
        logger.warning("tensorvigil: stopping fit: %s", self._session.stop_reason)

    @guarded
    def on_train_begin(self, logs: Optional[dict] = None) -> None:
        """TensorFlow backend: builds the capture train function (once per train function)."""
        if self._tf_capture:
            self._prepare_tf_capture()

    @guarded
    def on_train_batch_begin(self, batch: int, logs: Optional[dict] = None) -> None:
        """Opens a train step and saves the weights its forward pass uses."""
        self._begin(Mode.TRAIN)

    @guarded
    def on_train_batch_end(self, batch: int, logs: Optional[dict] = None) -> None:
        """Saves the batch's gradients, loss and metrics and commits the step."""
        self._end(logs)

    @guarded
    def on_test_batch_begin(self, batch: int, logs: Optional[dict] = None) -> None:
        """Opens an eval step."""
        self._begin(Mode.EVAL)

    @guarded
    def on_test_batch_end(self, batch: int, logs: Optional[dict] = None) -> None:
        """Saves the eval loss and metrics and commits the step."""
        self._end(logs)

    @guarded
    def on_predict_batch_begin(self, batch: int, logs: Optional[dict] = None) -> None:
        """Opens a predict step."""
        self._begin(Mode.PREDICT)

    @guarded
    def on_predict_batch_end(self, batch: int, logs: Optional[dict] = None) -> None:
        """Commits the predict step (its layer outputs were saved during the batch)."""
        self._end(None)

    @guarded
    def on_train_end(self, logs: Optional[dict] = None) -> None:
        """Flushes what ``fit`` captured to disk (the run stays open for later calls)."""
        self._use_train_function(False)
        self._session.flush()

    @guarded
    def on_test_end(self, logs: Optional[dict] = None) -> None:
        """Flushes what ``evaluate`` captured."""
        self._session.flush()

    @guarded
    def on_predict_end(self, logs: Optional[dict] = None) -> None:
        """Flushes what ``predict`` captured."""
        self._session.flush()

    # -- user API ----------------------------------------------------------------------------

    def request_stop(self, reason: str = "stop requested") -> None:
        """Ends ``fit`` after the current batch."""
        self._session.request_stop(reason)

    def _detach(self) -> None:
        undo, self._undo = self._undo, []
        for fn in reversed(undo):
            try:
                fn()
            except Exception:  # noqa: BLE001 - the model is still usable without it
                logger.exception("tensorvigil: removing a wrapper failed")


def _restore(obj: Any, *attrs: str) -> None:
    """Removes instance attributes set by the hook, uncovering the class's methods."""
    for a in attrs:
        if a in vars(obj):
            if a.endswith("_function"):
                setattr(obj, a, None)
            else:
                delattr(obj, a)


def _host(x: Any) -> Any:
    """A value the store accepts: torch tensors as they are (detached on write), else NumPy."""
    if isinstance(x, (np.ndarray, np.generic, int, float)):
        return np.asarray(x)
    if type(x).__module__.startswith("torch"):
        return x
    return keras.ops.convert_to_numpy(x)


def _tf_eager() -> bool:
    import tensorflow as tf

    return bool(tf.executing_eagerly())


class _TfChannel:
    """Layer outputs from inside a TensorFlow graph, handed over only at saved steps.

    A ``tf.numpy_function`` (graph mode without XLA only) behind ``tf.cond`` on ``flag``, which
    the callback sets at the start of each batch.
    """

    def __init__(self, hook: Hook) -> None:
        import tensorflow as tf

        self.tf = tf
        self.hook = hook
        self.flag = tf.Variable(False, trainable=False, name="tv_save_flag")
        self.flag_value = False

    def set_flag(self, value: bool) -> None:
        if value != self.flag_value:
            self.flag.assign(value)
            self.flag_value = value

    def stage_output(self, label: str, tags: frozenset, flat: list) -> None:
        """Trace time: hands the layer's outputs to the host at saved steps."""
        tf = self.tf
        hook = self.hook

        def host(*arrays: np.ndarray) -> np.ndarray:
            hook._save_output(label, tags, list(arrays))
            return np.asarray(True)

        def send() -> Any:
            return tf.numpy_function(host, flat, Tout=tf.bool, stateful=True)

        tf.cond(self.flag, send, lambda: tf.constant(False))
