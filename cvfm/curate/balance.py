"""Hierarchical balanced sampling (Vo et al. 2024, "Automatic Data Curation for Self-Supervised Learning",
as in DINOv2's curation): a target count is shared over the top-level clusters by water-filling, each
cluster's share over its sub-clusters the same way, down to the bottom level, where a cluster's share is
drawn at random or taken closest to its centroid. Small clusters are kept whole; what they cannot use goes
to the others, so a concept seen a million times and one seen a hundred end up with the same share."""

from __future__ import annotations

import numpy as np

from cvfm.errors import UsageError

STRATEGIES = ("random", "closest")


def water_fill(sizes: np.ndarray, target: int, rng: np.random.Generator) -> np.ndarray:
    """How many items to take from each group of `sizes` items so that they add up to min(target, total):
    every group gets min(size, c) for the largest c that fits, and the r < (groups larger than c) left
    over go one each to r of those larger groups, chosen with `rng` (as the reference does)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if target >= sizes.sum():
        return sizes.copy()
    order = np.argsort(sizes, kind="stable")
    s = sizes[order]
    left = target - np.concatenate([[0], np.cumsum(s)[:-1]])  # what is left once the i smallest are whole
    cut = left // (len(s) - np.arange(len(s)))  # even share of the rest
    i = int(np.argmax(cut < s))  # the first group too large to take whole: target < sum(sizes) means one is
    c = int(cut[i])
    quota = np.minimum(sizes, c)
    extra = target - int(quota.sum())
    quota[rng.choice(order[i:], extra, replace=False)] += 1
    return quota


def first_per_group(groups: np.ndarray, key: np.ndarray, quota) -> np.ndarray:
    """Indices of the `quota[g]` (or `quota`, one number for all) items with the smallest `key` in each
    group g of `groups`, ties to the lower index; in group order."""
    order = np.lexsort((key, groups))
    g = groups[order]
    start = np.searchsorted(g, g, side="left")  # g is sorted: where each item's group begins
    rank = np.arange(len(g)) - start
    take = np.broadcast_to(quota, (int(groups.max()) + 1,)) if np.ndim(quota) == 0 else np.asarray(quota)
    return order[rank < take[g]]


def balanced_sample(
    labels,
    target: int,
    *,
    strategy: str = "random",
    distance: np.ndarray | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Sorted indices of min(target, n) of the n items, sampled hierarchically.

    `labels`: a `Hierarchy`, or the (n, levels) cluster ids of every item at every level, finest first
    (one column, or a 1-d array, for flat clusters); each cluster must sit inside one cluster of the next
    level. `strategy`: "random" (seeded) or "closest" (the items of smallest `distance` to their bottom
    cluster's centroid; a `Hierarchy` brings its own). Differences from the reference: never samples
    an item twice (no `multiplier`), and draws from a seeded generator.
    """
    if hasattr(labels, "parents"):  # a Hierarchy (not imported: it uses this module)
        labels, distance = labels.labels, labels.distance if distance is None else distance
    labels = np.asarray(labels)
    labels = labels[:, None] if labels.ndim == 1 else labels
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer) or (labels < 0).any():
        raise UsageError("labels must be integer cluster ids >= 0, a row per item, a column per level")
    if target < 0:
        raise UsageError(f"the target must be >= 0, not {target}")
    if strategy not in STRATEGIES:
        raise UsageError(f"strategy must be one of {', '.join(STRATEGIES)}, not '{strategy}'")
    if strategy == "closest" and (distance is None or len(distance) != len(labels)):
        raise UsageError("strategy 'closest' needs each item's distance to its cluster's centroid")
    rng = np.random.default_rng(seed)
    n, levels = labels.shape
    if n == 0 or target == 0:
        return np.empty(0, np.int64)
    quota = water_fill(np.bincount(labels[:, -1]), target, rng)
    for level in range(levels - 2, -1, -1):
        quota = _share_within(labels[:, level], labels[:, level + 1], quota, rng)
    key = np.asarray(distance, dtype=np.float64) if strategy == "closest" else rng.random(n)
    return np.sort(first_per_group(labels[:, 0], key, quota))


def _share_within(child: np.ndarray, parent: np.ndarray, parent_quota: np.ndarray, rng) -> np.ndarray:
    """Each parent cluster's quota water-filled over its child clusters."""
    parent_of = np.full(int(child.max()) + 1, -1, np.int64)
    parent_of[child] = parent
    if (parent_of[child] != parent).any():
        bad = int(child[np.flatnonzero(parent_of[child] != parent)[0]])
        raise UsageError(f"cluster {bad} lies in more than one cluster of the level above: labels must nest")
    sizes = np.bincount(child, minlength=len(parent_of))
    present = np.flatnonzero(sizes)
    present = present[np.argsort(parent_of[present], kind="stable")]
    groups = np.split(present, np.flatnonzero(np.diff(parent_of[present])) + 1)
    quota = np.zeros(len(parent_of), np.int64)
    for kids in groups:
        q = parent_quota[parent_of[kids[0]]]
        if q:
            quota[kids] = water_fill(sizes[kids], int(q), rng)
    return quota
