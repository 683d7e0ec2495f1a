"""`dedup(...)`: the library call behind `cvfm curate dedup`: exact duplicates by content hash, then
SemDeDup (`cvfm.curate.semdedup`) at one or more eps, from one clustering.

decisions.parquet: kept, reason, duplicate_of, similarity (of the first eps), sha256, cluster, distance
(to the cluster's centroid), and kept_eps{e}, duplicate_of_eps{e}, similarity_eps{e} for every eps.
kept.jsonl holds the items kept at the first eps, kept_eps{e}.jsonl those kept at each further one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cvfm.curate.decisions import EMBEDDINGS, Decisions, check_output, write_decisions
from cvfm.curate.exact import content_hashes, first_copies
from cvfm.curate.inputs import EmbedOptions, describe
from cvfm.curate.semdedup import cluster_rows, default_clusters, find_duplicates, keep_order
from cvfm.errors import UsageError
from cvfm.runtime.progress import log


def dedup(
    embed_dir: str,
    output: str | Path,
    *,
    eps: Sequence[float] = (0.05,),
    keep: str = "hard",
    against: str = "kept",
    clusters: int | None = None,
    exact: bool = True,
    seed: int = 0,
    niter: int = 20,
    block_rows: int = 4096,
    overwrite: bool = False,
    embedding: EmbedOptions = EmbedOptions(),
) -> dict:
    """Deduplicate the pool `embed_dir` (an embed output, or images with `embedding.model`) into `output`.
    Returns the summary (also in OUTPUT/curate.json), with a row per eps under "eps"."""
    eps = [float(e) for e in eps]
    if not eps or any(not 0 <= e < 2 for e in eps) or len(set(eps)) < len(eps):
        raise UsageError(f"--eps takes distinct values in [0, 2) (1 - eps is a cosine similarity), not {eps}")
    out = check_output(output, overwrite)
    pool = embedding.open(embed_dir, out / EMBEDDINGS)
    n = len(pool)
    k = clusters or default_clusters(n)
    settings = {
        "eps": eps,
        "keep": keep,
        "against": against,
        "clusters": k,
        "exact": exact,
        "seed": seed,
        "niter": niter,
    }
    hashes, problems = content_hashes(pool) if exact else ([None] * n, {})
    if problems:
        row, why = next(iter(problems.items()))
        log(f"dedup: {len(problems)} unreadable images (dropped as unreadable); {pool.ids[row]}: {why}")
    first = first_copies(hashes) if exact else np.arange(n)  # -1: unreadable
    is_first = first == np.arange(n)
    exact_dup = (first >= 0) & ~is_first
    survivors = np.flatnonzero(is_first)
    log(f"dedup: {n} rows; {n - len(survivors)} exact duplicates or unreadable; SemDeDup in {k} clusters")
    groups = cluster_rows(pool, k, seed=seed, niter=niter)
    order = keep_order(groups, keep, seed, rows=survivors)
    found = find_duplicates(pool, order, eps, against=against, block_rows=block_rows)

    ids = np.asarray(pool.ids, dtype=object)
    columns: dict = {}
    per_eps = []
    for e, dup in zip(eps, found, strict=True):
        kept = dup.kept & is_first
        of = np.where(exact_dup, first, dup.of)
        columns[f"kept_eps{e:g}"] = kept
        columns[f"duplicate_of_eps{e:g}"] = [ids[i] if i >= 0 else None for i in of]
        columns[f"similarity_eps{e:g}"] = np.where(exact_dup, np.float32(1), dup.similarity)
        per_eps.append({"eps": e, "kept": int(kept.sum()), "near_duplicates": int((~dup.kept).sum())})
    e0 = f"eps{eps[0]:g}"
    reasons = [_reason(i, first, found[0].of, ids, problems) for i in range(n)]
    decisions = Decisions(
        kept=columns[f"kept_{e0}"],
        reason=reasons,
        columns={
            "duplicate_of": columns[f"duplicate_of_{e0}"],
            "similarity": columns[f"similarity_{e0}"],
            "sha256": hashes,
            "cluster": groups.cluster,
            "distance": groups.distance,
            **columns,
        },
        manifests={f"kept_eps{e:g}.jsonl": columns[f"kept_eps{e:g}"] for e in eps[1:]},
    )
    summary = write_decisions(out, pool, "dedup", settings, describe(pool), decisions)
    exact_count = int(exact_dup.sum())
    for row in per_eps:
        row.update(exact_duplicates=exact_count, unreadable=len(problems), dropped=n - row["kept"])
    log(format_table(per_eps, n))
    return {**summary, "eps": per_eps}


def _reason(i: int, first: np.ndarray, near: np.ndarray, ids: np.ndarray, problems: dict[int, str]) -> str:
    if i in problems:
        return f"unreadable: {problems[i]}"
    if first[i] != i:
        return f"exact-duplicate-of {ids[first[i]]}"
    if near[i] >= 0:
        return f"near-duplicate-of {ids[near[i]]}"
    return "kept"


def format_table(rows: list[dict], n: int) -> str:
    """The per-eps counts as a small text table (for stderr)."""
    lines = [f"{'eps':>8} {'kept':>10} {'dropped':>10} {'dropped %':>10}"]
    for r in rows:
        share = 100 * r["dropped"] / max(n, 1)
        lines.append(f"{r['eps']:>8g} {r['kept']:>10} {r['dropped']:>10} {share:>9.1f}%")
    return "\n".join(lines)
