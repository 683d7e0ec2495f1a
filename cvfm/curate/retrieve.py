"""`retrieve(...)`: the library call behind `cvfm curate retrieve`: DINOv2's retrieval-based curation,
which grows a curated seed set with the pool images that look like it.

Sample-based (the default): for each seed image, its `k` nearest pool items (cosine). Cluster-based
(`clusters`, a `curate cluster` output over the same pool), for small seed sets where k-NN finds too
few: each seed is assigned to its nearest level-1 centroid, and items of those clusters are taken
(`per_cluster` per seed of the cluster, drawn at random with `seed`; all of them when None).
An item is kept when some seed retrieved it; decisions.parquet names the most similar such seed
(`seed`, `similarity`, `rank` among that seed's neighbours) and how many seeds retrieved it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cvfm.curate.decisions import DECISIONS_FILE, EMBEDDINGS, Decisions, check_output, write_decisions
from cvfm.curate.inputs import EmbedOptions, check_same_space, describe
from cvfm.curate.kmeans import nearest
from cvfm.curate.pool import EmbeddingPool
from cvfm.errors import UsageError
from cvfm.runtime.progress import log

K = 4  # DINOv2's sample-based retrieval: 4 nearest neighbours per query image


def retrieve(
    embed_dir: str,
    seeds: str,
    output: str | Path,
    *,
    k: int | None = None,
    clusters: str | Path | None = None,
    per_cluster: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    embedding: EmbedOptions = EmbedOptions(),
) -> dict:
    """Keep the pool items of `embed_dir` retrieved by the seed images `seeds` (an embed output, or images
    with `embedding.model`): their `k` nearest neighbours, or with `clusters` items of their clusters."""
    if clusters is None and per_cluster is not None:
        raise UsageError("--per-cluster goes with --clusters (cluster-based retrieval)")
    if clusters is not None and k is not None:
        raise UsageError("--k is for k-NN retrieval and --clusters for cluster-based retrieval: choose one")
    if (k is not None and k < 1) or (per_cluster is not None and per_cluster < 1):
        raise UsageError("--k and --per-cluster take positive counts")
    out = check_output(output, overwrite)
    pool = embedding.open(embed_dir, out / EMBEDDINGS)
    seed_pool = embedding.open(seeds, out / f"{EMBEDDINGS}-seeds", what="--seeds")
    check_same_space(pool, seed_pool, f"--seeds '{seeds}'")
    queries = seed_pool[:]
    if clusters is None:
        k = k or K
        columns = _knn(pool, queries, k)
        settings = {"mode": "knn", "k": k}
    else:
        columns = _from_clusters(pool, queries, Path(clusters), per_cluster, seed)
        where = str(Path(clusters).absolute())
        settings = {"mode": "clusters", "clusters": where, "per_cluster": per_cluster, "seed": seed}
    seed_ids = np.asarray(seed_pool.ids, dtype=object)
    best = columns.pop("best_seed")
    kept = best >= 0
    named = [seed_ids[s] if s >= 0 else None for s in best]
    verb = "retrieved-by" if clusters is None else "cluster-of"
    decisions = Decisions(
        kept=kept,
        reason=[f"{verb} {s}" if s is not None else "not-retrieved" for s in named],
        columns={"seed": named, **columns},
    )
    inputs = describe(pool, seeds=seed_pool)
    log(f"retrieve: {int(kept.sum())} of {len(pool)} items retrieved by {len(seed_pool)} seeds")
    return write_decisions(out, pool, "retrieve", settings, inputs, decisions)


def _knn(pool: EmbeddingPool, queries: np.ndarray, k: int) -> dict:
    """Per pool row: the most similar seed that has it among its k nearest (-1: none), the similarity,
    the rank in that seed's list (1 = nearest), and how many seeds have it."""
    n = len(pool)
    sim, idx = nearest(queries, pool, k)
    rows, sims = idx.ravel(), sim.ravel()
    seeds = np.repeat(np.arange(len(queries)), idx.shape[1])
    ranks = np.tile(np.arange(1, idx.shape[1] + 1), len(queries))
    valid = rows >= 0
    rows, sims, seeds, ranks = rows[valid], sims[valid], seeds[valid], ranks[valid]
    order = np.lexsort((seeds, -sims))  # most similar first (ties: the first seed)
    uniq, first = np.unique(rows[order], return_index=True)
    best = order[first]
    out = {
        "best_seed": np.full(n, -1, np.int64),
        "similarity": np.full(n, np.nan, np.float32),
        "rank": [None] * n,
        "retrieved_by": np.bincount(rows, minlength=n),
    }
    out["best_seed"][uniq] = seeds[best]
    out["similarity"][uniq] = sims[best]
    for r, rank in zip(uniq, ranks[best], strict=True):
        out["rank"][r] = int(rank)
    return out


def _from_clusters(
    pool: EmbeddingPool, queries: np.ndarray, folder: Path, per_cluster: int | None, seed: int
) -> dict:
    """Per pool row: its level-1 cluster, and for rows taken from a seed's cluster the most similar seed
    of that cluster (-1: not taken) and the similarity."""
    n = len(pool)
    cluster = cluster_column(folder, pool)
    centroids = np.load(folder / "centroids_1.npy")
    if centroids.ndim != 2 or centroids.shape[1] != pool.dim:
        raise UsageError(f"{folder}/centroids_1.npy is {centroids.shape}, not (k, {pool.dim}) for this pool")
    seed_cluster = nearest(queries, centroids, 1)[1][:, 0]
    rng = np.random.default_rng(seed)
    out = {
        "best_seed": np.full(n, -1, np.int64),
        "similarity": np.full(n, np.nan, np.float32),
        "cluster": cluster,
    }
    order = np.argsort(cluster, kind="stable")
    bounds = np.searchsorted(cluster[order], np.arange(centroids.shape[0] + 1))
    for c in np.unique(seed_cluster):
        members = order[bounds[c] : bounds[c + 1]]
        its_seeds = np.flatnonzero(seed_cluster == c)
        if per_cluster is not None and per_cluster * len(its_seeds) < len(members):
            members = np.sort(rng.choice(members, per_cluster * len(its_seeds), replace=False))
        if len(members) == 0:
            continue
        sim = pool[members] @ queries[its_seeds].T
        j = sim.argmax(axis=1)
        out["best_seed"][members] = its_seeds[j]
        out["similarity"][members] = sim[np.arange(len(members)), j]
    return out


def cluster_column(folder: Path, pool: EmbeddingPool) -> np.ndarray:
    """The level-1 cluster of each pool row, read from a `curate cluster` output over the same items."""
    import pyarrow.parquet as pq

    path = folder / DECISIONS_FILE
    if not path.is_file() or not (folder / "centroids_1.npy").is_file():
        raise UsageError(
            f"--clusters '{folder}' is not a curate cluster output (no {DECISIONS_FILE} or centroids_1.npy)"
        )
    table = pq.read_table(path)
    if not {"id", "cluster_1"} <= set(table.column_names):
        raise UsageError(f"{path} has no id and cluster_1 columns: is it a curate cluster output?")
    of = dict(zip(table.column("id").to_pylist(), table.column("cluster_1").to_pylist(), strict=True))
    missing = [i for i in pool.ids if i not in of]
    if missing:
        raise UsageError(
            f"--clusters '{folder}' does not cover the pool ({len(missing)} items missing, first "
            f"'{missing[0]}'): cluster this pool with cvfm curate cluster"
        )
    return np.array([of[i] for i in pool.ids], dtype=np.int64)
