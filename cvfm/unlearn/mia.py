"""Membership-inference attacks on a classifier's per-example outputs: did this model train on these images?

An unlearned model should treat the forget set like data it never saw. Two attacks measure that:

- MIA-efficacy (Jia et al. 2023, "Model sparsity can simplify machine unlearning"; Fan et al. 2024,
  SalUn): an RBF SVM on the true-label confidence, trained with retain items as members and test items
  as non-members (as many of each); the share of the forget set it calls non-member. As
  OPTML-Group/Unlearn-Saliency `evaluation/SVC_MIA.py` (the "confidence" entry of `SVC_MIA`).
- Loss threshold (Yeom et al. 2018): members have lower loss; the ROC AUC of the score -loss, members
  labelled 1. 0.5 means the two sets cannot be told apart by their loss.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cvfm.data.loader import SkipLog
from cvfm.data.sources import ImageSource
from cvfm.eval.features import extract_features

SVC_OPTIONS = {"C": 3, "gamma": "auto", "kernel": "rbf"}  # Unlearn-Saliency evaluation/SVC_MIA.py


@torch.no_grad()
def predictions(
    model: nn.Module,
    source: ImageSource,
    *,
    transform: Callable,
    batch_size: int = 256,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    skips: SkipLog | None = None,
    desc: str = "predictions",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Softmax probabilities (N, C), labels (N,) and cross-entropy losses (N,) of the readable images of a
    labelled source, in eval mode (`extract_features` of the model's logits). Unreadable images are
    skipped and recorded in `skips`."""
    logits, labels, _ = extract_features(
        model,
        source,
        transform=transform,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        skips=skips,
        desc=desc,
    )
    if len(labels) == 0:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64), np.zeros(0, np.float32)
    logits_t, labels_t = torch.from_numpy(logits), torch.from_numpy(labels)
    losses = F.cross_entropy(logits_t, labels_t, reduction="none")
    return logits_t.softmax(dim=1).numpy(), labels, losses.numpy()


def true_label_confidence(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The probability each example gives its own label: the attack feature of MIA-efficacy."""
    if len(labels) == 0:
        return np.zeros(0, np.float32)
    return probs[np.arange(len(labels)), labels]


def mia_training_set(
    member_conf: np.ndarray, nonmember_conf: np.ndarray, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """The attack's training set: features (M, 1) and labels (1 = member, 0 = non-member).

    The two classes are balanced: the larger side is a seeded random subset as large as the other, as
    Unlearn-Saliency's shadow_train (a retain subset the size of the test set). Unbalanced, an SVM on
    overlapping confidences calls everything the majority class: with fewer members than non-members,
    every forget item would be "non-member" and MIA-efficacy 100% for any model.
    """
    member_conf, nonmember_conf = np.asarray(member_conf, np.float64), np.asarray(nonmember_conf, np.float64)
    if len(member_conf) == 0 or len(nonmember_conf) == 0:
        raise ValueError("the attack needs both members and non-members to train on")
    n = min(len(member_conf), len(nonmember_conf))
    rng = np.random.default_rng(seed)
    member_conf, nonmember_conf = (
        conf[np.sort(rng.choice(len(conf), n, replace=False))] if len(conf) > n else conf
        for conf in (member_conf, nonmember_conf)
    )
    x = np.concatenate([member_conf, nonmember_conf]).reshape(-1, 1)
    y = np.concatenate([np.ones(n), np.zeros(n)]).astype(np.int64)
    return x, y


def mia_efficacy(
    member_conf: np.ndarray, nonmember_conf: np.ndarray, target_conf: np.ndarray, seed: int = 0
) -> float:
    """Share of `target_conf` (the forget set's true-label confidences) that an SVM trained on members
    (retain) vs non-members (test) predicts as non-member: 1 - mean prediction. Higher = better forgotten."""
    from sklearn.svm import SVC

    target = np.asarray(target_conf, np.float64).reshape(-1, 1)
    if len(target) == 0:
        raise ValueError("MIA-efficacy needs a non-empty target set")
    x, y = mia_training_set(member_conf, nonmember_conf, seed)
    clf = SVC(**SVC_OPTIONS).fit(x, y)
    return float(1.0 - clf.predict(target).mean())


def loss_threshold_auc(member_losses: np.ndarray, nonmember_losses: np.ndarray) -> float:
    """ROC AUC of the loss-threshold attack (score = -loss, members = 1): the chance that a random member
    has lower loss than a random non-member (ties count half)."""
    from sklearn.metrics import roc_auc_score

    member, nonmember = np.asarray(member_losses, np.float64), np.asarray(nonmember_losses, np.float64)
    if len(member) == 0 or len(nonmember) == 0:
        raise ValueError("the loss-threshold AUC needs both members and non-members")
    y = np.concatenate([np.ones(len(member)), np.zeros(len(nonmember))])
    return float(roc_auc_score(y, -np.concatenate([member, nonmember])))
