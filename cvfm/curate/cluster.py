"""`cluster(...)` and `sample(...)`: the library calls behind `cvfm curate cluster` and `cvfm curate sample`
(DINOv2 / Vo et al. 2024: hierarchical k-means with resampling, then balanced sampling over its tree).

A cluster output keeps every item (`kept` is all true) and adds `cluster_1` ... `cluster_L` (level 1 the
finest) and `distance_1` (cosine distance to the level-1 centroid) to decisions.parquet, and the centroids
as `centroids_1.npy` ... `centroids_L.npy`. Its k-means state (`kmeans-state/`, one file per finished
level) lets a stopped run resume. `sample` reads such an output and keeps `target` items.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cvfm.curate.balance import STRATEGIES, balanced_sample
from cvfm.curate.decisions import (
    CONFIG_FILE,
    DECISIONS_FILE,
    EMBEDDINGS,
    FORMAT,
    STATE,
    Decisions,
    check_output,
    write_decisions,
)
from cvfm.curate.hierarchy import hierarchical_kmeans
from cvfm.curate.inputs import EmbedOptions, describe
from cvfm.curate.pool import EmbeddingPool
from cvfm.errors import UsageError
from cvfm.runtime.progress import log
from cvfm.runtime.settings import read_settings


def cluster(
    embed_dir: str,
    output: str | Path,
    *,
    levels: list[int] | None = None,
    resample_steps: int = 10,
    sample_sizes: list[int] | None = None,
    resample: str = "closest",
    niter: int = 20,
    seed: int = 0,
    overwrite: bool = False,
    embedding: EmbedOptions = EmbedOptions(),
) -> dict:
    """Cluster the pool `embed_dir` hierarchically (`levels` finest first; see `hierarchical_kmeans` for
    the defaults) and write the cluster output into `output`; a rerun resumes at the first unfinished
    level."""
    out = check_output(output, overwrite)
    pool = embedding.open(embed_dir, out / EMBEDDINGS)

    def done(level: int, centroids: np.ndarray) -> None:
        log(f"cluster: level {level} done ({len(centroids)} clusters)")

    tree = hierarchical_kmeans(
        pool,
        levels,
        resample_steps=resample_steps,
        sample_sizes=sample_sizes,
        resample=resample,
        niter=niter,
        seed=seed,
        state_dir=out / STATE,
        overwrite=overwrite,
        on_level=done,
    )
    labels, n = tree.labels, len(pool)
    levels = [len(c) for c in tree.centroids]
    columns = {f"cluster_{j + 1}": labels[:, j] for j in range(tree.levels)}
    decisions = Decisions(
        kept=np.ones(n, bool),
        reason=["kept"] * n,
        columns={**columns, "distance_1": tree.distance},
        arrays={f"centroids_{j + 1}.npy": c for j, c in enumerate(tree.centroids)},
    )
    settings = {
        "levels": levels,
        "resample_steps": resample_steps,
        "sample_sizes": sample_sizes,
        "resample": resample,
        "niter": niter,
        "seed": seed,
    }
    return write_decisions(out, pool, "cluster", settings, describe(pool), decisions)


def sample(
    cluster_out: str | Path,
    output: str | Path,
    target: int,
    *,
    strategy: str = "random",
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    """Keep `target` items of a `curate cluster` output, balanced over its clusters level by level from
    the top (water-filling: a cluster smaller than its share is kept whole, the rest goes to the others);
    at the bottom, `strategy` random (seeded) or closest to the centroid."""
    import pyarrow.parquet as pq

    source = Path(cluster_out)
    saved = read_settings(source / CONFIG_FILE, FORMAT)
    if saved is None or saved.get("step") != "cluster":
        raise UsageError(
            f"'{cluster_out}' is not a curate cluster output (no complete {CONFIG_FILE} of the cluster "
            "step): run cvfm curate cluster first"
        )
    if target < 1:
        raise UsageError(f"--target must be at least 1, not {target}")
    if strategy not in STRATEGIES:
        raise UsageError(f"--strategy must be one of {', '.join(STRATEGIES)}, not '{strategy}'")
    out = check_output(output, overwrite)
    pool = EmbeddingPool(saved["inputs"]["pool"])
    table = pq.read_table(source / DECISIONS_FILE)
    if table.column("id").to_pylist() != pool.ids:
        raise UsageError(f"'{cluster_out}' does not match its pool '{pool.path}' any more: cluster it again")
    levels = len(saved["settings"]["levels"])
    labels = np.stack([table.column(f"cluster_{j + 1}").to_numpy() for j in range(levels)], axis=1)
    distance = table.column("distance_1").to_numpy()
    if target > len(pool):
        log(f"sample: --target {target} is more than the {len(pool)} items: all are kept")
    chosen = balanced_sample(labels, target, strategy=strategy, distance=distance, seed=seed)
    kept = np.zeros(len(pool), bool)
    kept[chosen] = True
    top = labels[:, -1]
    sizes, taken = np.bincount(top), np.bincount(top[kept], minlength=top.max() + 1)
    log(
        f"sample: {int(kept.sum())} of {len(pool)} items from {len(sizes)} top clusters (sizes "
        f"{sizes.min()}-{sizes.max()}, taken {taken.min()}-{taken.max()} per cluster)"
    )
    decisions = Decisions(
        kept=kept,
        reason=["kept" if k else "not-sampled" for k in kept],
        columns={**{f"cluster_{j + 1}": labels[:, j] for j in range(levels)}, "distance_1": distance},
    )
    settings = {"target": target, "strategy": strategy, "seed": seed}
    inputs = {"clusters": str(source.absolute()), **describe(pool)}
    return write_decisions(out, pool, "sample", settings, inputs, decisions)
