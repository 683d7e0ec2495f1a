"""k-NN, top-k accuracy and the linear probe on hand-made inputs, and `evaluate` as a library call."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cvfm.errors import UsageError
from cvfm.eval.knn import knn_evaluate, knn_predict_scores, topk_accuracy
from cvfm.eval.linear import linear_evaluate
from cvfm.eval.run import evaluate

# ---------------------------------------------------------------------------------------------- k-NN


def _two_clusters():
    """Class 0 points near +x, class 1 near +y (2-D, so cosine similarity is just the angle)."""
    train = np.array(
        [[1.0, 0.05], [1.0, -0.05], [0.9, 0.1], [0.05, 1.0], [-0.05, 1.0], [0.1, 0.9]], np.float32
    )
    labels = np.array([0, 0, 0, 1, 1, 1])
    return train, labels


def test_knn_query_near_a_cluster_gets_its_label():
    train, labels = _two_clusters()
    queries = torch.tensor([[2.0, 0.3], [0.2, 3.0], [1.0, -0.2]])
    scores = knn_predict_scores(
        torch.from_numpy(train), torch.from_numpy(labels), queries, k=3, num_classes=2
    )
    assert scores.shape == (3, 2)
    assert scores.argmax(dim=1).tolist() == [0, 1, 0]


def test_knn_scores_are_exp_similarity_over_temperature_by_hand():
    # 3-point bank: a (class 0), b (class 1), c (class 1); query q. Cosine similarities by hand.
    bank = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], np.float32)
    bank_labels = np.array([0, 1, 1])
    q = np.array([[0.8, 0.6]], np.float32)  # unit: sims 0.8 (a), 0.96 (b), 0.6 (c)
    t = 0.1
    scores = knn_predict_scores(
        torch.from_numpy(bank),
        torch.from_numpy(bank_labels),
        torch.from_numpy(q),
        k=2,
        num_classes=3,
        temperature=t,
    )
    # The two nearest are b (0.96, class 1) and a (0.8, class 0); c is not among them.
    expected = [math.exp(0.8 / t), math.exp(0.96 / t), 0.0]
    np.testing.assert_allclose(scores[0].double().numpy(), expected, rtol=1e-4)


def test_knn_scores_ignore_feature_scale():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1])
    q = torch.tensor([[3.0, 1.0]])
    a = knn_predict_scores(bank, labels, q, k=2, num_classes=2)
    b = knn_predict_scores(10 * bank, labels, 0.01 * q, k=2, num_classes=2)
    torch.testing.assert_close(a, b)


def test_knn_k_larger_than_bank_uses_the_whole_bank():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    scores = knn_predict_scores(
        bank, torch.tensor([0, 1]), torch.tensor([[1.0, 0.0]]), k=50, num_classes=2, temperature=1.0
    )
    np.testing.assert_allclose(scores[0].numpy(), [math.e, 1.0], rtol=1e-5)


def test_knn_chunking_does_not_change_scores():
    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(20, 4, generator=g), torch.randn(7, 4, generator=g)
    labels = torch.randint(0, 3, (20,), generator=g)
    whole = knn_predict_scores(bank, labels, queries, k=5, num_classes=3)
    chunked = knn_predict_scores(bank, labels, queries, k=5, num_classes=3, chunk=2)
    torch.testing.assert_close(whole, chunked)


def test_knn_evaluate_several_k_and_top5_only_with_more_than_five_classes():
    train, labels = _two_clusters()
    test = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.75]], np.float32)
    test_labels = np.array([0, 1, 1])
    metrics = knn_evaluate(train, labels, test, test_labels, ks=(1, 2, 5))
    assert set(metrics) == {"knn_top1@1", "knn_top1@2", "knn_top1@5"}
    # (0.7, 0.75) is closest in angle to (0.1, 0.9) (cos 0.80), then (0.05, 1) (0.76), (0.9, 0.1) (0.76),
    # (1, 0.05) (0.72), (-0.05, 1) (0.70): class 1 at k = 1 and 2; at k = 5 class 1 weighs
    # e^(0.80/T) + e^(0.76/T) + e^(0.70/T) against e^(0.76/T) + e^(0.72/T) for class 0. The two
    # axis-aligned queries have their own class's three points nearest.
    assert metrics == {"knn_top1@1": 1.0, "knn_top1@2": 1.0, "knn_top1@5": 1.0}

    rng = np.random.default_rng(0)
    centres = np.eye(8, dtype=np.float32)[:6] * 5
    y = np.repeat(np.arange(6), 5)
    x = centres[y] + rng.normal(0, 0.3, (30, 8)).astype(np.float32)
    many = knn_evaluate(x, y, x, y, ks=(3, 7))
    assert set(many) == {"knn_top1@3", "knn_top5@3", "knn_top1@7", "knn_top5@7"}
    assert many["knn_top1@3"] == pytest.approx(1.0)
    assert many["knn_top5@7"] >= many["knn_top1@7"]


@pytest.mark.parametrize("ks", [(0,), (5, -1), ()])
def test_knn_evaluate_rejects_k_below_one(ks):
    train, labels = _two_clusters()
    with pytest.raises(UsageError, match="k"):
        knn_evaluate(train, labels, train, labels, ks=ks)


def test_topk_accuracy_on_a_hand_made_score_matrix():
    scores = torch.tensor(
        [
            [0.9, 0.05, 0.03, 0.02],  # label 0: top-1 hit
            [0.1, 0.2, 0.6, 0.1],  # label 1: 2nd best -> top-2 hit only
            [0.5, 0.1, 0.1, 0.3],  # label 3: 2nd best
            [0.4, 0.3, 0.2, 0.1],  # label 3: last -> only top-4
        ]
    )
    labels = torch.tensor([0, 1, 3, 3])
    acc = topk_accuracy(scores, labels, ks=(1, 2, 3, 4, 5))
    assert acc[1] == pytest.approx(0.25)
    assert acc[2] == pytest.approx(0.75)
    assert acc[3] == pytest.approx(0.75)
    assert acc[4] == pytest.approx(1.0)
    assert acc[5] == pytest.approx(1.0)  # k beyond the number of classes is capped


# ---------------------------------------------------------------------------------------------- linear


def _blobs(n_per_class: int, classes: int, dim: int, seed: int, spread: float = 0.5):
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(123).normal(0, 3, (classes, dim))
    y = np.repeat(np.arange(classes), n_per_class)
    x = centres[y] + rng.normal(0, spread, (len(y), dim))
    return x.astype(np.float32), y.astype(np.int64)


def test_linear_probe_separates_separable_features():
    xtr, ytr = _blobs(40, 4, 8, seed=0)
    xte, yte = _blobs(20, 4, 8, seed=1)
    m = linear_evaluate(xtr, ytr, xte, yte, lrs=(1e-3, 1e-2), weight_decays=(0.0, 1e-4), epochs=30)
    assert m["linear_top1"] >= 0.95
    assert m["val_top1"] >= 0.9
    assert m["best_lr"] in (1e-3, 1e-2)
    assert m["best_weight_decay"] in (0.0, 1e-4)
    assert "linear_top5" not in m  # only 4 classes


def test_linear_probe_reports_top5_with_more_classes():
    xtr, ytr = _blobs(15, 6, 8, seed=0)
    xte, yte = _blobs(5, 6, 8, seed=1)
    m = linear_evaluate(xtr, ytr, xte, yte, lrs=(1e-2,), weight_decays=(0.0,), epochs=20)
    assert m["linear_top5"] >= m["linear_top1"] >= 0.9
    assert m["best_lr"] == 1e-2 and m["best_weight_decay"] == 0.0


def test_linear_probe_on_random_labels_is_near_chance():
    rng = np.random.default_rng(0)
    xtr, xte = rng.normal(size=(200, 8)).astype(np.float32), rng.normal(size=(200, 8)).astype(np.float32)
    ytr, yte = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    m = linear_evaluate(xtr, ytr, xte, yte, lrs=(1e-2,), weight_decays=(0.0, 1e-2), epochs=20)
    assert m["linear_top1"] < 0.4


def test_linear_probe_is_seeded():
    xtr, ytr = _blobs(10, 3, 4, seed=0, spread=3.0)
    xte, yte = _blobs(10, 3, 4, seed=1, spread=3.0)
    kw = {"lrs": (1e-2,), "weight_decays": (0.0,), "epochs": 5}
    assert linear_evaluate(xtr, ytr, xte, yte, seed=3, **kw) == linear_evaluate(
        xtr, ytr, xte, yte, seed=3, **kw
    )


# ---------------------------------------------------------------------------------------------- evaluate()


def test_evaluate_knn_pixels_on_digits():
    record = evaluate("knn", "cvfm/pixels", "builtin:digits", num_workers=0, ks=(10,), device="cpu")
    assert set(record) == {"task", "model", "dataset", "metrics", "seed", "cvfm_version", "wall_s", "data"}
    assert (
        record["task"] == "knn" and record["model"] == "cvfm/pixels" and record["dataset"] == "builtin:digits"
    )
    assert set(record["metrics"]) == {"knn_top1@10", "knn_top5@10"}
    assert record["metrics"]["knn_top1@10"] > 0.9
    assert record["metrics"]["knn_top5@10"] >= record["metrics"]["knn_top1@10"]
    # The fixed 80/20 split of 1,797 digits.
    assert record["data"]["train"] + record["data"]["test"] == 1797
    assert 0.15 < record["data"]["test"] / 1797 < 0.25
    assert record["data"]["skipped"] == []
    assert record["wall_s"] >= 0
    json.dumps(record, allow_nan=False)


def test_evaluate_rejects_unknown_task_and_bad_k_before_any_work():
    with pytest.raises(UsageError, match="nope"):
        evaluate("nope", "cvfm/pixels", "builtin:digits")
    with pytest.raises(UsageError):
        evaluate("knn", "cvfm/pixels", "builtin:digits", ks=(0,), num_workers=0)
