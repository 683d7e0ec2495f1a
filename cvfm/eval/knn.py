"""Weighted k-NN classification on L2-normalised features (Wu et al. 2018; DINO's eval_knn.py).

Each of the k nearest training features (cosine similarity s) votes for its label with weight
exp(s / T), T = 0.07 (`cvfm.models.knn`, shared with the k-NN classifier head).
"""

from __future__ import annotations

import numpy as np
import torch

from cvfm.errors import UsageError
from cvfm.models.knn import knn_predict_scores


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[int, float]:
    order = scores.argsort(dim=1, descending=True)
    return {
        k: float((order[:, : min(k, scores.shape[1])] == labels[:, None]).any(dim=1).float().mean())
        for k in ks
    }


def knn_evaluate(
    train: np.ndarray,
    train_labels: np.ndarray,
    test: np.ndarray,
    test_labels: np.ndarray,
    ks=(20,),
    temperature: float = 0.07,
) -> dict[str, float]:
    """Metrics `knn_top1@k`, `knn_top5@k` for each k (fractions in [0, 1])."""
    check_ks(ks)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    tr, trl = torch.from_numpy(train), torch.from_numpy(train_labels).long()
    te, tel = torch.from_numpy(test), torch.from_numpy(test_labels).long()
    metrics = {}
    for k in ks:
        acc = topk_accuracy(knn_predict_scores(tr, trl, te, k, num_classes, temperature), tel)
        metrics[f"knn_top1@{k}"] = acc[1]
        if num_classes > 5:
            metrics[f"knn_top5@{k}"] = acc[5]
    return metrics


def check_ks(ks) -> None:
    """At least one k, each at least 1 (k=0 would vote with nobody and report a meaningless accuracy)."""
    if not ks or any(int(k) < 1 for k in ks):
        raise UsageError(f"--k must be at least 1, got {', '.join(map(str, ks)) or 'none'}")
