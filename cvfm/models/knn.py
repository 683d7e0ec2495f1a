"""Weighted k-NN votes (Wu et al. 2018; DINO's eval_knn.py): each of the k nearest training features
(cosine similarity s) votes for its label with weight exp(s / T). The maths of `cvfm.eval.knn` and of
the k-NN classifier head (`cvfm.models.classifier.KnnHead`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def knn_predict_scores(
    train: torch.Tensor,
    train_labels: torch.Tensor,
    test: torch.Tensor,
    k: int,
    num_classes: int,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores (N_test, C) from the k nearest training features."""
    train, test = F.normalize(train.float(), dim=1), F.normalize(test.float(), dim=1)
    k = min(k, train.shape[0])
    out = []
    for start in range(0, test.shape[0], chunk):
        sim = test[start : start + chunk] @ train.T
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        out.append(votes)
    return torch.cat(out)
