"""Data and output rules: firing, silence, parameters, end to end."""

import json
import os

import numpy as np
import pytest
from rule_helpers import fired, run_rule, steps_of

import tensorvigil as tv
from tensorvigil.rules.builtin.data import (
    CheckInputImages,
    ClassImbalance,
    Confusion,
    NLPSequenceRatio,
)


def write_run(path, steps, collections=None):
    """Writes ``steps`` (a list of {name: value}) as steps 0.. (custom tensors)."""
    with tv.StoreWriter(path) as w:
        for s, tensors in enumerate(steps):
            for name, value in tensors.items():
                w.write(name, s, value)
            w.commit(s)
    names = sorted({n for t in steps for n in t})
    with open(os.path.join(path, "collections.json"), "w", encoding="utf-8") as f:
        json.dump(collections or {"custom": names}, f)
    return path


# -- ClassImbalance -----------------------------------------------------------------------------


def test_class_imbalance_fires_after_samples_on_imbalance(tmp_run, rng):
    steps = []
    for _ in range(8):
        y = np.where(rng.uniform(size=100) < 0.95, 0, 1).astype(np.int64)
        y[:2] = 1
        steps.append({"labels": y, "predictions": y.copy()})
    write_run(tmp_run, steps)
    found = fired(run_rule(tmp_run, ClassImbalance()))
    assert steps_of(found) == [4]  # 500 labels after step 4
    ev = found[0].evidence
    assert ev["largest_class"] == 0 and ev["smallest_class"] == 1
    assert ev["ratio"] > 10 and ev["threshold_imbalance"] == 10 and ev["samples"] == 500


def test_class_imbalance_fires_on_misprediction(tmp_run, rng):
    steps = []
    for _ in range(6):
        y = rng.integers(0, 3, 120)
        p = np.where(y == 2, 0, y)  # class 2 always predicted as 0
        steps.append({"train/labels": y, "train/predictions": np.eye(3)[p]})
    write_run(tmp_run, steps)
    found = fired(run_rule(tmp_run, ClassImbalance(argmax=True)))
    assert steps_of(found) == [4]
    (cls,) = found[0].evidence["classes"]
    assert cls["class"] == 2 and cls["misprediction"] == 1.0
    assert found[0].evidence["threshold_misprediction"] == 0.7


def test_class_imbalance_silent_when_balanced_and_mostly_right(tmp_run, rng):
    steps = []
    for _ in range(10):
        y = rng.integers(0, 4, 100)
        p = np.where(rng.uniform(size=100) < 0.8, y, (y + 1) % 4)
        steps.append({"labels": y, "predictions": p})
    write_run(tmp_run, steps)
    assert fired(run_rule(tmp_run, ClassImbalance())) == []


# -- Confusion ----------------------------------------------------------------------------------


def test_confusion_fires_on_weak_diagonal_and_strong_off_diagonal(tmp_run, rng):
    y = np.repeat(np.arange(3), 20)
    bad = y.copy()
    bad[20:30] = 0  # half of class 1 predicted as 0
    steps = [{"labels": y, "predictions": y}] * 2 + [{"labels": y, "predictions": bad}] * 2
    write_run(tmp_run, steps)
    found = fired(run_rule(tmp_run, Confusion()))
    assert steps_of(found) == [2]
    ev = found[0].evidence
    assert ev["weak_diagonal"] == [{"true": 1, "predicted": 1, "share": 0.5}]
    assert ev["strong_off_diagonal"] == [{"true": 1, "predicted": 0, "share": 0.5}]
    assert ev["matrix"] == [[20, 0, 0], [10, 10, 0], [0, 0, 20]]
    assert (ev["min_diag"], ev["max_off_diag"]) == (0.9, 0.1)


def test_confusion_silent_on_good_predictions(tmp_run, rng):
    y = np.repeat(np.arange(4), 50)
    p = y.copy()
    p[::40] = (p[::40] + 1) % 4  # 2.5% wrong per class
    write_run(tmp_run, [{"labels": y, "predictions": p}] * 5)
    assert fired(run_rule(tmp_run, Confusion(category_no=4))) == []


def test_confusion_class_id_out_of_range_is_a_rule_error(tmp_run):
    write_run(tmp_run, [{"labels": np.array([0, 5]), "predictions": np.array([0, 5])}])
    (f,) = run_rule(tmp_run, Confusion(category_no=3))
    assert f.kind == "error" and "category_no=3" in f.message


# -- CheckInputImages ---------------------------------------------------------------------------


def test_check_input_images_fires_on_unnormalised_images(tmp_run, rng):
    steps = [{"input_image": rng.uniform(0, 1, (100, 3, 4, 4)).astype(np.float32)}] * 7
    write_run(tmp_run, steps)
    found = fired(run_rule(tmp_run, CheckInputImages()))
    assert steps_of(found) == [4]  # 500 images
    ev = found[0].evidence
    assert ev["channels_off"] == [0, 1, 2] and ev["images"] == 500
    assert all(abs(m - 0.5) < 0.05 for m in ev["channel_means"])


def test_check_input_images_silent_on_normalised_images_nhwc(tmp_run, rng):
    steps = [{"batch/input_image": rng.standard_normal((100, 4, 4, 3)).astype(np.float32)}] * 6
    write_run(tmp_run, steps)
    assert fired(run_rule(tmp_run, CheckInputImages(channel=-1))) == []


# -- NLPSequenceRatio ---------------------------------------------------------------------------


def tokens(rng, pad_share, unk_share=0.0, n=400):
    t = rng.integers(2, 1000, n)
    u = rng.uniform(size=n)
    t[u < pad_share] = 0
    t[(u >= pad_share) & (u < pad_share + unk_share)] = 1
    return t


