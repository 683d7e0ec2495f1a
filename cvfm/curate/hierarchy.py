"""Hierarchical k-means with resampling (Vo et al. 2024, "Automatic Data Curation for Self-Supervised
Learning: A Clustering-Based Approach"; DINOv2's curation): level 1 clusters the points, level j clusters
level j-1's centroids. Within a level, k-means is rerun on a few items per cluster (those closest to its
centroid), which moves the centroids from where the data is dense towards an even cover of the concepts.

Resumable: with a `state_dir`, each finished level is saved (`level_{j}.npz`, atomically) beside
`settings.json`; a rerun with the same settings and data loads the finished levels and goes on."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cvfm.curate.balance import first_per_group
from cvfm.curate.kmeans import nearest, train_kmeans
from cvfm.errors import UsageError
from cvfm.runtime.files import atomic_write, write_json
from cvfm.runtime.settings import check_same_settings, read_settings

FORMAT = "cvfm.hierarchical-kmeans/1"
RESAMPLE = ("closest", "random")
# The reference's 2-level config (configs/2levels_random_embeddings.yaml): 20 points per level-1
# cluster, 5 level-1 clusters per level-2 cluster; level 1 capped here to stay tractable on a CPU.
POINTS_PER_CLUSTER, CLUSTERS_PER_PARENT, MAX_K1 = 20, 5, 1000


@dataclass
class Hierarchy:
    """centroids[j]: the (k_{j+1}, d) unit-norm centroids of level j+1; parents[j]: the level-(j+1)
    cluster of each item clustered at that level (the points for level 1, level j's centroids above);
    distance: each point's cosine distance to its level-1 centroid."""

    centroids: list[np.ndarray]
    parents: list[np.ndarray]
    distance: np.ndarray

    @property
    def levels(self) -> int:
        return len(self.centroids)

    @property
    def labels(self) -> np.ndarray:
        """(n, levels) int64: each point's cluster at every level, level 1 first."""
        out = [self.parents[0].astype(np.int64)]
        for up in self.parents[1:]:
            out.append(up[out[-1]].astype(np.int64))
        return np.stack(out, axis=1)


def default_levels(n: int) -> list[int]:
    """Two levels for n points: k1 = ceil(n / 20), at most 1000, and k2 = ceil(k1 / 5).

    The reference's 2-level config (100k embeddings -> 5000 -> 1000) has 20 points per level-1 cluster
    and 5 level-1 clusters per level-2 cluster; its config for a web-scale image pool uses 4 levels,
    10M -> 500k -> 50k -> 10k. Both ratios are kept here, with level 1 capped at 1000 clusters so
    that a million embeddings cluster in minutes on a CPU: pass `levels` for finer concepts."""
    k1 = max(1, min(math.ceil(n / POINTS_PER_CLUSTER), MAX_K1))
    return [k1, max(1, math.ceil(k1 / CLUSTERS_PER_PARENT))]


def default_sample_size(items: int, k: int) -> int:
    """Half the mean cluster size, rounded up: the reference configs' rule (20 -> 10, 5 -> 3)."""
    return math.ceil(items / k / 2)


def hierarchical_kmeans(
    x,
    levels: list[int] | None = None,
    *,
    resample_steps: int = 10,
    sample_sizes: list[int] | None = None,
    resample: str = "closest",
    niter: int = 20,
    seed: int = 0,
    state_dir: str | Path | None = None,
    overwrite: bool = False,
    on_level: Callable[[int, np.ndarray], None] | None = None,
) -> Hierarchy:
    """Cluster the rows of `x` (array, memmap or `EmbeddingPool`; compared by cosine, rows normalised as
    read) into `levels` = [k1, k2, ...] clusters, finest first (`default_levels(n)` when None).

    Each level: spherical k-means (k-means++), then `resample_steps` times: take `sample_sizes[j]` items
    of every cluster (the closest to its centroid, or at random), rerun k-means from scratch on those,
    and reassign every item to the new centroids. Sample sizes default to half the mean cluster size;
    a size of 1 (or too few items for k clusters) skips resampling, as in the reference.
    Seeded: the same settings give the same clusters. With `state_dir`, finished levels are saved
    and reloaded (the settings and a fingerprint of the data must match, or `overwrite` discards
    them). `on_level(j, centroids)` is called after each level is done (and saved).

    Differences from the reference: cosine (unit rows, spherical centroids) instead of L2 on raw
    embeddings; `resample_steps` counts the reruns after the first k-means (as its in-memory
    `n_resamples`; its configs' `n_resampling_steps` count the first run too); 20 Lloyd iterations
    on at most 256 points per centroid (faiss's subsample) instead of 50 over all points."""
    n = len(x)
    levels = default_levels(n) if levels is None else [int(k) for k in levels]
    if not levels:
        raise UsageError("give at least one level")
    items = [n, *levels[:-1]]
    for j, (k, m) in enumerate(zip(levels, items, strict=True), 1):
        if not 1 <= k <= m:
            raise UsageError(f"level {j} needs between 1 and {m} clusters (its items), not {k}")
    if sample_sizes is None:
        sample_sizes = [default_sample_size(m, k) for k, m in zip(levels, items, strict=True)]
    if len(sample_sizes) != len(levels) or min(sample_sizes) < 1:
        raise UsageError(f"give one sample size >= 1 per level ({len(levels)}), not {sample_sizes}")
    if resample not in RESAMPLE:
        raise UsageError(f"resample must be one of {', '.join(RESAMPLE)}, not '{resample}'")
    if resample_steps < 0:
        raise UsageError(f"resample_steps must be >= 0, not {resample_steps}")
    settings = {
        "levels": levels,
        "resample_steps": resample_steps,
        "sample_sizes": [int(s) for s in sample_sizes],
        "resample": resample,
        "niter": niter,
        "seed": seed,
        "data": _fingerprint(x),
    }
    state = _State(state_dir, settings, overwrite) if state_dir is not None else None
    centroids, parents, distance, items_x = [], [], None, _UnitRows(x)
    for j, k in enumerate(levels, 1):
        saved = state.load(j) if state else None
        if saved is None:
            rng = np.random.default_rng([seed, j])
            saved = _cluster_level(items_x, k, resample_steps, sample_sizes[j - 1], resample, niter, rng)
            if state:
                state.save(j, *saved)
        c, assigned, score = saved
        centroids.append(c)
        parents.append(assigned)
        distance = (1.0 - score).astype(np.float32) if j == 1 else distance
        items_x = c
        if on_level:
            on_level(j, c)
    return Hierarchy(centroids, parents, distance)


def _cluster_level(x, k, steps, sample_size, resample, niter, rng):
    """(centroids, cluster of each row, cosine similarity to it) after k-means and its resampling."""

    def kmeans(rows):
        c = train_kmeans(rows, k, seed=int(rng.integers(2**31 - 1)), niter=niter)
        score, ids = nearest(x, c, 1)
        return c, ids[:, 0], score[:, 0]

    c, assigned, score = kmeans(x)
    for _ in range(steps if sample_size > 1 else 0):
        key = -score if resample == "closest" else rng.random(len(assigned))
        rows = np.sort(first_per_group(assigned, key, sample_size))
        if len(rows) < k:
            break
        c, assigned, score = kmeans(_UnitRows(x, rows))
    return c, assigned, score


class _UnitRows:
    """The rows `index` (all when None) of `x`, read on demand and scaled to unit length."""

    def __init__(self, x, index: np.ndarray | None = None):
        self.x, self.index = x, index

    def __len__(self) -> int:
        return len(self.x) if self.index is None else len(self.index)

    def __getitem__(self, key) -> np.ndarray:
        rows = self.x[key] if self.index is None else self.x[self.index[key]]
        rows = np.asarray(rows, dtype=np.float32)
        return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def _fingerprint(x) -> str:
    """A short hash of the shape and 64 evenly spaced rows: tells another pool from this one cheaply."""
    n = len(x)
    rows = np.unique(np.linspace(0, n - 1, min(n, 64)).astype(np.int64))
    sample = np.ascontiguousarray(x[rows], dtype=np.float32)
    return hashlib.sha256(f"{n}x{sample.shape[1]}".encode() + sample.tobytes()).hexdigest()[:16]


class _State:
    """The finished levels of one run, under `settings.json`'s settings."""

    def __init__(self, folder, settings: dict, overwrite: bool):
        self.folder, self.settings = Path(folder), {"format": FORMAT, **settings}
        self.key = hashlib.sha256(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()[:16]
        path = self.folder / "settings.json"
        saved = read_settings(path, FORMAT)
        if path.exists() and saved != self.settings:
            if not overwrite and saved is None:
                raise UsageError(f"'{path}' is not a hierarchical k-means state: choose another folder")
            if not overwrite:
                check_same_settings(
                    saved,
                    self.settings,
                    f"'{self.folder}' holds a clustering with other settings",
                    "rerun with the same settings, or in another folder, or overwrite it",
                )
            for old in self.folder.glob("level_*.npz"):
                old.unlink()
        if saved != self.settings:
            write_json(path, self.settings)

    def file(self, level: int) -> Path:
        return self.folder / f"level_{level}.npz"

    def load(self, level: int):
        if not self.file(level).exists():
            return None
        with np.load(self.file(level)) as f:
            if str(f["settings"]) != self.key:
                raise UsageError(f"'{self.file(level)}' was written with other settings: remove it")
            return f["centroids"], f["assigned"], f["score"]

    def save(self, level: int, centroids, assigned, score) -> None:
        def write(path: Path) -> None:
            with open(path, "wb") as f:
                np.savez(f, centroids=centroids, assigned=assigned, score=score, settings=self.key)

        atomic_write(self.file(level), write)
