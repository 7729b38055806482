"""tv.xgboost.Hook: real XGBoost training on scikit-learn's datasets, read back, rules, report."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

xgb = pytest.importorskip("xgboost")
datasets = pytest.importorskip("sklearn.datasets")
model_selection = pytest.importorskip("sklearn.model_selection")

import tensorvigil as tv  # noqa: E402
from tensorvigil.errors import InvalidArgumentError  # noqa: E402

# One thread: the 2-core machine also runs the hook's writer and rules threads, and OpenMP
# spin-waiting under oversubscription makes boosting many times slower.
BASE = {"objective": "binary:logistic", "eta": 0.1, "max_depth": 4, "seed": 0, "nthread": 1}


def _split(x, y, seed=0):
    return model_selection.train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)


@pytest.fixture(scope="module")
def cancer():
    x, y = datasets.load_breast_cancer(return_X_y=True)
    return _split(x, y)


@pytest.fixture(scope="module")
def digits():
    x, y = datasets.load_digits(return_X_y=True)
    return x, y


def _train(out, xtr, ytr, xva, yva, params, rounds, rules=(), **hook_kw):
    dtr = xgb.DMatrix(xtr, label=ytr)
    dva = xgb.DMatrix(xva, label=yva)
    hook = tv.xgboost.Hook(out, data={"validation": dva}, rules=list(rules), strict=True, **hook_kw)
    evals_result: dict = {}
    bst = xgb.train(
        params,
        dtr,
        rounds,
        evals=[(dtr, "train"), (dva, "validation")],
        evals_result=evals_result,
        verbose_eval=False,
        callbacks=[hook],
    )
    return hook, bst, evals_result, dva


def _fired(hook, rule=None):
    return [f for f in hook.findings if f.fired and (rule is None or f.rule == rule)]


# -- capture and read-back ----------------------------------------------------------------------


def test_train_capture_reads_back_equal(tmp_path, cancer):
    xtr, xva, ytr, yva = cancer
    params = dict(BASE, eval_metric=["logloss", "auc"])
    hook, bst, ev, dva = _train(tmp_path / "run", xtr, ytr, xva, yva, params, 21)
    run = tv.open(tmp_path / "run")

    # steps are iterations; metrics every iteration, the rest every 10th
    assert run.steps() == list(range(21))
    for dset in ("train", "validation"):
        for metric in ("logloss", "auc"):
            t = run.tensor(f"metric/{dset}-{metric}")
            assert t.steps() == list(range(21))
            got = [float(t.value(s)) for s in range(21)]
            assert got == ev[dset][metric]

    # feature importance equals get_score of the booster at that iteration
    for step in (0, 10, 20):
        for itype in tv.xgboost.DEFAULT_IMPORTANCE_TYPES:
            want = bst[: step + 1].get_score(importance_type=itype)
            prefix = f"feature_importance/{itype}/"
            names = run.tensor_names(regex="^" + prefix)
            got = {
                n[len(prefix) :]: float(run.tensor(n).value(step))
                for n in names
                if step in run.tensor(n).steps()
            }
            assert got == pytest.approx(want, rel=1e-12), (step, itype)
    assert not run.tensor_names(regex="^feature_importance/total_gain/")

    # labels and predictions of the validation set
    assert run.tensor("validation/labels").steps() == [0, 10, 20]
    np.testing.assert_array_equal(run.tensor("validation/labels").value(20), yva.astype(np.int32))
    proba = bst.predict(dva)
    np.testing.assert_array_equal(run.tensor("validation/scores").value(20), proba)
    np.testing.assert_array_equal(
        run.tensor("validation/predictions").value(20), (proba > 0.5).astype(np.int32)
    )
    np.testing.assert_array_equal(
        run.tensor("validation/scores").value(10),
        bst.predict(dva, iteration_range=(0, 11)),
    )

    # trees: every tree appears once, with its round; leaves and depth from the model itself
    df = bst.trees_to_dataframe()
    leaves = df[df.Feature == "Leaf"].groupby("Tree").size().to_numpy()
    rounds = np.concatenate([run.tensor("trees/round").value(s) for s in (0, 10, 20)])
    np.testing.assert_array_equal(rounds, np.arange(21))
    got_leaves = np.concatenate([run.tensor("trees/leaves").value(s) for s in (0, 10, 20)])
    np.testing.assert_array_equal(got_leaves, leaves)
    depth = np.concatenate([run.tensor("trees/depth").value(s) for s in (0, 10, 20)])
    assert depth.max() <= 4 and depth.min() >= 1
    assert all(
        int(d) == _depth(json.loads(t)) for d, t in zip(depth, bst.get_dump(dump_format="json"))
    )

    # hyperparameters at step 0: numbers as float64, text as UTF-8 bytes
    hp = run.tensor("hyperparameters/max_depth")
    assert hp.steps() == [0] and float(hp.value(0)) == 4.0
    assert float(run.tensor("hyperparameters/eta").value(0)) == pytest.approx(0.1, rel=1e-6)
    obj = run.tensor("hyperparameters/objective").value(0)
    assert obj.dtype == np.uint8 and obj.tobytes().decode() == "binary:logistic"
    from tensorvigil.report_xgboost import feature_importance, hyperparameters

    assert hyperparameters(run)["objective"] == "binary:logistic"
    assert feature_importance(run, "gain") == pytest.approx(bst.get_score(importance_type="gain"))

    # collections: XGBoost's, and minimised metrics listed as losses for loss rules
    colls = run.collections()
    for c in tv.xgboost.COLLECTIONS:
        assert colls[c], c
    assert set(colls["losses"]) == {"metric/train-logloss", "metric/validation-logloss"}
    assert "metric/validation-auc" in colls["metrics"]
    assert set(colls["labels"]) == {"validation/labels"}
    assert set(colls["predictions"]) == {"validation/predictions", "validation/scores"}


def _depth(node, d=0):
    kids = node.get("children")
    return d if not kids else max(_depth(k, d + 1) for k in kids)


def test_sklearn_classifier_multiclass(tmp_path, digits):
    x, y = digits
    xtr, xva, ytr, yva = _split(x, y)
    hook = tv.xgboost.Hook(
        tmp_path / "run",
        collections=["metrics", "labels", "predictions"],
        save=tv.SaveConfig(every=5),
        data={"validation_0": (xva, yva)},
        strict=True,
    )
    clf = xgb.XGBClassifier(
        n_estimators=11, max_depth=3, learning_rate=0.3, n_jobs=1, callbacks=[hook]
    )
    clf.fit(xtr, ytr, eval_set=[(xva, yva)], verbose=False)
    run = tv.open(tmp_path / "run")
    t = run.tensor("metric/validation_0-mlogloss")
    assert t.steps() == [0, 5, 10]  # save= applies to metrics too when given
    assert [float(t.value(s)) for s in (0, 5, 10)] == [
        clf.evals_result()["validation_0"]["mlogloss"][s] for s in (0, 5, 10)
    ]
    np.testing.assert_array_equal(
        run.tensor("validation_0/predictions").value(10), clf.predict(xva)
    )
    np.testing.assert_allclose(
        run.tensor("validation_0/scores").value(10), clf.predict_proba(xva), rtol=1e-6
    )
    assert not run.tensor_names(regex="^(trees|feature_importance|hyperparameters)/")


def test_import_is_light_and_rules_need_no_xgboost():
    code = (
        "import sys, tensorvigil as tv; tv.rules.get('TreeDepth');"
        "import tensorvigil.report_xgboost;"
        "assert 'xgboost' not in sys.modules, 'xgboost imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ))


# -- injected faults caught by rules --------------------------------------------------------------


def _rules():
    return [
        tv.rules.get("FeatureImportanceOverweight"),
        tv.rules.get("TreeDepth"),
        tv.rules.get("LossNotDecreasing"),
        tv.rules.get("ClassImbalance"),
        tv.rules.get("Confusion", start_step=10),
    ]


def test_healthy_run_is_silent(tmp_path, cancer):
    xtr, xva, ytr, yva = cancer
    params = dict(BASE, eta=0.2, eval_metric="logloss")
    hook, *_ = _train(tmp_path / "run", xtr, ytr, xva, yva, params, 60, rules=_rules())
    assert _fired(hook) == [], [str(f) for f in _fired(hook)]
    # every rule had what it needs (none reported not_applicable)
    assert not [f for f in hook.findings if f.kind != "fired"]
    assert os.path.exists(tmp_path / "run" / "collections.json")


def test_leaked_label_column_fires_feature_importance(tmp_path, cancer):
    xtr, xva, ytr, yva = cancer
    # the label sneaked into the features as the last column
    xtr, xva = np.column_stack([xtr, ytr]), np.column_stack([xva, yva])
    hook, *_ = _train(tmp_path / "run", xtr, ytr, xva, yva, dict(BASE), 30, rules=_rules())
    f = _fired(hook, "FeatureImportanceOverweight")
    assert len(f) == 1 and f[0].step == 10
    top = f[0].evidence["top_features"]
    assert top[0]["feature"] == "f30" and top[0]["share"] > 0.9
    assert f[0].evidence["share"] > 0.8


def test_over_regularised_trees_fire_tree_depth(tmp_path, cancer):
    xtr, xva, ytr, yva = cancer
    params = dict(BASE, gamma=20.0)  # splits must gain 20: the trees stay stumps
    hook, bst, *_ = _train(tmp_path / "run", xtr, ytr, xva, yva, params, 20, rules=_rules())
    f = _fired(hook, "TreeDepth")
    assert len(f) == 1
    assert f[0].evidence["deepest"] < 4 and f[0].evidence["expected_depth"] == 4
    assert f[0].evidence["trees"] >= 10


def test_unbounded_trees_fire_tree_depth_max(tmp_path, digits):
    x, y = digits
    xtr, xva, ytr, yva = _split(x, y)
    params = {
        "objective": "multi:softprob",
        "num_class": 10,
        "grow_policy": "lossguide",
        "max_depth": 0,  # no limit
        "eta": 0.3,
        "nthread": 1,
        "seed": 0,
    }
    rules = [tv.rules.get("TreeDepth", max_depth=8), tv.rules.get("TreeDepth", max_depth=12)]
    hook, bst, *_ = _train(tmp_path / "run", xtr, ytr, xva, yva, params, 3, rules=rules)
    deepest = max(_depth(json.loads(t)) for t in bst.get_dump(dump_format="json"))
    fired = _fired(hook, "TreeDepth")
    assert 8 < deepest <= 12
    assert len(fired) == 1 and fired[0].evidence["max_depth"] == 8
    assert fired[0].evidence["tree_depth"] > 8


def test_zero_learning_rate_fires_loss_not_decreasing(tmp_path, cancer):
    xtr, xva, ytr, yva = cancer
    params = dict(BASE, eta=0.0, eval_metric=["logloss", "auc"])
    hook, *_ = _train(tmp_path / "run", xtr, ytr, xva, yva, params, 25, rules=_rules())
    f = _fired(hook, "LossNotDecreasing")
    assert len(f) == 1 and f[0].step == 10
    assert "metric/validation-logloss" in f[0].message
    assert "auc" not in f[0].message  # maximised metrics are not losses


def test_class_imbalance_fires(tmp_path, cancer):
    x, y = datasets.load_breast_cancer(return_X_y=True)
    rng = np.random.default_rng(0)
    keep = (y == 1) | (rng.random(len(y)) < 0.08)  # most malignant cases dropped
    xtr, xva, ytr, yva = _split(x[keep], y[keep])
    hook = tv.xgboost.Hook(
        tmp_path / "run",
        data={"train": (xtr, ytr), "validation": (xva, yva)},
        rules=[tv.rules.get("ClassImbalance")],
        strict=True,
    )
    xgb.train(dict(BASE), xgb.DMatrix(xtr, label=ytr), 30, callbacks=[hook])
    f = _fired(hook, "ClassImbalance")
    assert f and f[0].evidence["ratio"] > 10 and f[0].evidence["smallest_class"] == 0


def test_mislabelled_class_fires_confusion(tmp_path, digits):
    x, y = digits
    xtr, xva, ytr, yva = _split(x, y)
    rng = np.random.default_rng(0)
    ytr = ytr.copy()
    ytr[(ytr == 3) & (rng.random(len(ytr)) < 0.6)] = 8  # most training 3s labelled 8
    params = {
        "objective": "multi:softprob",
        "num_class": 10,
        "eta": 0.3,
        "max_depth": 4,
        "nthread": 1,
        "seed": 0,
    }
    rules = [tv.rules.get("Confusion", start_step=10)]
    hook, *_ = _train(tmp_path / "run", xtr, ytr, xva, yva, params, 21, rules=rules)
    f = _fired(hook, "Confusion")
    assert len(f) == 1 and f[0].step == 10
    strong = f[0].evidence["strong_off_diagonal"]
    assert strong[0]["true"] == 3 and strong[0]["predicted"] == 8


# -- stop, errors ----------------------------------------------------------------------------------


def test_request_stop_ends_boosting(tmp_path, cancer):
    xtr, _, ytr, _ = cancer
    hook = tv.xgboost.Hook(tmp_path / "run", save=tv.SaveConfig(every=1), strict=True)

    class StopAt(xgb.callback.TrainingCallback):
        def after_iteration(self, model, epoch, evals_log):
            if epoch == 4:
                hook.request_stop("enough")
            return False

    bst = xgb.train(dict(BASE), xgb.DMatrix(xtr, label=ytr), 50, callbacks=[StopAt(), hook])
    assert bst.num_boosted_rounds() == 5
    assert "enough" in hook.stopped_reason
    # the stop arrives as iteration 4 ends: that step is not opened
    assert tv.open(tmp_path / "run").steps()[-1] == 3


def test_rule_stop_ends_boosting(tmp_path, cancer):
    xtr, xva, ytr, yva = cancer
    params = dict(BASE, eta=0.0, eval_metric="logloss")
    dtr = xgb.DMatrix(xtr, label=ytr)
    hook = tv.xgboost.Hook(
        tmp_path / "run",
        collections=["metrics"],
        rules=[tv.rules.get("LossNotDecreasing")],
        on_finding="stop",
        strict=True,
    )
    bst = xgb.train(params, dtr, 5000, evals=[(dtr, "train")], verbose_eval=False, callbacks=[hook])
    assert 11 <= bst.num_boosted_rounds() < 5000
    assert "LossNotDecreasing" in hook.stopped_reason


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"collections": ["weights"]}, "unknown XGBoost collection 'weights'"),
        ({"collections": [tv.Collection("trees", include="x")]}, "is an XGBoost collection"),
        ({"collections": [3]}, "collections must hold"),
        ({"importance_types": ["gain", "shap"]}, "unknown importance type"),
        ({"data": [1, 2]}, "data must be a dict"),
        ({"data": {"val": np.zeros(3)}}, "must be an xgboost.DMatrix"),
        ({"data": {"val": (np.zeros((3, 2)), None)}}, "labels"),
        ({"data": {"a/b": (np.zeros((3, 2)), np.zeros(3))}}, "without '/'"),
        ({"save": 10}, "save must be a tv.SaveConfig"),
        ({"on_finding": "explode"}, "on_finding"),
    ],
)
def test_bad_arguments_raise_typed_errors(tmp_path, kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        tv.xgboost.Hook(tmp_path / "run", **kwargs)


def test_bad_rule_parameters():
    with pytest.raises(InvalidArgumentError, match="threshold"):
        tv.rules.get("FeatureImportanceOverweight", threshold=1.5)
    with pytest.raises(InvalidArgumentError, match="nfeatures"):
        tv.rules.get("FeatureImportanceOverweight", nfeatures=0)
    with pytest.raises(InvalidArgumentError, match="depth"):
        tv.rules.get("TreeDepth", depth="deep")
    with pytest.raises(InvalidArgumentError, match="tensor_regex"):
        tv.rules.get("TreeDepth", tensor_regex="(")


def test_hook_error_never_kills_training_unless_strict(tmp_path, cancer, caplog):
    xtr, _, ytr, _ = cancer
    dtr = xgb.DMatrix(xtr, label=ytr)
    wrong = {"val": (np.zeros((5, 30)), np.full(5, 0.5))}  # not class ids: the hook fails
    hook = tv.xgboost.Hook(tmp_path / "lenient", data=wrong)
    with caplog.at_level(logging.ERROR, logger="tensorvigil"):
        bst = xgb.train(dict(BASE), dtr, 12, callbacks=[hook])
    assert bst.num_boosted_rounds() == 12  # training went on
    assert hook.disabled
    assert "capture disabled" in caplog.text

    strict = tv.xgboost.Hook(tmp_path / "strict", data=wrong, strict=True)
    with pytest.raises(InvalidArgumentError, match="class ids"):
        xgb.train(dict(BASE), dtr, 12, callbacks=[strict])

    cv_hook = tv.xgboost.Hook(tmp_path / "cv", strict=True)
    with pytest.raises(tv.UnsupportedError, match="xgb.cv"):
        xgb.cv(dict(BASE), dtr, 3, nfold=2, callbacks=[cv_hook])


def test_hook_is_single_use(tmp_path, cancer):
    xtr, _, ytr, _ = cancer
    dtr = xgb.DMatrix(xtr, label=ytr)
    hook = tv.xgboost.Hook(tmp_path / "run", strict=True)
    xgb.train(dict(BASE), dtr, 2, callbacks=[hook])
    with pytest.raises(tv.FailedPreconditionError, match="new Hook"):
        xgb.train(dict(BASE), dtr, 2, callbacks=[hook])


# -- report ----------------------------------------------------------------------------------------


def test_report_has_xgboost_section(tmp_path, digits):
    pytest.importorskip("matplotlib")
    pytest.importorskip("PIL")
    from tensorvigil.report import write_report

    x, y = digits
    xtr, xva, ytr, yva = _split(x, y)
    params = {
        "objective": "multi:softprob",
        "num_class": 10,
        "eta": 0.3,
        "max_depth": 3,
        "nthread": 1,
        "seed": 0,
        "eval_metric": ["mlogloss", "merror"],
    }
    _train(tmp_path / "a", xtr, ytr, xva, yva, params, 11)
    out = write_report(tmp_path / "a", tmp_path / "r.html", labels=["depth3"], progress=False)
    with open(out, encoding="utf-8") as f:
        page = f.read()
    sec = page[page.index('<section id="xgboost">') :]
    sec = sec[: sec.index("</section>")]
    assert "multi:softprob" in sec and "max_depth" in sec
    # metric curves, importance bars, tree depth, confusion matrix
    assert sec.count("<img") == 4
    assert "<figcaption>depth3: labels against predictions of" in sec

    # comparing two runs: a curve per (run, eval set), and the depth of every tree of each run
    from tensorvigil.report_xgboost import metrics_figure, tree_depth_figure

    _train(tmp_path / "b", xtr, ytr, xva, yva, dict(params, max_depth=2), 11)
    runs = [tv.open(tmp_path / "a"), tv.open(tmp_path / "b")]
    fig = metrics_figure(runs)
    assert [ax.get_title() for ax in fig.axes] == ["merror", "mlogloss"]
    assert all(len(ax.get_lines()) == 4 for ax in fig.axes)  # (train, validation) x 2 runs
    fig = tree_depth_figure(runs)
    depth_a, depth_b = (line.get_ydata() for line in fig.axes[0].get_lines())
    assert len(depth_a) == len(depth_b) == 11 * 10  # 11 rounds of 10 trees (one per class)
    assert max(depth_a) == 3 and max(depth_b) == 2
