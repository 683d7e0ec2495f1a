"""Hierarchical k-means with resampling and hierarchical balanced sampling (cvfm.curate.hierarchy,
cvfm.curate.balance): planted clusters recovered, resampling spreading centroids, water-filling caps,
closest-to-centroid against brute force, and resume in a new process after a kill."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from cvfm.curate.balance import balanced_sample, water_fill
from cvfm.curate.hierarchy import default_levels, hierarchical_kmeans
from cvfm.errors import UsageError


def planted(sizes: list[int], seed: int = 0, noise: float = 0.03, dim: int = 32):
    """Points around 16 centres in 4 groups of 4 (a centre: its group's direction plus its own), class
    sizes as given; returns (x, class of each point)."""
    rng = np.random.default_rng(seed)
    q = np.linalg.qr(rng.normal(size=(dim, dim)))[0]
    centres = np.stack([q[i // 4] + q[4 + i] for i in range(len(sizes))])
    y = np.repeat(np.arange(len(sizes)), sizes)
    return (centres[y] + noise * rng.normal(size=(len(y), dim))).astype(np.float32), y


@pytest.fixture(scope="module")
def data():
    x, y = planted([125] * 16)
    return x, y, hierarchical_kmeans(x, [16, 4], seed=0)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_hierarchy_recovers_planted_clusters(data):
    x, y, h = data
    assert h.labels.shape == (2000, 2) and [c.shape for c in h.centroids] == [(16, 32), (4, 32)]
    assert adjusted_rand_score(y, h.labels[:, 0]) > 0.95
    assert adjusted_rand_score(y // 4, h.labels[:, 1]) > 0.95
    assert np.array_equal(h.labels[:, 1], h.parents[1][h.labels[:, 0]])
    for c in h.centroids:
        np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1, atol=1e-5)
    cos = unit(x) @ h.centroids[0].T
    assert np.array_equal(h.labels[:, 0], cos.argmax(1))
    np.testing.assert_allclose(h.distance, 1 - cos.max(1), atol=1e-5)


def test_resampling_spreads_centroids_over_an_imbalanced_pool():
    """One class 10x the others: plain k-means spends many centroids on it, resampling (k-means again
    on a few points of each cluster) far fewer, which is what the reference's resampling is for."""
    x, y = planted([100] * 8 + [1000] + [100] * 7, seed=1)
    clusters = [hierarchical_kmeans(x, [32], resample_steps=s, seed=1).labels[y == 8, 0] for s in (0, 10)]
    in_big = [len(np.unique(c)) for c in clusters]
    assert in_big[0] >= 5 and in_big[1] <= 2, in_big


def test_default_levels_and_validation():
    assert default_levels(100) == [5, 1]
    assert default_levels(30_000) == [1000, 200]
    assert default_levels(10**8) == [1000, 200]
    assert default_levels(3) == [1, 1]
    x = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    bad = {"level 1 needs between 1 and 50": [51], "level 2 needs between 1 and 10": [10, 11], "level 1": [0]}
    for message, levels in bad.items():
        with pytest.raises(UsageError, match=message):
            hierarchical_kmeans(x, levels)
    with pytest.raises(UsageError, match="one sample size"):
        hierarchical_kmeans(x, [5, 2], sample_sizes=[3])
    h = hierarchical_kmeans(x)  # default levels: ceil(50 / 20) = 3, then 1
    assert [len(c) for c in h.centroids] == [3, 1] and (h.labels[:, 1] == 0).all()


def test_water_fill_is_the_largest_even_cut():
    rng = np.random.default_rng(0)
    for _ in range(200):
        sizes = rng.integers(0, 30, rng.integers(1, 12))
        target = int(rng.integers(0, sizes.sum() + 5))
        q = water_fill(sizes, target, rng)
        assert q.sum() == min(target, sizes.sum()) and (q <= sizes).all()
        cut = max(c for c in range(sizes.max() + 1) if np.minimum(sizes, c).sum() <= target)
        assert ((q == np.minimum(sizes, cut)) | ((q == cut + 1) & (sizes > cut))).all(), (sizes, target, q)


def assert_water_filled(counts: np.ndarray, sizes: np.ndarray) -> None:
    """Groups not taken whole got shares within one of each other, and none smaller than a whole group."""
    partial = counts < sizes
    if partial.any():
        assert counts[partial].max() - counts[partial].min() <= 1, (counts, sizes)
        assert (counts[~partial] <= counts[partial].min() + 1).all(), (counts, sizes)


def test_balanced_sample_sizes_and_caps():
    rng = np.random.default_rng(0)
    fine = np.repeat(np.arange(30), rng.integers(1, 200, 30))  # 30 clusters of 1 to 199 items
    coarse = fine % 4
    labels = np.stack([fine, coarse], axis=1)[rng.permutation(len(fine))]
    n = len(labels)
    for target in (0, 1, 7, 100, 1000, n - 1, n, n + 10):
        picked = balanced_sample(labels, target, seed=target)
        assert len(picked) == min(target, n) and len(np.unique(picked)) == len(picked)
        assert (np.diff(picked) > 0).all()
        top = np.bincount(labels[picked, 1], minlength=4)
        assert_water_filled(top, np.bincount(labels[:, 1], minlength=4))
        for group in range(4):  # within each top cluster, its share over its sub-clusters
            members = np.flatnonzero(np.arange(30) % 4 == group)
            assert_water_filled(
                np.bincount(labels[picked, 0], minlength=30)[members], np.bincount(labels[:, 0])[members]
            )


def test_balanced_random_is_seeded_and_closest_picks_the_nearest(data):
    x, _, h = data
    a, b, c = (balanced_sample(h, 300, seed=s) for s in (1, 1, 2))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    picked = balanced_sample(h, 300, strategy="closest")
    assert np.array_equal(picked, balanced_sample(h, 300, strategy="closest"))
    distance = 1 - np.einsum("nd,nd->n", unit(x), h.centroids[0][h.labels[:, 0]])  # brute force
    chosen = np.zeros(len(x), bool)
    chosen[picked] = True
    for cluster in range(16):
        inside = h.labels[:, 0] == cluster
        assert chosen[inside].sum() in (18, 19)  # 300 over 4 groups of 4 clusters
        assert distance[inside & chosen].max() <= distance[inside & ~chosen].min() + 1e-6


def test_imbalanced_pool_comes_out_balanced():
    x, y = planted([100] * 8 + [1000] + [100] * 7, seed=0)
    h = hierarchical_kmeans(x, [16, 4], seed=0)
    assert adjusted_rand_score(y, h.labels[:, 0]) > 0.95  # k-means found the classes (seeded)
    picked = balanced_sample(h, 800, seed=0)
    assert np.bincount(y[picked]).tolist() == [50] * 16  # the class 10x the others too
    assert np.bincount(y[balanced_sample(h, 4000)]).tolist() == [100] * 8 + [1000] + [100] * 7


def test_balanced_sample_rejects_bad_input():
    with pytest.raises(UsageError, match="must nest"):
        balanced_sample(np.array([[0, 0], [0, 1], [1, 1]]), 2)
    with pytest.raises(UsageError, match="strategy"):
        balanced_sample(np.array([0, 1]), 1, strategy="nearest")
    with pytest.raises(UsageError, match="distance"):
        balanced_sample(np.array([0, 1]), 1, strategy="closest")


def test_state_dir_checks_settings(tmp_path):
    x = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)
    run = functools.partial(hierarchical_kmeans, x, seed=0, resample_steps=1, state_dir=tmp_path)
    first = run([10, 3])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["level_1.npz", "level_2.npz", "settings.json"]
    with pytest.raises(UsageError, match=r"other settings \(levels: \[10, 3\] there, \[10, 2\] now"):
        run([10, 2])
    with pytest.raises(UsageError, match="data:"):
        hierarchical_kmeans(x[::-1], [10, 3], seed=0, resample_steps=1, state_dir=tmp_path)
    assert len(run([10, 2], overwrite=True).centroids[1]) == 2
    again = run([10, 3], overwrite=True)
    assert np.array_equal(again.labels, first.labels)


