"""Zero-shot classification with an image-text model (CLIP, Radford et al. 2021; clip_benchmark's
`zeroshot_classification` task).

Each class name is written into every prompt template ("a photo of a {c}."); the class's classifier row
is the mean of its L2-normalised prompt embeddings, normalised again. An image is scored by the cosine
similarity of its embedding to each row (CLIP's x100 logit scale changes no ranking, so it is left out).

Metrics use clip_benchmark's keys: `acc1`, `acc5` (null with fewer than 5 classes, where clip_benchmark
writes NaN, which strict JSON cannot hold) and `mean_per_class_recall` (balanced accuracy: the mean,
over the classes present in the labels, of the fraction of their images predicted as them).

Ties: classes are ranked by score, equal scores by class index (the lower index ranks first), as
`argmax` does; so a constant score matrix predicts class 0 for every image.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cvfm.data.text import read_lines
from cvfm.errors import UsageError
from cvfm.models.dual import DualEncoder
from cvfm.runtime.precision import autocast

PLACEHOLDER = "{c}"
DEFAULT_TEMPLATES = ("a photo of a {c}.",)  # CLIP's generic prompt


# ---------------------------------------------------------------------------------------------- metrics


def true_class_rank(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """0-based rank of each row's true class: classes scoring higher, plus tied classes of lower index."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    rows = np.arange(len(labels))
    true = scores[rows, labels][:, None]
    before = np.arange(scores.shape[1])[None, :] < labels[:, None]
    return ((scores > true) | ((scores == true) & before)).sum(axis=1)


def zeroshot_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float | None]:
    """`acc1`, `acc5` and `mean_per_class_recall` (fractions in [0, 1]) of scores `logits` (N, C) for
    integer `labels` (N,) in [0, C). `acc5` is None when C < 5 (clip_benchmark: NaN)."""
    logits, labels = np.asarray(logits), np.asarray(labels, dtype=np.int64)
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"expected logits (N, C) and labels (N,), got {logits.shape} and {labels.shape}")
    n, num_classes = logits.shape
    if n == 0:
        raise ValueError("no images to score")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    rank = true_class_rank(logits, labels)
    top1 = rank == 0
    recalls = [top1[labels == c].mean() for c in np.unique(labels)]
    return {
        "acc1": float(top1.mean()),
        "acc5": float((rank < 5).mean()) if num_classes >= 5 else None,
        "mean_per_class_recall": float(np.mean(recalls)),
    }


# ---------------------------------------------------------------------------------------------- prompts


def check_templates(templates: Sequence[str], where: str = "template") -> tuple[str, ...]:
    """Templates as a tuple; each must hold the class placeholder `{c}`."""
    templates = tuple(templates)
    if not templates:
        raise UsageError("no zero-shot templates given")
    for t in templates:
        if PLACEHOLDER not in t:
            raise UsageError(f"{where} '{t}' has no {PLACEHOLDER} placeholder for the class name")
    return templates


def read_templates(value: str) -> tuple[str, ...]:
    """`--templates`: a file with one template per line, or a single template holding `{c}`."""
    path = Path(value)
    if path.is_file():
        lines = [line.strip() for line in read_lines(path)]
        return check_templates([line for line in lines if line], where=f"template in '{value}'")
    if PLACEHOLDER in value:
        return (value,)
    raise UsageError(
        f"--templates '{value}' is neither a file nor a template with a {PLACEHOLDER} placeholder"
    )


def read_classnames(value: str) -> list[str]:
    """`--classnames`: a file with one name per line (in label order), or comma-separated names."""
    path = Path(value)
    if path.is_file():
        names = [line.strip() for line in read_lines(path)]
        names = [n for n in names if n]
    elif "," not in value and path.suffix.lower() in (".txt", ".csv", ".tsv", ".lst"):
        raise UsageError(f"classnames file '{value}' does not exist")
    else:
        names = [n.strip() for n in value.split(",")]
    if not names or any(not n for n in names):
        raise UsageError(f"--classnames '{value}' holds an empty class name")
    return names


def prompts(classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every template filled with every class name, class-major: [c0 t0, c0 t1, ..., c1 t0, ...]."""
    return [t.replace(PLACEHOLDER, c) for c in classnames for t in templates]


# ---------------------------------------------------------------------------------------------- encoding


@torch.no_grad()
def encode_texts(
    dual: DualEncoder,
    texts: Sequence[str],
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Text embeddings (N, D), float32 on the CPU, not normalised, in the order of `texts`
    (`autocast_dtype`: None for fp32, else the autocast dtype from `cvfm.runtime.precision`)."""
    device = torch.device(device)
    was_training = dual.training
    dual.eval().to(device)
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = dual.tokenizer(list(texts[start : start + batch_size]))
        tokens = {k: v.to(device) for k, v in tokens.items()}
        with autocast(device, autocast_dtype):
            out.append(dual.encode_text(tokens).float().cpu())
    dual.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, dual.embed_dim)


def build_zeroshot_classifier(
    dual: DualEncoder,
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Classifier weights (C, D), one unit row per class: the mean of the class's L2-normalised prompt
    embeddings, normalised again (CLIP's prompt ensembling)."""
    templates = check_templates(templates)
    emb = encode_texts(
        dual,
        prompts(classnames, templates),
        batch_size=batch_size,
        device=device,
        autocast_dtype=autocast_dtype,
    )
    emb = F.normalize(emb, dim=-1).reshape(len(classnames), len(templates), -1)
    return F.normalize(emb.mean(dim=1), dim=-1)


def zeroshot_logits(image_features: np.ndarray | torch.Tensor, classifier: torch.Tensor) -> np.ndarray:
    """Cosine similarity (N, C) of image features (N, D) to the classifier rows (C, D)."""
    x = F.normalize(torch.as_tensor(image_features, dtype=torch.float32), dim=-1)
    return (x @ classifier.float().T).numpy()
