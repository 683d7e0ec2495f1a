"""SemDeDup (Abbas et al. 2023, facebookresearch/SemDeDup) on unit-norm rows: k-means, then within each
cluster, items taken in the order of the keep rule, an item is a duplicate when its cosine similarity to
an earlier item exceeds 1 - eps.

Keep rules, as the reference's `which_to_keep`: "hard" takes a cluster's items farthest from its centroid
first (so of a group of duplicates the least typical one is kept), "easy" the nearest first, "random" a
seeded shuffle. "Earlier" is, by default, an earlier *kept* item (greedy: every dropped item has a kept
item within the threshold, and no two kept items are within it); the reference compares with every
earlier item, kept or not (`against="any"`), which also drops chains (a ~ b ~ c with a and c apart
drops both b and c).

Similarities are computed block by block (`block_rows` x `block_rows` at a time), so a large cluster
never needs its full similarity matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cvfm.curate.kmeans import nearest, train_kmeans
from cvfm.errors import UsageError

KEEP = ("hard", "easy", "random")
AGAINST = ("kept", "any")
ITEMS_PER_CLUSTER = 10_000  # SemDeDup's LAION-440M run: 50,000 clusters, about 8,800 items each


@dataclass
class Clusters:
    """Each row's cluster and its cosine distance to the cluster's centroid."""

    centroids: np.ndarray  # (k, d) unit rows
    cluster: np.ndarray  # (n,) int64
    distance: np.ndarray  # (n,) float32, 1 - cosine similarity


@dataclass
class Duplicates:
    """For one threshold: the row each row duplicates (-1: none, kept) and the similarity to it."""

    of: np.ndarray  # (n,) int64
    similarity: np.ndarray  # (n,) float32, NaN where kept

    @property
    def kept(self) -> np.ndarray:
        return self.of < 0


def default_clusters(n: int) -> int:
    return max(1, min(n, -(-n // ITEMS_PER_CLUSTER)))


def cluster_rows(x, k: int, *, seed: int = 0, niter: int = 20) -> Clusters:
    """Spherical k-means on `x` (rows unit-norm), every row assigned to its nearest centroid."""
    centroids = train_kmeans(x, k, seed=seed, niter=niter, spherical=True)
    sim, ids = nearest(x, centroids, 1)
    return Clusters(centroids, ids[:, 0], (1 - sim[:, 0]).astype(np.float32))


def keep_order(
    clusters: Clusters, keep: str, seed: int = 0, rows: np.ndarray | None = None
) -> list[np.ndarray]:
    """The rows (all, or `rows`) of each non-empty cluster in the order the keep rule considers them."""
    if keep not in KEEP:
        raise UsageError(f"--keep must be one of {', '.join(KEEP)}, not '{keep}'")
    rows = np.arange(len(clusters.cluster)) if rows is None else np.asarray(rows, dtype=np.int64)
    rng = np.random.default_rng(seed)
    groups = []
    for c in np.unique(clusters.cluster[rows]):
        members = rows[clusters.cluster[rows] == c]
        d = clusters.distance[members]
        if keep == "random":
            members = members[rng.permutation(len(members))]
        else:  # hard: farthest from the centroid first; easy: nearest first (ties: pool order)
            members = members[np.lexsort((members, -d if keep == "hard" else d))]
        groups.append(members)
    return groups


def find_duplicates(
    x,
    groups: list[np.ndarray],
    eps: list[float],
    *,
    against: str = "kept",
    block_rows: int = 4096,
) -> list[Duplicates]:
    """Within each group (rows of `x` in keep order), the duplicates at each eps (similarity > 1 - eps to
    an earlier kept item, or with `against="any"` to any earlier item). One `Duplicates` per eps."""
    if against not in AGAINST:
        raise UsageError(f"--against-earlier must be one of {', '.join(AGAINST)}, not '{against}'")
    n = len(x)
    out = [Duplicates(np.full(n, -1, np.int64), np.full(n, np.nan, np.float32)) for _ in eps]
    for members in groups:
        rows = _Rows(x, members)
        if against == "any":
            best, arg = _most_similar_earlier(rows, block_rows)
            found = [(best, arg)] * len(eps)
        else:
            found = [_greedy(rows, 1 - e, block_rows) for e in eps]
        for e, dup, (best, arg) in zip(eps, out, found, strict=True):
            hit = best > 1 - e
            dup.of[members[hit]] = members[arg[hit]]
            dup.similarity[members[hit]] = best[hit]
    return out


class _Rows:
    """The rows `members` of `x`, read on demand (`x` may be a memory-mapped pool)."""

    def __init__(self, x, members: np.ndarray):
        self.x, self.members = x, members

    def __len__(self) -> int:
        return len(self.members)

    def __getitem__(self, key) -> np.ndarray:
        return np.ascontiguousarray(self.x[self.members[key]], dtype=np.float32)


def _most_similar_earlier(rows: _Rows, b: int) -> tuple[np.ndarray, np.ndarray]:
    """For each position j, the largest similarity to a position i < j and that i (-inf, -1 at j = 0)."""
    m = len(rows)
    best, arg = np.full(m, -np.inf, np.float32), np.full(m, -1, np.int64)
    for s in range(0, m, b):
        xb = rows[s : s + b]
        for c in range(0, s + len(xb), b):
            sim = xb @ (xb if c == s else rows[c : c + b]).T
            if c == s:
                sim[np.triu_indices(len(xb))] = -np.inf  # only earlier positions (i < j) count
            _update(best[s : s + len(xb)], arg[s : s + len(xb)], sim, np.arange(c, c + sim.shape[1]))
    return best, arg


def _greedy(rows: _Rows, threshold: float, b: int) -> tuple[np.ndarray, np.ndarray]:
    """Walk the positions in order, keeping one unless its similarity to a kept one exceeds `threshold`:
    for each position, the largest similarity to a kept earlier one and its position (as above)."""
    m = len(rows)
    best, arg = np.full(m, -np.inf, np.float32), np.full(m, -1, np.int64)
    kept: list[int] = []
    for s in range(0, m, b):
        xb = rows[s : s + b]
        bb, ab = best[s : s + len(xb)], arg[s : s + len(xb)]
        for c in range(0, len(kept), b):  # the items kept in earlier blocks
            cols = np.asarray(kept[c : c + b])
            _update(bb, ab, xb @ rows[cols].T, cols)
        within = xb @ xb.T
        for j in range(len(xb)):
            if bb[j] > threshold:
                continue
            kept.append(s + j)
            later = within[j + 1 :, j]
            better = later > bb[j + 1 :]
            bb[j + 1 :][better], ab[j + 1 :][better] = later[better], s + j
    return best, arg


def _update(best: np.ndarray, arg: np.ndarray, sim: np.ndarray, cols: np.ndarray) -> None:
    """Raise `best` (in place) to each row's largest similarity in `sim`, `arg` to its column in `cols`."""
    j = sim.argmax(axis=1)
    v = sim[np.arange(len(sim)), j]
    better = v > best
    best[better], arg[better] = v[better], cols[j[better]]
