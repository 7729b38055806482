"""XGBoost capture: :class:`Hook` is an ``xgboost.callback.TrainingCallback``.

This is the only module of tensorvigil that imports xgboost at module level; it is loaded when
``tv.xgboost`` is first used.

Steps are boosting iterations: the hook opens step ``s`` (mode ``train``) after iteration ``s``
of this training call was built and evaluated, and commits it when the next iteration ends or
training ends. What it saves (tensor names; documented in ``docs/XGBOOST.md``):

- ``metrics``: every evaluation metric of every ``evals`` data set as a float64 scalar
  ``metric/<set>-<metric>`` (``metric/validation-logloss``), the value of ``evals_result``.
  Metrics that are minimised and continuous (``logloss``, ``rmse``, ``mae`` ...) are also
  listed in the run's ``losses`` collection, so loss rules (``LossNotDecreasing``) find them.
  Saved every iteration unless ``save`` says otherwise.
- ``hyperparameters`` (at step 0): the booster's effective parameters, read from its
  configuration (defaults included): ``hyperparameters/<name>``, a float64 scalar for numeric
  values, the UTF-8 bytes of the text as a ``uint8`` vector otherwise
  (``hyperparameters/objective``).
- ``feature_importance``: ``feature_importance/<type>/<feature>`` float64 scalars, the values of
  ``booster.get_score(importance_type=<type>)`` for ``weight``, ``gain`` and ``cover`` (and
  ``total_gain``, ``total_cover`` when asked; features not used by any tree yet are absent, as
  in ``get_score``).
- ``trees``: for the trees built since the previous saved step (all trees of those
  iterations, in booster order), ``trees/depth`` (int32, edges from the root to the deepest
  leaf: a single leaf is 0, a stump 1), ``trees/leaves`` (int32), ``trees/gain`` (float64, sum
  of the split gains) and ``trees/round`` (int32, the boosting round of each tree).
- ``labels`` / ``predictions`` for the data sets given as ``data=``: ``<set>/labels`` (int32
  class ids for classification objectives, float32 otherwise) and ``<set>/predictions`` (the
  predicted class ids for ``binary:*`` and ``multi:*`` objectives, else the booster's
  prediction); classification also saves ``<set>/scores``, what ``booster.predict`` returns
  (probabilities, margins). The data rules (``ClassImbalance``, ``Confusion``) pair
  ``<set>/labels`` with ``<set>/predictions``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from typing import Any, Optional, Sequence, Union

import numpy as np
import xgboost as xgb
from xgboost.callback import TrainingCallback

from ..errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    TrainingStopped,
    UnsupportedError,
)
from ..modes import Mode
from .base import (
    CapturePlan,
    CaptureSession,
    Collection,
    SaveConfig,
    SessionHook,
    _detect_rank,
    guarded,
)

logger = logging.getLogger("tensorvigil")

__all__ = [
    "COLLECTIONS",
    "DEFAULT_IMPORTANCE_TYPES",
    "IMPORTANCE_TYPES",
    "Hook",
    "TrainingStopped",
    "is_loss_metric",
]

#: The XGBoost hook's collections (``"all"`` and ``"default"`` mean all of them).
COLLECTIONS = ("metrics", "hyperparameters", "feature_importance", "trees", "labels", "predictions")

#: Importance types of ``Booster.get_score``.
IMPORTANCE_TYPES = ("weight", "gain", "cover", "total_gain", "total_cover")
#: Saved by default: the totals are products (``total_gain = gain * weight``), not saved twice.
DEFAULT_IMPORTANCE_TYPES = ("weight", "gain", "cover")

#: Collections other than ``metrics``: user collections over ``custom`` tensors, by name regex.
_PATTERNS = {
    "hyperparameters": r"^hyperparameters/",
    "feature_importance": r"^feature_importance/",
    "trees": r"^trees/",
    "labels": r"/labels$",
    "predictions": r"/(?:predictions|scores)$",
}

#: Continuous metrics XGBoost minimises: they are losses (``error``/``merror`` are step
#: functions that plateau in healthy runs, and ``auc``, ``ndcg`` ... are maximised).
_LOSS_METRICS = (
    "logloss",
    "mlogloss",
    "rmse",
    "rmsle",
    "mae",
    "mape",
    "mphe",
    "poisson-nloglik",
    "gamma-nloglik",
    "cox-nloglik",
    "gamma-deviance",
    "tweedie-nloglik",
    "aft-nloglik",
    "quantile",
    "expectile",
)


def is_loss_metric(metric: str) -> bool:
    """Whether an XGBoost eval metric name (``logloss``, ``tweedie-nloglik@1.5``) is a loss."""
    return metric.split("@", 1)[0] in _LOSS_METRICS


def _xgb_rank() -> int:
    try:
        from xgboost import collective

        if collective.is_distributed():
            return int(collective.get_rank())
    except Exception:  # noqa: BLE001 - older xgboost, or no collective: fall back to env
        pass
    return _detect_rank()


def _tree_stats(node: dict) -> tuple[int, int, float]:
    """``(depth, leaves, total split gain)`` of one tree of ``get_dump(dump_format="json")``."""
    depth = leaves = 0
    gain = 0.0
    stack = [(node, 0)]
    while stack:
        n, d = stack.pop()
        kids = n.get("children")
        if not kids:
            leaves += 1
            if d > depth:
                depth = d
            continue
        gain += float(n.get("gain", 0.0))
        for c in kids:
            stack.append((c, d + 1))
    return depth, leaves, gain


def _text(value: str) -> np.ndarray:
    return np.frombuffer(value.encode("utf-8"), dtype=np.uint8).copy()


def _hyperparameters(booster: xgb.Booster) -> dict[str, Any]:
    """The booster's effective parameters: ``name -> float`` or ``name -> str``."""
    cfg = json.loads(booster.save_config()).get("learner", {})
    out: dict[str, Any] = {}

    def take(d: Any) -> None:
        if not isinstance(d, dict):
            return
        for k, v in d.items():
            if isinstance(v, str) and k not in out and v != "":
                out[k] = v

    take(cfg.get("learner_train_param"))
    take(cfg.get("learner_model_param"))
    gb = cfg.get("gradient_booster", {})
    for key in ("gbtree_train_param", "tree_train_param", "dart_train_param"):
        take(gb.get(key))
    take(gb.get("gbtree", {}).get("gbtree_train_param"))  # DART nests the gbtree
    take(gb.get("gbtree", {}).get("tree_train_param"))
    take({"num_parallel_tree": gb.get("gbtree_model_param", {}).get("num_parallel_tree", "")})
    take(gb.get("gblinear_train_param"))
    take(gb.get("updater", {}) if isinstance(gb.get("updater"), dict) else None)
    obj = cfg.get("objective", {})
    for k, v in obj.items():
        if k.endswith("_param"):
            take(v)
    take(cfg.get("generic_param"))
    parsed: dict[str, Any] = {}
    for k, v in out.items():
        s = v.strip()
        if s.startswith("[") and s.endswith("]") and "," not in s:
            s = s[1:-1]  # base_score is written as "[5E-1]"
        try:
            f = float(s)
        except ValueError:
            parsed[k] = v
        else:
            parsed[k] = f if math.isfinite(f) else v
    return parsed


