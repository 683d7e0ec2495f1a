"""The unlearning audit: the attacks on hand-made scores, `audit` and `gaps` on a tiny model, the plot, and
`cvfm evaluate unlearning` end to end on real digit images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from clitools import assert_usage_error, one_json_line
from conftest import classifier_top1
from torch import nn

from cvfm.data.exclude import ids_sha256
from cvfm.data.loader import SkipLog
from cvfm.data.sources import open_source, subset
from cvfm.data.views import Preprocess
from cvfm.unlearn.audit import Audit, audit, audit_splits, gaps
from cvfm.unlearn.mia import (
    loss_threshold_auc,
    mia_efficacy,
    mia_training_set,
    predictions,
    true_label_confidence,
)
from cvfm.unlearn.plot import plot_attack_scores

# ------------------------------------------------------------------------------------------ the attacks


def test_mia_efficacy_calls_test_like_forget_non_member_and_retain_like_forget_member():
    rng = np.random.default_rng(0)
    members = rng.uniform(0.95, 1.0, 200)  # retain: confident
    nonmembers = rng.uniform(0.1, 0.4, 50)  # test: unsure
    assert mia_efficacy(members, nonmembers, rng.uniform(0.1, 0.4, 30)) == 1.0  # forgotten
    assert mia_efficacy(members, nonmembers, rng.uniform(0.95, 1.0, 30)) == 0.0  # still remembered
    half = np.concatenate([rng.uniform(0.1, 0.4, 10), rng.uniform(0.95, 1.0, 30)])
    assert mia_efficacy(members, nonmembers, half) == pytest.approx(10 / 40)


def test_mia_training_set_balances_members_and_non_members_with_a_seeded_subset():
    members, nonmembers = np.arange(100) / 100.0, np.full(20, 5.0)
    x, y = mia_training_set(members, nonmembers, seed=3)
    assert x.shape == (40, 1) and y.tolist() == [1] * 20 + [0] * 20
    picked = x[:20, 0]
    assert set(picked) <= set(members) and len(set(picked)) == 20  # distinct members, no replacement
    assert (x[20:, 0] == 5.0).all()
    again, _ = mia_training_set(members, nonmembers, seed=3)
    other, _ = mia_training_set(members, nonmembers, seed=4)
    np.testing.assert_array_equal(x, again)
    assert not np.array_equal(x, other)
    few, y_few = mia_training_set(members[:5], np.arange(20) + 5.0, seed=3)  # fewer members: all of them,
    assert few[:5, 0].tolist() == members[:5].tolist() and y_few.tolist() == [1] * 5 + [0] * 5
    assert len(set(few[5:, 0])) == 5 and set(few[5:, 0]) <= set(np.arange(20) + 5.0)  # and as many others


def test_mia_efficacy_is_not_saturated_by_more_non_members_than_members():
    """A forget set that looks like retain (confident) is called member even when the test set
    outnumbers retain (a small training set): unbalanced, the SVM called everything non-member."""
    rng = np.random.default_rng(0)
    members = rng.uniform(0.97, 1.0, 90)
    nonmembers = np.concatenate([rng.uniform(0.97, 1.0, 100), rng.uniform(0.0, 0.9, 100)])
    assert mia_efficacy(members, nonmembers, rng.uniform(0.97, 1.0, 10)) < 0.5


def test_mia_efficacy_is_deterministic_for_a_seed():
    rng = np.random.default_rng(1)
    members, nonmembers, target = rng.beta(5, 1, 300), rng.beta(2, 2, 60), rng.beta(3, 2, 40)
    assert mia_efficacy(members, nonmembers, target, seed=7) == mia_efficacy(
        members, nonmembers, target, seed=7
    )


def test_mia_efficacy_rejects_empty_sets():
    with pytest.raises(ValueError, match="members and non-members"):
        mia_efficacy(np.zeros(0), np.ones(3), np.ones(2))
    with pytest.raises(ValueError, match="non-empty target"):
        mia_efficacy(np.ones(3), np.zeros(3), np.zeros(0))


def test_loss_auc_separable_and_identical_distributions():
    assert loss_threshold_auc([0.01, 0.02, 0.03], [1.0, 2.0]) == 1.0  # members have lower loss
    assert loss_threshold_auc([1.0, 2.0], [0.01, 0.02, 0.03]) == 0.0
    rng = np.random.default_rng(0)
    same = loss_threshold_auc(rng.exponential(1.0, 4000), rng.exponential(1.0, 4000))
    assert same == pytest.approx(0.5, abs=0.02)


def test_loss_auc_equals_the_pair_count_by_hand():
    # P(member loss < non-member loss), ties half: pairs (m, n) with m in members, n in non-members.
    members, nonmembers = [0.1, 0.4, 0.35, 0.3], [0.8, 0.3]
    # 0.1: wins both (2); 0.4: wins vs 0.8 (1); 0.35: wins vs 0.8 (1); 0.3: wins vs 0.8, ties 0.3 (1.5)
    assert loss_threshold_auc(members, nonmembers) == pytest.approx(5.5 / 8)


def test_true_label_confidence_picks_each_rows_label():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    np.testing.assert_allclose(true_label_confidence(probs, np.array([1, 2])), [0.2, 0.6])


# ------------------------------------------------------------------------------------ a tiny classifier


class PixelLinear(nn.Module):
    """Flattened 8x8 pixels -> logits: a classifier small enough to train in a test."""

    def __init__(self, classes: list[str]):
        super().__init__()
        self.classes = list(classes)
        self.preprocess = Preprocess(size=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=1.0)
        self.linear = nn.Linear(3 * 8 * 8, len(classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


def _tensors(model: PixelLinear, source) -> tuple[torch.Tensor, torch.Tensor]:
    transform = model.preprocess.transform()
    images = torch.stack([transform(source.load(i)) for i in range(len(source))])
    return images, torch.from_numpy(source.labels)


@pytest.fixture(scope="module")
def digits():
    """builtin:digits: 300 training items (forget = the first 40) and 120 test items, and a PixelLinear
    trained on all 300 (so it has seen the forget set)."""
    train = subset(open_source("builtin:digits", split="train"), range(300))
    test = subset(open_source("builtin:digits", split="test"), range(120))
    forget, retain = subset(train, range(40)), subset(train, range(40, 300))
    torch.manual_seed(0)
    model = PixelLinear(train.classes)
    x, y = _tensors(model, train)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), retain, forget, test


def _accuracy(model, source) -> float:
    x, y = _tensors(model, source)
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def test_predictions_match_a_direct_forward(digits):
    model, _, forget, _ = digits
    probs, labels, losses = predictions(model, forget, transform=model.preprocess.transform(), batch_size=16)
    x, y = _tensors(model, forget)
    with torch.no_grad():
        expected = model(x).softmax(1).numpy()
    assert probs.shape == (40, 10) and labels.tolist() == y.tolist()
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    np.testing.assert_allclose(losses, -np.log(expected[np.arange(40), y.numpy()]), rtol=1e-4, atol=1e-6)
    assert model.training is False


def test_predictions_skip_unreadable_images(tmp_path, make_image):
    for i in range(3):
        make_image(tmp_path / "a" / f"{i}.png", (10, 10, 10))
        make_image(tmp_path / "b" / f"{i}.png", (240, 240, 240))
    (tmp_path / "b" / "broken.png").write_bytes(b"not a png")
    source = open_source(str(tmp_path))
    model = PixelLinear(["a", "b"])
    skips = SkipLog()
    probs, labels, losses = predictions(model, source, transform=model.preprocess.transform(), skips=skips)
    assert len(probs) == len(labels) == len(losses) == 6
    assert [e["where"].endswith("broken.png") for e in skips.as_list()] == [True]


def test_audit_metrics_match_independent_accuracies(digits):
    model, retain, forget, test = digits
    result = audit(model, retain=retain, forget=forget, test=test, transform=model.preprocess.transform())
    assert result["ua"] == pytest.approx(1 - _accuracy(model, forget), abs=1e-6)
    assert result["ra"] == pytest.approx(_accuracy(model, retain), abs=1e-6)
    assert result["ta"] == pytest.approx(_accuracy(model, test), abs=1e-6)
    assert result["counts"] == {"retain": 260, "forget": 40, "test": 120}  # the attacks: the next test
    assert not {"forget_test_accuracy", "loss_auc_forget_test", "max_samples"} & set(result)
    # the attack scores are kept aside, not in the JSON
    assert isinstance(result, Audit) and "scores" not in json.loads(json.dumps(result))
    assert {k: len(v["loss"]) for k, v in result.scores.items()} == {"retain": 260, "forget": 40, "test": 120}
    conf = result.scores["forget"]["confidence"]
    np.testing.assert_allclose(conf, np.exp(-result.scores["forget"]["loss"]), rtol=1e-4)


def test_audit_attacks_are_the_attack_functions_on_the_scores(digits):
    model, retain, forget, test = digits
    result = audit(
        model, retain=retain, forget=forget, test=test, transform=model.preprocess.transform(), seed=5
    )
    s = result.scores
    expected = mia_efficacy(
        s["retain"]["confidence"], s["test"]["confidence"], s["forget"]["confidence"], seed=5
    )
    assert result["mia_efficacy"] == pytest.approx(expected, abs=1e-6)
    assert result["loss_auc"] == pytest.approx(
        loss_threshold_auc(s["forget"]["loss"], s["test"]["loss"]), abs=1e-6
    )
    assert result["loss_auc_retain"] == pytest.approx(
        loss_threshold_auc(s["retain"]["loss"], s["test"]["loss"]), abs=1e-6
    )


def test_audit_max_samples_subsamples_retain_reproducibly(digits):
    model, retain, forget, test = digits
    kw = dict(retain=retain, forget=forget, test=test, transform=model.preprocess.transform(), max_samples=50)
    a, b = audit(model, **kw), audit(model, **kw)
    assert a["counts"]["retain"] == 50 and a["counts"]["retain_total"] == 260 and a["max_samples"] == 50
    assert a == b


def test_audit_reports_forget_test_accuracy(digits):
    model, retain, forget, test = digits
    is_zero = test.labels == 0
    kept, gone = subset(test, np.flatnonzero(~is_zero)), subset(test, np.flatnonzero(is_zero))
    result = audit(
        model,
        retain=retain,
        forget=forget,
        test=kept,
        forget_test=gone,
        transform=model.preprocess.transform(),
    )
    assert result["forget_test_accuracy"] == pytest.approx(_accuracy(model, gone), abs=1e-6)
    s = result.scores
    expected = loss_threshold_auc(s["forget"]["loss"], s["forget_test"]["loss"])
    assert result["loss_auc_forget_test"] == pytest.approx(expected, abs=1e-6)
    assert result["counts"]["forget_test"] == len(gone) and result["counts"]["test"] == len(kept)


def test_audit_splits_equals_one_audit_per_split(digits):
    """Validation and test audited together (retain and forget predicted once) give what one audit per
    split gives: the benchmark chooses settings on the one and reports the other."""
    model, retain, forget, test = digits
    val, rest = subset(test, range(0, 120, 2)), subset(test, range(1, 120, 2))
    kw = dict(retain=retain, forget=forget, transform=model.preprocess.transform(), seed=3)
    both = audit_splits(model, splits={"val": (val, None), "test": (rest, None)}, **kw)
    assert both["val"] == audit(model, test=val, **kw) and both["test"] == audit(model, test=rest, **kw)
    assert both["val"]["counts"] == {"retain": 260, "forget": 40, "test": 60}
    assert both["val"]["ta"] != both["test"]["ta"] or both["val"]["loss_auc"] != both["test"]["loss_auc"]


def test_gaps_are_absolute_differences_in_points_and_their_mean():
    metrics = {"ua": 0.10, "ra": 0.95, "ta": 0.90, "mia_efficacy": 0.30, "loss_auc": 0.6}
    reference = {"ua": 0.15, "ra": 0.97, "ta": 0.86, "mia_efficacy": 0.20, "loss_auc": 0.5}
    g = gaps(metrics, reference)
    assert g == pytest.approx({"ua": 5.0, "ra": 2.0, "ta": 4.0, "mia_efficacy": 10.0, "avg_gap": 5.25})
    assert gaps(metrics, metrics)["avg_gap"] == 0.0
    with pytest.raises(ValueError, match="mia_efficacy"):
        gaps({"ua": 0, "ra": 0, "ta": 0}, reference)


def test_plot_writes_a_png_atomically(digits, tmp_path):
    model, retain, forget, test = digits
    kw = dict(retain=retain, forget=forget, test=test, transform=model.preprocess.transform())
    after = audit(model, **kw)
    out = plot_attack_scores(tmp_path / "plots" / "attack.png", after=after, before=after, reference=after)
    assert out == tmp_path / "plots" / "attack.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    assert sorted(p.name for p in out.parent.iterdir()) == ["attack.png"]  # no temporary file left
    single = plot_attack_scores(tmp_path / "after.png", after=after)
    assert single.read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------------- CLI end to end


@pytest.fixture(scope="module")
def classifiers(digit_folder, tmp_path_factory):
    """Classifiers on the digit folder (4 classes, 32 + 8 per class): a tiny-resnet backbone (random
    init, frozen) with a linear head fitted on all training items ("original"), one fitted without
    the first 8 ("unlearned", with an unlearn.json saying so: exact, method head), one fitted without
    them from another initialisation ("reference", an independent retrain), and one fitted without the
    class "three" ("no_three")."""
    from cvfm.eval.features import extract_features
    from cvfm.models.classifier import Classifier, LinearHead
    from cvfm.registry import create_encoder

    root = tmp_path_factory.mktemp("classifiers")
    train = open_source(str(digit_folder), split="train")
    forget_ids = [it.id for it in train.items[:8]]
    torch.manual_seed(0)
    encoder = create_encoder("cvfm/tiny-resnet")
    feats, labels, _ = extract_features(encoder, train, batch_size=64)

    def fit(rows: np.ndarray, folder: Path, seed: int = 0) -> Path:
        torch.manual_seed(seed)
        head = LinearHead(encoder.num_features, len(train.classes))
        x, y = torch.from_numpy(feats[rows]), torch.from_numpy(labels[rows])
        head.mean.copy_(x.mean(0))
        head.std.copy_(x.std(0) + 1e-6)
        opt = torch.optim.Adam(head.parameters(), lr=0.05)
        for _ in range(100):
            opt.zero_grad()
            nn.functional.cross_entropy(head(x), y).backward()
            opt.step()
        Classifier(encoder, head, train.classes, frozen=True).save(folder / "classifier")
        return folder

    original = fit(np.arange(len(train)), root / "original")
    unlearned = fit(np.arange(8, len(train)), root / "unlearned")
    reference = fit(np.arange(8, len(train)), root / "reference", seed=1)
    no_three = fit(np.flatnonzero(labels != train.classes.index("three")), root / "no_three")
    (root / "forget.txt").write_text("".join(f"{i}\n" for i in forget_ids))
    record = {
        "method": "head",
        "exact": True,
        "original": str(original),
        "forget_ids_sha256": ids_sha256(forget_ids),
        "wall_s": 1.5,
    }
    (unlearned / "unlearn.json").write_text(json.dumps(record))
    return {
        "root": root,
        "original": original,
        "unlearned": unlearned,
        "reference": reference,
        "no_three": no_three,
        "forget": root / "forget.txt",
    }


def test_cli_audits_an_exact_unlearning_against_its_reference(cli, digit_folder, classifiers, tmp_path):
    c = classifiers
    plot, output = tmp_path / "attack.png", tmp_path / "audit.jsonl"
    args = ["evaluate", "unlearning", c["unlearned"], "--data", digit_folder, "--forget", c["forget"]]
    r = cli(*args, "--reference", c["reference"], "--plot", plot, "--num-workers", "0")
    rec = one_json_line(r)
    assert rec["task"] == "unlearning" and rec["model"] == str(c["unlearned"])
    assert rec["guarantee"] == "exact" and "head" in rec["guarantee_basis"] and rec["method"] == "head"
    assert rec["original"] == str(c["original"])  # the default "before" comes from unlearn.json
    assert rec["forget"]["count"] == 8 and rec["forget"]["matches_model"] is True
    assert rec["data"] == {
        "split": "train",
        "test_split": "test",
        "train": 128,
        "retain": 120,
        "test": 32,
        "skipped": [],
    }
    m, before, ref = rec["metrics"], rec["before"], rec["reference"]
    assert m["counts"] == {"retain": 120, "forget": 8, "test": 32}
    assert set(m) >= {"ua", "ra", "ta", "mia_efficacy", "loss_auc", "loss_auc_retain"}
    assert before["counts"] == ref["counts"] == m["counts"] and before != m
    # Each model's accuracies, computed here from its saved classifier.
    train, test = open_source(str(digit_folder), split="train"), open_source(str(digit_folder), split="test")
    forget, retain = subset(train, range(8)), subset(train, range(8, len(train)))
    for metrics, folder in ((m, c["unlearned"]), (before, c["original"]), (ref, c["reference"])):
        assert metrics["ua"] == pytest.approx(1 - classifier_top1(folder, forget), abs=1e-6)
        assert metrics["ra"] == pytest.approx(classifier_top1(folder, retain), abs=1e-6)
        assert metrics["ta"] == pytest.approx(classifier_top1(folder, test), abs=1e-6)
    # The gaps to the independent reference, in points.
    keys = ("ua", "ra", "ta", "mia_efficacy")
    for gap, metrics in ((rec["gap"], m), (rec["gap_before"], before)):
        points = {k: abs(metrics[k] - ref[k]) * 100 for k in keys}
        assert gap == pytest.approx({**points, "avg_gap": sum(points.values()) / 4}, abs=1e-4)
    assert rec["gap"]["avg_gap"] > 0
    assert rec["wall_s"]["unlearning"] == 1.5 and rec["wall_s"]["audit"] > 0
    assert rec["plot"] == str(plot) and plot.read_bytes()[:4] == b"\x89PNG"

    r = cli(*args, "--original", c["original"], "--num-workers", "0", "--output", output)
    assert r.code == 0 and r.out == ""
    again = json.loads(output.read_text().splitlines()[0])
    assert again["metrics"] == m and again["before"] == before and again["reference"] is None
    assert again["gap"] is None


def test_cli_class_forgetting_without_unlearn_record_is_empirical(cli, digit_folder, classifiers):
    c = classifiers
    r = cli(
        "evaluate",
        "unlearning",
        c["no_three"],
        "--data",
        digit_folder,
        "--forget-class",
        "three",
        "--num-workers",
        "0",
        "--max-samples",
        "40",
    )
    rec = one_json_line(r)
    assert rec["guarantee"] == "empirical" and "no unlearn.json" in rec["guarantee_basis"]
    assert rec["before"] is None and rec["method"] is None and rec["forget"]["matches_model"] is None
    assert rec["forget"]["count"] == 32 and rec["forget"]["test_count"] == 8
    assert rec["metrics"]["counts"] == {
        "retain": 40,
        "forget": 32,
        "test": 24,
        "forget_test": 8,
        "retain_total": 96,
    }
    test = open_source(str(digit_folder), split="test")
    threes = subset(test, np.flatnonzero(test.labels == test.classes.index("three")))
    assert rec["metrics"]["forget_test_accuracy"] == pytest.approx(
        classifier_top1(c["no_three"], threes), abs=1e-6
    )
    assert rec["metrics"]["forget_test_accuracy"] < rec["metrics"]["ta"]  # it never saw a three


def test_cli_other_forget_set_than_the_models_is_not_exact(cli, digit_folder, classifiers):
    c = classifiers
    r = cli(
        "evaluate",
        "unlearning",
        c["unlearned"],
        "--data",
        digit_folder,
        "--forget-where",
        "id=one/*",
        "--num-workers",
        "0",
    )
    rec = one_json_line(r)
    assert rec["guarantee"] == "empirical" and "different forget set" in rec["guarantee_basis"]
    assert rec["forget"]["matches_model"] is False and rec["forget"]["count"] == 32


def test_cli_usage_errors(cli, digit_folder, classifiers):
    base = ["evaluate", "unlearning", classifiers["unlearned"], "--data", digit_folder]
    assert_usage_error(cli(*base), "--forget FILE")
    assert_usage_error(cli(*base, "--forget-class", "seven"), "seven", "not a class")
    assert_usage_error(
        cli(
            "evaluate",
            "unlearning",
            classifiers["root"] / "nowhere",
            "--data",
            digit_folder,
            "--forget-class",
            "one",
        ),
        "does not exist",
        "classifier.json",
    )


def test_cli_help_has_examples(cli):
    r = cli("evaluate", "unlearning", "--help")
    assert r.code == 0 and "cvfm evaluate unlearning" in r.out and "--forget-class" in r.out


def test_relabel_renumbers_by_class_name(image_folder):
    from cvfm.data.sources import relabel
    from cvfm.errors import UsageError

    source = open_source(str(image_folder))  # classes cat (0), dog (1)
    swapped = relabel(source, ["dog", "cat", "bird"], what="model")
    assert swapped.labels.tolist() == [1 - y for y in source.labels.tolist()]
    assert swapped.classes == ["dog", "cat", "bird"] and source.classes == ["cat", "dog"]
    assert relabel(source, ["cat", "dog"], what="model") is source
    with pytest.raises(UsageError, match="unknown to the model 'm': dog"):
        relabel(source, ["cat", "bird"], what="model 'm'")