RUN = """
import sys, time
import numpy as np
from cvfm.curate.hierarchy import hierarchical_kmeans

def pause(level, centroids):
    if level == 1 and sys.argv[3] == "pause":
        time.sleep(600)

x = np.load(sys.argv[1], mmap_mode="r")
h = hierarchical_kmeans(x, [40, 8, 3], seed=3, resample_steps=2, state_dir=sys.argv[2], on_level=pause)
np.savez(sys.argv[2] + ".result.npz", labels=h.labels, distance=h.distance, *h.centroids)
"""


def test_resume_in_a_new_process_after_a_kill(tmp_path):
    x, _ = planted([60] * 16, seed=3)
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "run.py").write_text(textwrap.dedent(RUN))
    state = tmp_path / "state"

    def run(mode: str) -> subprocess.Popen:
        args = [sys.executable, str(tmp_path / "run.py"), str(tmp_path / "x.npy"), str(state), mode]
        return subprocess.Popen(args, stderr=subprocess.PIPE, text=True)

    proc = run("pause")
    deadline = time.monotonic() + 120
    while not (state / "level_1.npz").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert sorted(p.name for p in state.iterdir()) == ["level_1.npz", "settings.json"]
    level_1 = (state / "level_1.npz").stat()

    proc = run("go")
    assert proc.wait(timeout=120) == 0, proc.stderr.read()
    assert (state / "level_1.npz").stat().st_mtime_ns == level_1.st_mtime_ns  # loaded, not recomputed
    resumed = np.load(str(state) + ".result.npz")
    whole = hierarchical_kmeans(x, [40, 8, 3], seed=3, resample_steps=2)
    assert np.array_equal(resumed["labels"], whole.labels)
    assert np.array_equal(resumed["distance"], whole.distance)
    for j, c in enumerate(whole.centroids):
        assert np.array_equal(resumed[f"arr_{j}"], c)