def _as_dmatrix(name: str, d: Any) -> Any:
    if isinstance(d, xgb.DMatrix):
        if d.get_label().size == 0:
            raise InvalidArgumentError(f"data['{name}']: the DMatrix has no labels")
        return d
    if isinstance(d, tuple) and len(d) == 2:
        x, y = d
        if y is None:
            raise InvalidArgumentError(f"data['{name}']: labels (y) are required")
        try:
            return xgb.DMatrix(x, label=np.asarray(y))
        except Exception as e:  # noqa: BLE001 - xgboost raises several types for bad input
            raise InvalidArgumentError(
                f"data['{name}']: cannot make a DMatrix of it: {type(e).__name__}: {e}"
            ) from None
    raise InvalidArgumentError(
        f"data['{name}'] must be an xgboost.DMatrix with labels or an (X, y) tuple, "
        f"got {type(d).__name__}"
    )


class Hook(TrainingCallback, SessionHook):
    """Captures an XGBoost training into a tensorvigil run (a ``TrainingCallback``).

    Pass it to ``xgb.train(..., callbacks=[hook])`` or to a scikit-learn estimator
    (``XGBClassifier(callbacks=[hook])``). The run is closed when training ends (one hook per
    training call); a stop request (``on_finding="stop"``, :meth:`request_stop` or
    ``tensorvigil watch --stop``) ends boosting after the current iteration, the way early
    stopping does, and ``xgb.train`` returns the booster.

    Args:
        out_dir: Run directory (created if missing).
        collections: Names among ``metrics``, ``hyperparameters``, ``feature_importance``,
            ``trees``, ``labels``, ``predictions`` (``"all"``/``"default"``: all, the default),
            and/or :class:`tensorvigil.Collection` objects: one with an XGBoost collection's
            name and no ``include`` overrides that collection's settings; others are user
            collections over the names above.
        save: When to save (default: ``metrics`` every iteration, the rest every 10th;
            ``hyperparameters`` at step 0 in any case).
        reductions_only: Store statistics only (labels and predictions then carry no values,
            and the data rules cannot read them).
        rules: Rules evaluated during training on a background thread (rank 0).
        on_finding: ``"warn"``, ``"stop"`` (end boosting after the iteration) or a
            callable(finding).
        data: Data sets whose labels and predictions are saved: ``{name: DMatrix}`` (with
            labels) or ``{name: (X, y)}``. Use the names of ``evals`` so that metrics,
            labels and predictions of a set line up.
        importance_types: Importance types saved in ``feature_importance`` (default
            ``weight``, ``gain``, ``cover``; also ``total_gain``, ``total_cover``).
        strict: Raise errors from the hook instead of logging once and disabling capture.
        ranks: ``"all"`` (every worker writes its stream) or ``"zero"``.
        hist_bins: Fixed-bin histogram stored with each tensor's statistics (0: none).
        codec: Codec for float tensors (``"shuffle-zstd"``, ``"zstd"``, ``"raw"``).
        max_pending_bytes: Bound on host memory held by saves not yet on disk.
        policy: ``"block"`` or ``"skip"`` when that bound is reached.
        writer_options: Further :class:`tensorvigil.StoreWriter` options.

    Raises:
        InvalidArgumentError: a bad argument (unknown collection or importance type, data
            that is not a DMatrix with labels nor an ``(X, y)`` pair, ...).

    Example:
        >>> hook = tv.xgboost.Hook("runs/xgb", data={"validation": dval},
        ...                        rules=[tv.rules.get("FeatureImportanceOverweight")])
        >>> bst = xgb.train(params, dtrain, 200, evals=[(dtrain, "train"), (dval, "validation")],
        ...                 callbacks=[hook])

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
        data: Optional[Mapping[str, Any]] = None,
        importance_types: Sequence[str] = DEFAULT_IMPORTANCE_TYPES,
        strict: bool = False,
        ranks: str = "all",
        hist_bins: int = 0,
        codec: str = "shuffle-zstd",
        max_pending_bytes: int = 512 << 20,
        policy: str = "block",
        writer_options: Optional[dict] = None,
    ) -> None:
        super().__init__()
        if save is not None and not isinstance(save, SaveConfig):
            raise InvalidArgumentError(f"save must be a tv.SaveConfig, got {save!r}")
        if isinstance(importance_types, str):
            importance_types = [importance_types]
        bad = [t for t in importance_types if t not in IMPORTANCE_TYPES]
        if bad:
            raise InvalidArgumentError(
                f"unknown importance type(s) {bad}; XGBoost's are: {', '.join(IMPORTANCE_TYPES)}"
            )
        self._importance_types = tuple(dict.fromkeys(importance_types))
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise InvalidArgumentError(
                f"data must be a dict of name -> DMatrix or (X, y), got {type(data).__name__}"
            )
        self._data: dict[str, Any] = {}
        for name, d in data.items():
            if not isinstance(name, str) or not name or "/" in name:
                raise InvalidArgumentError(
                    f"data names must be non-empty strings without '/', got {name!r}"
                )
            self._data[name] = _as_dmatrix(name, d)
        colls = _collections(collections, save)
        plan = CapturePlan(
            colls, save or SaveConfig(every=10), bool(reductions_only), int(hist_bins)
        )
        opts = {"fsync": False, "codec": codec}
        opts.update(writer_options or {})
        opts.update(max_pending_bytes=max_pending_bytes, policy=policy)
        self._session = CaptureSession(
            out_dir, plan, strict=strict, ranks=ranks, rank_fn=_xgb_rank, writer_options=opts
        )
        self._session.attach_rules(rules or [], on_finding)
        self._started = False
        self._hparams: Optional[dict] = None
        self._objective = ""
        self._classify = False
        self._labels: dict[str, np.ndarray] = {}
        self._trees_from = 0  # first boosting round not yet saved in ``trees``
        self._losses_noted: set[str] = set()
        self._tree_booster = True
        self.stopped_reason: Optional[str] = None

    # -- XGBoost callback interface ------------------------------------------------------------

    def before_training(self, model: Any) -> Any:
        """Called by XGBoost before the first iteration; reads the booster's configuration."""
        self._before(model)
        return model

    def after_iteration(self, model: Any, epoch: int, evals_log: dict) -> bool:
        """Called by XGBoost after each iteration; saves the step. Returns True to stop."""
        try:
            self._iteration(model, epoch, evals_log)
        except TrainingStopped as e:
            self.stopped_reason = str(e)
            logger.warning("tensorvigil: %s; boosting ends after iteration %d", e, epoch)
            return True
        s = self._session
        if s.stop_reason is not None and not s.disabled:
            self.stopped_reason = f"training stopped by tensorvigil: {s.stop_reason}"
            logger.warning(
                "tensorvigil: %s; boosting ends after iteration %d", s.stop_reason, epoch
            )
            s.flush()
            return True
        return False

    def after_training(self, model: Any) -> Any:
        """Called by XGBoost when training ends: commits the last step and closes the run."""
        self.close()
        return model

    # -- implementation ------------------------------------------------------------------------

    @guarded
    def _before(self, model: Any) -> None:
        if self._session.closed:
            raise FailedPreconditionError(
                "this tensorvigil hook was closed (its training ended): make a new Hook for "
                "each training call"
            )
        if not isinstance(model, xgb.Booster):
            raise UnsupportedError(
                f"tv.xgboost.Hook works with xgb.train and the scikit-learn estimators, not "
                f"with {type(model).__name__} (xgb.cv is not supported)"
            )
        self._started = True
        cfg = json.loads(model.save_config()).get("learner", {})
        self._objective = str(cfg.get("learner_train_param", {}).get("objective", ""))
        self._classify = self._objective.startswith(("binary:", "multi:"))
        booster = str(cfg.get("learner_train_param", {}).get("booster", "gbtree"))
        self._tree_booster = booster in ("gbtree", "dart")
        self._hparams = _hyperparameters(model)
        self._trees_from = model.num_boosted_rounds()
        for name, dm in self._data.items():
            y = dm.get_label()
            if self._classify:
                if not np.all(y == np.round(y)) or (y.size and y.min() < 0):
                    raise InvalidArgumentError(
                        f"data['{name}']: labels of a {self._objective} objective must be "
                        "class ids 0, 1, ..."
                    )
                y = y.astype(np.int32)
            self._labels[name] = y

    def _wants(self, name: str, kind: str = "custom") -> bool:
        plan = self._session.plan
        return plan.decide(plan.members(name, kind)) is not None

    @guarded
    def _iteration(self, model: Any, epoch: int, evals_log: dict) -> None:
        s = self._session
        if not self._started:
            self._before(model)
            if s.disabled:
                return
        s.begin_step(Mode.TRAIN)
        if not s.saving:
            return
        first = s.step == 0
        if first and self._hparams is not None:
            for k, v in self._hparams.items():
                s.save(f"hyperparameters/{k}", "custom", _text(v) if isinstance(v, str) else v)
        self._save_metrics(evals_log)
        if self._tree_booster:
            self._save_importance(model)
            self._save_trees(model, epoch)
        self._save_predictions(model)

    def _save_metrics(self, evals_log: dict) -> None:
        s = self._session
        plan = s.plan
        for dname, metrics in evals_log.items():
            for mname, hist in metrics.items():
                if not hist:
                    continue
                v = hist[-1]
                if isinstance(v, tuple):  # (mean, std) in cross-validation logs
                    v = v[0]
                name = f"metric/{dname}-{mname}"
                if (
                    s.save(name, "metrics", np.float64(v))
                    and name not in self._losses_noted
                    and is_loss_metric(mname)
                ):
                    # Listed in ``losses`` too (collections.json), so loss rules find it.
                    self._losses_noted.add(name)
                    plan.names_by_collection.setdefault("losses", set()).add(name)
                    plan.version += 1

    def _save_importance(self, model: xgb.Booster) -> None:
        s = self._session
        for t in self._importance_types:
            prefix = f"feature_importance/{t}/"
            if not self._wants(prefix):
                continue
            for feature, v in model.get_score(importance_type=t).items():
                s.save(prefix + feature, "custom", np.float64(v))

    def _save_trees(self, model: xgb.Booster, epoch: int) -> None:
        if not self._wants("trees/depth"):
            return
        start, end = self._trees_from, epoch + 1
        if end <= start:
            return
        dump = model[start:end].get_dump(dump_format="json", with_stats=True)
        self._trees_from = end
        n = len(dump)
        per_round = max(1, n // (end - start))
        depth = np.empty(n, dtype=np.int32)
        leaves = np.empty(n, dtype=np.int32)
        gain = np.empty(n, dtype=np.float64)
        for i, text in enumerate(dump):
            depth[i], leaves[i], gain[i] = _tree_stats(json.loads(text))
        rounds = (start + np.arange(n) // per_round).astype(np.int32)
        s = self._session
        s.save("trees/depth", "custom", depth)
        s.save("trees/leaves", "custom", leaves)
        s.save("trees/gain", "custom", gain)
        s.save("trees/round", "custom", rounds)

    def _save_predictions(self, model: xgb.Booster) -> None:
        s = self._session
        for name, dm in self._data.items():
            want_p = self._wants(f"{name}/predictions")
            if self._wants(f"{name}/labels"):
                s.save(f"{name}/labels", "custom", self._labels[name])
            if not want_p:
                continue
            raw = np.asarray(model.predict(dm))
            if self._classify:
                s.save(f"{name}/scores", "custom", raw)
                s.save(f"{name}/predictions", "custom", self._class_ids(raw))
            else:
                s.save(f"{name}/predictions", "custom", raw)

    def _class_ids(self, raw: np.ndarray) -> np.ndarray:
        obj = self._objective
        if raw.ndim == 2 and raw.shape[1] > 1:
            return np.argmax(raw, axis=1).astype(np.int32)
        raw = raw.reshape(-1)
        if obj == "binary:logistic":
            return (raw > 0.5).astype(np.int32)
        if obj == "binary:logitraw":
            return (raw > 0.0).astype(np.int32)
        return np.rint(raw).astype(np.int32)  # binary:hinge, multi:softmax: ids already

    # -- user API ------------------------------------------------------------------------------

    @guarded
    def record_scalar(self, name: str, value: Any) -> None:
        """Saves a metric of the current iteration as ``metric/<name>``.

        Call it from a callback placed after this hook in ``callbacks``.
        """
        s = self._session
        if s.step_open and s.saving:
            s.save(f"metric/{name}", "metrics", np.float64(value))

    def request_stop(self, reason: str = "stop requested") -> None:
        """Ends boosting after the current iteration."""
        self._session.request_stop(reason)


def _collections(
    collections: Optional[Sequence[Union[str, Collection]]], save: Optional[SaveConfig]
) -> list[Collection]:
    """The XGBoost collections as :class:`Collection` objects for a :class:`CapturePlan`."""
    if collections is None:
        collections = ["default"]
    elif isinstance(collections, (str, Collection)):
        collections = [collections]
    chosen: dict[str, Optional[Collection]] = {}
    users: list[Collection] = []
    for c in collections:
        if isinstance(c, str):
            if c in ("all", "default"):
                for n in COLLECTIONS:
                    chosen.setdefault(n, None)
            elif c in COLLECTIONS:
                chosen.setdefault(c, None)
            else:
                raise InvalidArgumentError(
                    f"unknown XGBoost collection '{c}'; XGBoost collections: "
                    f"{', '.join(COLLECTIONS)} (or 'all', or a tv.Collection)"
                )
        elif isinstance(c, Collection):
            if c.name in COLLECTIONS and not c.include:
                chosen[c.name] = c
            elif c.name in COLLECTIONS:
                raise InvalidArgumentError(
                    f"collection '{c.name}' is an XGBoost collection: omit include= to "
                    "override its settings, or choose another name"
                )
            else:
                users.append(c)
        else:
            raise InvalidArgumentError(
                f"collections must hold names or tv.Collection objects, got {c!r}"
            )
    out: list[Collection] = []
    for name, override in chosen.items():
        csave = override.save if override is not None else None
        if csave is None and name == "metrics" and save is None:
            csave = SaveConfig(every=1)  # scalars: cheap, and curves want every point
        if csave is None and name == "hyperparameters":
            csave = SaveConfig(steps=[0])
        ro = override.reductions_only if override is not None else None
        hb = override.hist_bins if override is not None else None
        if name == "metrics":
            out.append(Collection("metrics", save=csave, reductions_only=ro, hist_bins=hb))
        else:
            out.append(
                Collection(
                    name,
                    include=[_PATTERNS[name]],
                    kinds=["custom"],
                    save=csave,
                    reductions_only=ro,
                    hist_bins=hb,
                )
            )
    return out + users
