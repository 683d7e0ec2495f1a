"""k-means and nearest-neighbour search on faiss (on the GPU where faiss has one), over arrays that may be
memory-mapped: training reads a seeded sample, search walks the queries in blocks."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from cvfm.errors import UsageError

BLOCK_ROWS = 65_536


def train_kmeans(
    x,
    k: int,
    *,
    seed: int = 0,
    niter: int = 20,
    max_points_per_centroid: int = 256,
    spherical: bool = True,
) -> np.ndarray:
    """(k, d) float32 centroids of the rows of `x` (an array or `EmbeddingPool`), k-means++ initialised,
    trained on at most `k * max_points_per_centroid` rows drawn with `seed`. `spherical` keeps the
    centroids unit-norm (cosine k-means, as SemDeDup and DINOv2's curation use)."""
    import faiss

    n = len(x)
    if not 1 <= k <= n:
        raise UsageError(f"k-means needs 1 <= k <= {n} (the number of rows), not k={k}")
    m = min(n, k * max_points_per_centroid)
    rows = np.sort(np.random.default_rng(seed).choice(n, m, replace=False)) if m < n else slice(None)
    sample = np.ascontiguousarray(x[rows], dtype=np.float32)
    km = faiss.Kmeans(
        sample.shape[1],
        k,
        niter=niter,
        seed=seed,
        spherical=spherical,
        max_points_per_centroid=max_points_per_centroid,
        min_points_per_centroid=1,  # a small pool is a pool too: no "please provide more points" warning
        init_method=faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS,
        gpu=faiss.get_num_gpus() > 0,
        verbose=False,
    )
    km.train(sample)
    return np.asarray(km.centroids, dtype=np.float32)


def nearest(queries, keys, k: int = 1, *, block_rows: int = BLOCK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """For each row of `queries`, the `k` rows of `keys` with the largest inner product (cosine on unit
    vectors): (scores, indices), each (n, k), best first. Exact search; both sides are read in blocks of
    `block_rows` (the keys' blocks merged with faiss' ResultHeap), so neither needs to fit in memory."""
    import faiss

    k = min(k, len(keys))
    scores, ids = np.empty((len(queries), k), np.float32), np.empty((len(queries), k), np.int64)
    key_blocks = list(range(0, len(keys), block_rows))
    index = _flat_index(keys[:block_rows]) if len(key_blocks) == 1 else None
    for start, block in blocks(queries, block_rows):
        end = start + len(block)
        if index is not None:  # the keys fit in one block: one index for every query block
            scores[start:end], ids[start:end] = index.search(block, k)
            continue
        heap = faiss.ResultHeap(len(block), k, keep_max=True)
        for key_start, key_block in blocks(keys, block_rows):
            d, i = _flat_index(key_block).search(block, min(k, len(key_block)))
            heap.add_result(d, np.where(i >= 0, i + key_start, -1))
        heap.finalize()
        scores[start:end], ids[start:end] = heap.D, heap.I
    return scores, ids


def _flat_index(keys):
    """An exact inner-product index of `keys` (on every GPU faiss sees, where it has any)."""
    import faiss

    keys = np.ascontiguousarray(keys, dtype=np.float32)
    index = faiss.IndexFlatIP(keys.shape[1])
    if faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(keys)
    return index


def blocks(x, block_rows: int = BLOCK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
    """(start, rows) of `x` in contiguous float32 blocks of at most `block_rows` rows."""
    for start in range(0, len(x), block_rows):
        yield start, np.ascontiguousarray(x[start : start + block_rows], dtype=np.float32)
