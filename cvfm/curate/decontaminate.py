"""`decontaminate(...)`: the library call behind `cvfm curate decontaminate`: drop the pool items that are
near-duplicates of evaluation images (DINOv2's "relative deduplication" against its test sets).

An item goes when its largest cosine similarity to any evaluation item is >= `threshold`. The default,
0.95, is the near-duplicate of `curate dedup`'s default (eps 0.05: similarity above 0.95), so the two
steps call the same things copies; copy-detection descriptors such as SSCD, made to separate copies,
use lower thresholds (DINOv2 worked with SSCD embeddings). decisions.parquet holds every item's
largest similarity to the evaluation set (`similarity`) and the evaluation item it is
(`contaminates`, null when kept), so a threshold can be chosen from it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cvfm.curate.decisions import EMBEDDINGS, Decisions, check_output, write_decisions
from cvfm.curate.inputs import EmbedOptions, check_same_space, describe
from cvfm.curate.kmeans import nearest
from cvfm.errors import UsageError
from cvfm.runtime.progress import log

THRESHOLD = 0.95


def decontaminate(
    embed_dir: str,
    against: str,
    output: str | Path,
    *,
    threshold: float = THRESHOLD,
    overwrite: bool = False,
    embedding: EmbedOptions = EmbedOptions(),
) -> dict:
    """Drop the items of the pool `embed_dir` whose similarity to an item of `against` (an embed output,
    or evaluation images with `embedding.model`) is >= `threshold`; write the decisions into `output`."""
    if not -1 <= threshold <= 1:
        raise UsageError(f"--threshold is a cosine similarity, in [-1, 1], not {threshold}")
    out = check_output(output, overwrite)
    pool = embedding.open(embed_dir, out / EMBEDDINGS)
    evaluation = embedding.open(against, out / f"{EMBEDDINGS}-against", what="--against")
    check_same_space(pool, evaluation, f"--against '{against}'")
    sim, idx = nearest(pool, evaluation, 1)
    sim, idx = sim[:, 0], idx[:, 0]
    hit = sim >= threshold
    eval_ids = np.asarray(evaluation.ids, dtype=object)
    contaminates = [eval_ids[j] if h else None for j, h in zip(idx, hit, strict=True)]
    decisions = Decisions(
        kept=~hit,
        reason=[f"contaminates {c}" if c is not None else "kept" for c in contaminates],
        columns={"contaminates": contaminates, "similarity": sim},
    )
    settings = {"threshold": threshold}
    inputs = describe(pool, against=evaluation)
    log(f"decontaminate: {int(hit.sum())} of {len(pool)} match one of {len(evaluation)} (>= {threshold})")
    return write_decisions(out, pool, "decontaminate", settings, inputs, decisions)
