"""`evaluate zeroshot|retrieval` as library calls: an image-text model, one source, one JSON record.

Records have the shape of `cvfm.eval.run.evaluate`'s, with clip_benchmark's task names
(`zeroshot_classification`, `zeroshot_retrieval`) and metric keys, plus the inference precision.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

import cvfm
from cvfm.data.loader import SkipLog
from cvfm.data.sources import ImageSource, open_source, subset
from cvfm.errors import UsageError
from cvfm.eval.features import extract_features
from cvfm.eval.retrieval import DEFAULT_KS, check_recall_ks, group_captions, retrieval_metrics
from cvfm.eval.zeroshot import (
    DEFAULT_TEMPLATES,
    build_zeroshot_classifier,
    check_templates,
    encode_texts,
    read_classnames,
    read_templates,
    zeroshot_logits,
    zeroshot_metrics,
)
from cvfm.models.dual import DualEncoder
from cvfm.registry import create_dual_encoder
from cvfm.runtime.device import default_device
from cvfm.runtime.precision import precision_name, resolve_precision
from cvfm.runtime.threads import share_cores_with_workers


def evaluate_zeroshot(
    model: str | DualEncoder,
    data: str,
    *,
    split: str | None = "test",
    classnames: Sequence[str] | str | None = None,
    templates: Sequence[str] | str | None = None,
    batch_size: int = 256,
    num_workers: int = 2,
    seed: int = 0,
    image_column: str = "image",
    label_column: str | None = None,
    strict: bool = False,
    precision: str = "auto",
    pretrained: bool = True,
    trust_remote_code: bool = False,
    device: str | None = None,
) -> dict:
    """Zero-shot classification of the labelled images of `data` (split `split`, None for all).

    `classnames` (in label order) default to the source's classes; `templates` (each with `{c}`) to the
    source's own prompts, else "a photo of a {c}.". A string is parsed as the CLI does: a file (one per
    line), or comma-separated names / one template. Returns `{"task": "zeroshot_classification", ...}`.
    """
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    names = _classnames_arg(classnames)
    prompts = _templates_arg(templates)
    device, dtype = _setup(device, precision, num_workers)
    source = open_source(
        data, split=split, image_column=image_column, label_column=label_column, strict=strict
    )
    if not source.has_labels:
        raise UsageError(f"the data '{source.name}' has unlabelled images; zero-shot evaluation needs labels")
    names = _check_classnames(names, source)
    prompts = prompts or check_templates(source.templates or DEFAULT_TEMPLATES)
    dual = _dual(model, pretrained, trust_remote_code)
    skips = SkipLog(strict, source.skipped)
    common = {"batch_size": batch_size, "device": device, "autocast_dtype": dtype}
    classifier = build_zeroshot_classifier(dual, names, prompts, **common)
    feats, labels, _ = extract_features(
        dual.image_encoder(), source, num_workers=num_workers, skips=skips, desc="image features", **common
    )
    if len(feats) == 0:
        raise UsageError("no readable images left to evaluate on")
    metrics = zeroshot_metrics(zeroshot_logits(feats, classifier), labels)
    counts = {"images": len(feats), "classes": len(names), "templates": len(prompts)}
    return _record("zeroshot_classification", model, data, metrics, seed, dtype, t0, split, counts, skips)


def evaluate_retrieval(
    model: str | DualEncoder,
    data: str,
    *,
    split: str | None = "test",
    text_column: str = "caption",
    ks: Sequence[int] = DEFAULT_KS,
    batch_size: int = 256,
    num_workers: int = 2,
    seed: int = 0,
    image_column: str = "image",
    strict: bool = False,
    precision: str = "auto",
    pretrained: bool = True,
    trust_remote_code: bool = False,
    device: str | None = None,
) -> dict:
    """Image->text and text->image recall@k over the image-text records of `data`.

    A record's text may be one caption or a list; records with the same image (same path in a manifest)
    are one image with all their captions. Unreadable images are skipped with their captions (listed
    under `data.skipped`; `strict=True` raises). Returns `{"task": "zeroshot_retrieval", ...}`.
    """
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    ks = check_recall_ks(ks)
    device, dtype = _setup(device, precision, num_workers)
    source = open_source(data, split=split, image_column=image_column, text_column=text_column, strict=strict)
    groups = group_captions(source.items)
    dual = _dual(model, pretrained, trust_remote_code)
    skips = SkipLog(strict, source.skipped)
    common = {"batch_size": batch_size, "device": device, "autocast_dtype": dtype}
    images = subset(source, groups.image_items)
    feats, _, readable = extract_features(
        dual.image_encoder(), images, num_workers=num_workers, skips=skips, desc="image features", **common
    )
    if len(feats) == 0:
        raise UsageError("no readable images left to evaluate on")
    new_id = np.full(len(groups.image_items), -1, dtype=np.int64)
    new_id[readable] = np.arange(len(readable))
    text_image = new_id[np.asarray(groups.text_image, dtype=np.int64)]
    kept = np.flatnonzero(text_image >= 0)
    texts = encode_texts(dual, [groups.captions[j] for j in kept], **common)
    image_emb = F.normalize(torch.from_numpy(feats), dim=-1)
    similarity = (image_emb @ F.normalize(texts, dim=-1).T).numpy()
    metrics = retrieval_metrics(similarity, text_image[kept], ks)
    counts = {"images": len(feats), "texts": len(kept)}
    return _record("zeroshot_retrieval", model, data, metrics, seed, dtype, t0, split, counts, skips)


# ---------------------------------------------------------------------------------------------- helpers


def _classnames_arg(value: Sequence[str] | str | None) -> list[str] | None:
    if value is None:
        return None
    names = read_classnames(value) if isinstance(value, str) else [str(n).strip() for n in value]
    if not names or any(not n for n in names):
        raise UsageError("class names must be non-empty")
    return names


def _templates_arg(value: Sequence[str] | str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    return read_templates(value) if isinstance(value, str) else check_templates(value)


def _check_classnames(names: list[str] | None, source: ImageSource) -> list[str]:
    """Class names in label order: given, else the source's; their count must fit the labels."""
    if names is None:
        if not source.classes:
            raise UsageError(
                f"the data '{source.name}' has integer labels without class names: give --classnames"
            )
        return list(source.classes)
    if source.classes and len(names) != len(source.classes):
        raise UsageError(
            f"{len(names)} class names given but the data '{source.name}' has {len(source.classes)} classes"
        )
    top = int(source.labels.max())
    if top >= len(names):
        raise UsageError(f"{len(names)} class names given but the data '{source.name}' has label {top}")
    return names


def _dual(model: str | DualEncoder, pretrained: bool, trust_remote_code: bool) -> DualEncoder:
    if isinstance(model, DualEncoder):
        return model
    return create_dual_encoder(model, pretrained=pretrained, trust_remote_code=trust_remote_code)


def _setup(device: str | None, precision: str, num_workers: int) -> tuple[str, torch.dtype | None]:
    device = default_device(device)
    dtype = resolve_precision(precision, device)
    if device == "cpu":
        share_cores_with_workers(num_workers)
    return device, dtype


def _record(task, model, data, metrics, seed, dtype, t0, split, counts, skips) -> dict:
    return {
        "task": task,
        "model": model if isinstance(model, str) else model.name,
        "dataset": data,
        "metrics": metrics,
        "seed": seed,
        "cvfm_version": cvfm.__version__,
        "wall_s": round(time.perf_counter() - t0, 3),
        "precision": precision_name(dtype),
        "data": {"split": split, **counts, "skipped": skips.as_list()},
    }