def test_nlp_sequence_ratio_fires_on_padding_and_unknown(tmp_run, rng):
    steps = [
        {"embedding/input": tokens(rng, 0.1)},
        {"embedding/input": tokens(rng, 0.7)},
        {"embedding/input": tokens(rng, 0.7)},
        {"embedding/input": tokens(rng, 0.1, 0.3)},
    ]
    write_run(tmp_run, steps, {"inputs": ["embedding/input"]})
    found = fired(
        run_rule(tmp_run, NLPSequenceRatio(token_values="0,1", token_thresholds_percent="50,20"))
    )
    assert steps_of(found) == [1, 3]
    assert [t["token"] for t in found[0].evidence["tokens"]] == [0]
    assert [t["token"] for t in found[1].evidence["tokens"]] == [1]
    assert found[1].evidence["tokens"][0]["threshold_percent"] == 20


def test_nlp_sequence_ratio_silent_below_threshold(tmp_run, rng):
    steps = [{"encoder.embedding/input": tokens(rng, 0.3)} for _ in range(5)]
    write_run(tmp_run, steps, {"inputs": ["encoder.embedding/input"]})
    assert fired(run_rule(tmp_run, NLPSequenceRatio())) == []


# -- needs and parameters -----------------------------------------------------------------------


def test_data_rules_need_values_and_report_missing_tensors(tmp_run):
    for r in (ClassImbalance(), Confusion(), CheckInputImages(), NLPSequenceRatio()):
        assert r.needs.values and r.needs.regex and "needs" not in r.params()
    write_run(tmp_run, [{"loss": 1.0}], {"losses": ["loss"]})
    (f,) = run_rule(tmp_run, CheckInputImages())
    assert f.kind == "not_applicable" and "input_image" in f.message


@pytest.mark.parametrize(
    "cls, kwargs, param",
    [
        (ClassImbalance, {"threshold_imbalance": 0.5}, "threshold_imbalance"),
        (ClassImbalance, {"threshold_misprediction": 1}, "threshold_misprediction"),
        (ClassImbalance, {"samples": 0}, "samples"),
        (ClassImbalance, {"argmax": 1}, "argmax"),
        (ClassImbalance, {"labels_regex": "("}, "labels_regex"),
        (Confusion, {"category_no": 1}, "category_no"),
        (Confusion, {"min_diag": 1.5}, "min_diag"),
        (Confusion, {"max_off_diag": -0.1}, "max_off_diag"),
        (CheckInputImages, {"threshold_mean": -1}, "threshold_mean"),
        (CheckInputImages, {"threshold_samples": 2.5}, "threshold_samples"),
        (CheckInputImages, {"channel": "1"}, "channel"),
        (NLPSequenceRatio, {"token_values": "a"}, "token_values"),
        (NLPSequenceRatio, {"token_values": "0.5"}, "token_values"),
        (NLPSequenceRatio, {"token_thresholds_percent": "50,20"}, "token_thresholds_percent"),
        (NLPSequenceRatio, {"token_thresholds_percent": 150}, "token_thresholds_percent"),
        (NLPSequenceRatio, {"tensor_regex": ""}, "tensor_regex"),
    ],
)
def test_invalid_parameters_name_the_parameter(cls, kwargs, param):
    with pytest.raises(tv.InvalidArgumentError, match=param):
        cls(**kwargs)


def test_defaults():
    r = ClassImbalance()
    assert (r.threshold_imbalance, r.threshold_misprediction, r.samples, r.argmax) == (
        10,
        0.7,
        500,
        False,
    )
    assert (r.labels_regex, r.predictions_regex) == (".*labels", ".*predictions")
    c = Confusion()
    assert (c.category_no, c.min_diag, c.max_off_diag) == (None, 0.9, 0.1)
    i = CheckInputImages()
    assert (i.threshold_mean, i.threshold_samples, i.regex, i.channel) == (
        0.2,
        500,
        ".*input_image",
        1,
    )
    n = NLPSequenceRatio(token_values=[0, 1], token_thresholds_percent=[50, 10])
    assert n.params()["token_values"] == [0, 1]
    assert NLPSequenceRatio().tensor_regex == ".*embedding.*input"


# -- end to end: a real PyTorch training --------------------------------------------------------


def test_end_to_end_torch_recorded_labels_and_images(tmp_path):
    torch = pytest.importorskip("torch")
    nn = torch.nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    run = str(tmp_path / "run")
    hook = tv.torch.Hook(
        run, collections=["losses", "custom"], save=tv.SaveConfig(every=1), strict=True
    )
    hook.register(model, optimizer=opt)
    with hook:
        for _ in range(6):
            x = torch.rand(100, 3, 4, 4, generator=g)  # images in [0, 1]: not normalised
            y = (torch.rand(100, generator=g) < 0.03).long()  # ~97% class 0
            out = model(x)
            hook.record_tensor("input_image", x)
            hook.record_tensor("labels", y)
            hook.record_tensor("predictions", out.detach())
            loss = nn.functional.cross_entropy(out, y)
            hook.record_loss(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
    rules = [CheckInputImages(), ClassImbalance(argmax=True), Confusion(argmax=True)]
    found = fired(tv.rules.RuleEngine(run, rules, record=False).poll())
    names = {f.rule for f in found}
    assert {"CheckInputImages", "ClassImbalance", "Confusion"} <= names, [str(f) for f in found]
    first = {f.rule: f.step for f in reversed(found)}
    assert first["CheckInputImages"] == 4  # 500 images
