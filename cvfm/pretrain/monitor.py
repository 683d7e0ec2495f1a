"""`--monitor`: online evaluation on a labelled source, once before training and after each epoch."""

from __future__ import annotations

import numpy as np
from torch import nn

from cvfm.data.sources import ImageSource, open_source, relabel, subset
from cvfm.errors import UsageError
from cvfm.eval.features import extract_features
from cvfm.eval.knn import knn_evaluate
from cvfm.eval.zeroshot import build_zeroshot_classifier, zeroshot_logits
from cvfm.models.dual import DualEncoder
from cvfm.pretrain.config import PretrainConfig


class Monitor:
    """A classifier gets its own top-1 on the test split (classes matched by name). A dual encoder on data
    with prompt templates (the captioned built-ins) gets zero-shot top-1 on the test split: the quantity
    CLIP training is for, and it needs no bank. Otherwise k-NN top-1@20 on the (image tower's) features: a
    fixed random subset of the train split as the bank, the test split as queries.
    """

    def __init__(self, cfg: PretrainConfig, kind: str, model: nn.Module):
        rng = np.random.default_rng(cfg.seed)
        queries = open_source(cfg.monitor, split="test")
        self.classifier = kind == "classifier"
        self.zero_shot = kind == "dual" and queries.templates is not None and bool(queries.classes)
        bank = None if self.zero_shot or self.classifier else open_source(cfg.monitor, split="train")
        if not queries.has_labels or (bank is not None and not bank.has_labels):
            raise UsageError(f"--monitor '{cfg.monitor}' needs labels on its train and test splits")
        if bank is not None:
            self.bank = subset(bank, np.sort(rng.permutation(len(bank))[: cfg.monitor_size]))
        self.queries = subset(queries, np.sort(rng.permutation(len(queries))[: cfg.monitor_size // 2]))
        if self.classifier:  # the classifier's class numbering, matched by name
            what = f"classifier (--monitor '{cfg.monitor}')"
            self.queries = relabel(self.queries, model.classes, what=what)

    def __call__(self, model: nn.Module, device) -> dict:
        if self.classifier:  # extract_features gives the classifier's output: its logits
            logits, labels, _ = extract_features(model, self.queries, device=device, desc="monitor top-1")
            return {"monitor/top1": float((logits.argmax(1) == labels).mean())}
        if self.zero_shot:
            return {"monitor/zeroshot_top1": _zero_shot_top1(model, self.queries, device)}
        encoder = model.image_encoder() if isinstance(model, DualEncoder) else model
        xb, yb, _ = extract_features(encoder, self.bank, device=device, desc="monitor bank")
        xq, yq, _ = extract_features(encoder, self.queries, device=device, desc="monitor queries")
        return {f"monitor/{k}": v for k, v in knn_evaluate(xb, yb, xq, yq, ks=(20,)).items() if "top1" in k}


def _zero_shot_top1(dual: DualEncoder, source: ImageSource, device) -> float:
    """Top-1 of the cosine argmax over the class prompt-ensemble embeddings (`build_zeroshot_classifier`,
    the classifier of `cvfm evaluate zeroshot`)."""
    feats, labels, _ = extract_features(dual.image_encoder(), source, device=device, desc="monitor zero-shot")
    classifier = build_zeroshot_classifier(dual, source.classes, source.templates, device=device)
    return float((zeroshot_logits(feats, classifier).argmax(1) == labels).mean())
