"""Image-text retrieval recall@k (clip_benchmark's `zeroshot_retrieval` task), and the grouping of
image-text records into images with their captions.

clip_benchmark's names follow the retrieved side:
  `image_retrieval_recall@k`  text -> image: a caption finds its image among the k images most similar
                              to it (averaged over captions);
  `text_retrieval_recall@k`   image -> text: an image finds ANY of its captions among the k captions
                              most similar to it (averaged over images; CLIP papers' recall@k).

Ties: candidates are ranked by similarity, equal similarities by index (the lower index ranks first).
A k at least as large as the number of candidates retrieves them all (recall 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cvfm.errors import UsageError

DEFAULT_KS = (1, 5, 10)


def check_recall_ks(ks: Sequence[int]) -> tuple[int, ...]:
    """At least one k, each at least 1."""
    if not ks or any(int(k) < 1 for k in ks):
        raise UsageError(f"--recall-k must be at least 1, got {', '.join(map(str, ks)) or 'none'}")
    return tuple(int(k) for k in ks)


def _ranks(scores: np.ndarray, target: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """0-based rank of column `target[q]` within row q of `scores` (Q, M), ties by column index."""
    out = np.empty(len(target), dtype=np.int64)
    cols = np.arange(scores.shape[1])[None, :]
    for s in range(0, len(target), chunk):
        rows, t = scores[s : s + chunk], target[s : s + chunk]
        own = rows[np.arange(len(t)), t][:, None]
        out[s : s + chunk] = ((rows > own) | ((rows == own) & (cols < t[:, None]))).sum(axis=1)
    return out


def retrieval_metrics(
    similarity: np.ndarray, text_to_image: np.ndarray, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    """Recall@k both ways from `similarity` (num_images, num_texts) and each text's image index.

    Returns `image_retrieval_recall@k` (text -> image) and `text_retrieval_recall@k` (image -> text, a
    hit when any of the image's captions is in the top k) for each k, fractions in [0, 1]."""
    ks = check_recall_ks(ks)
    sim = np.asarray(similarity)
    t2i = np.asarray(text_to_image, dtype=np.int64)
    num_images, num_texts = sim.shape
    if t2i.shape != (num_texts,):
        raise ValueError(f"text_to_image must have one entry per text ({num_texts}), got shape {t2i.shape}")
    if num_texts == 0 or t2i.min() < 0 or t2i.max() >= num_images:
        raise ValueError(f"text_to_image must index the {num_images} images")
    if len(np.unique(t2i)) != num_images:
        raise ValueError("every image needs at least one caption")
    # text -> image: rank of the caption's own image among all images (column t of the similarity)
    text_rank = _ranks(sim.T, t2i)
    # image -> text: rank of each caption within its image's row; an image's best caption counts
    caption_rank = np.empty(num_texts, dtype=np.int64)
    for s in range(0, num_texts, 1024):
        idx = np.arange(s, min(s + 1024, num_texts))
        caption_rank[idx] = _ranks(sim[t2i[idx]], idx)
    image_rank = np.full(num_images, np.iinfo(np.int64).max)
    np.minimum.at(image_rank, t2i, caption_rank)
    metrics = {}
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = float((text_rank < k).mean())
        metrics[f"text_retrieval_recall@{k}"] = float((image_rank < k).mean())
    return metrics


@dataclass
class CaptionGroups:
    """Source items grouped into distinct images: `image_items[i]` is the item index whose image is read
    for image i; `captions[j]` is caption j and `text_image[j]` its image index."""

    image_items: list[int]
    captions: list[str]
    text_image: list[int]


def group_captions(items: Sequence) -> CaptionGroups:
    """Items sharing an image (the same `ref`: a JSONL path, a built-in index) become one image with all
    their captions; an item's text may be one caption or a tuple of them."""
    first: dict = {}
    image_items: list[int] = []
    captions: list[str] = []
    text_image: list[int] = []
    for i, item in enumerate(items):
        key = item.ref if _hashable(item.ref) else ("item", i)
        if key not in first:
            first[key] = len(image_items)
            image_items.append(i)
        texts = (item.text,) if isinstance(item.text, str) else tuple(item.text or ())
        captions.extend(texts)
        text_image.extend([first[key]] * len(texts))
    return CaptionGroups(image_items, captions, text_image)


def _hashable(value) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return value is not None
