"""What every curation step writes, so that nothing is dropped silently:

    decisions.parquet   one row per input row, in pool order: id, image, kept, reason, and the step's fields
    kept.jsonl          the kept items as a manifest that any `--data` takes ({"id", "image", "label"}, and
                        "caption" where the pool has texts; absolute image paths)
    dropped.txt         the ids not kept, one per line: `--exclude` takes it (also for built-in and hf:
                        data, whose in-memory images no manifest can point at)
    curate.json         the step, its settings and inputs, the counts, the cvfm version (written last:
                        the output is complete)

Relative image paths in an embed output are relative to the directory `cvfm embed` ran in, as every
relative path of cvfm is: a step resolves them against its own working directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import cvfm
from cvfm.curate.pool import EmbeddingPool
from cvfm.errors import UsageError
from cvfm.runtime.files import atomic_write, write_json

FORMAT = "cvfm-curate"
CONFIG_FILE = "curate.json"
DECISIONS_FILE = "decisions.parquet"
KEPT_FILE = "kept.jsonl"
DROPPED_FILE = "dropped.txt"
EMBEDDINGS = "embeddings"  # OUT/embeddings*/: the inputs embedded by the step (resumable, kept on overwrite)
OUTPUT_GLOBS = (CONFIG_FILE, DECISIONS_FILE, "kept*.jsonl", DROPPED_FILE, "centroids_*.npy")
IN_MEMORY = ("builtin:", "hf:")  # data specs whose images are not files


@dataclass
class Decisions:
    """One step's verdict on every row of a pool: `kept` (bool per row), `reason` (str per row) and the
    step's own `columns` (arrays or lists, one entry per row). `manifests` names further kept.jsonl-like
    files ({"kept_eps0.1.jsonl": mask}) written beside kept.jsonl, `arrays` .npy files
    ({"centroids_1.npy": array})."""

    kept: np.ndarray
    reason: list[str]
    columns: dict = field(default_factory=dict)
    manifests: dict[str, np.ndarray] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def check_output(output: str | Path, overwrite: bool) -> Path:
    """The output folder, refused when it already holds a curation output (or anything else but the
    embeddings a step makes there) unless `overwrite`. Call it before the work: `write_decisions`
    replaces the old outputs only once the new ones are there."""
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise UsageError(f"output '{out}' is a file: a curation step writes a folder")
    if not out.exists():
        return out
    ours = sorted(_outputs(out))
    others = [p for p in out.iterdir() if p not in ours and not p.name.startswith((EMBEDDINGS, "."))]
    if not overwrite and (ours or others):
        what = ", ".join(sorted(p.name for p in [*ours, *others])[:3])
        raise UsageError(f"output folder '{out}' is not empty ({what}): choose another, or pass --overwrite")
    if others:  # written by something else: --overwrite replaces curation outputs only
        names = ", ".join(sorted(p.name for p in others)[:3])
        raise UsageError(f"output folder '{out}' holds files that are not curation outputs ({names})")
    return out


def _outputs(out: Path) -> set[Path]:
    return {p for pattern in OUTPUT_GLOBS for p in out.glob(pattern)} if out.is_dir() else set()


def write_decisions(
    out: Path, pool: EmbeddingPool, step: str, settings: dict, inputs: dict, d: Decisions
) -> dict:
    """Write the step's outputs (decisions.parquet, kept.jsonl and `d.manifests`, dropped.txt, `d.arrays`,
    then curate.json) atomically into `out`, and remove those of an earlier output that were not written
    again; returns the summary that curate.json holds."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (out / CONFIG_FILE).unlink(missing_ok=True)  # an overwritten output stops being complete first
    stale = _outputs(out)
    n = len(pool)
    kept = np.asarray(d.kept, dtype=bool)
    for name, values in {"kept": kept, "reason": d.reason, **d.columns}.items():
        if len(values) != n:
            raise AssertionError(f"column '{name}' has {len(values)} rows for a pool of {n}")
    table = pa.table(
        {
            "id": pa.array(pool.ids, pa.string()),
            "image": pa.array(pool.column("image"), pa.string()),
            "kept": pa.array(kept),
            "reason": pa.array(d.reason, pa.string()),
            **{k: _arrow(v) for k, v in d.columns.items()},
        }
    )
    atomic_write(out / DECISIONS_FILE, lambda p: pq.write_table(table, p))
    manifests = {}
    if in_memory(pool):
        why = (
            f"{pool.config['data']} holds its images in memory, and a manifest needs image files: train on "
            f"--data {pool.config['data']} --exclude {out / DROPPED_FILE} instead"
        )
    else:
        why = None
        for name, mask in {KEPT_FILE: kept, **d.manifests}.items():
            manifests[name] = write_manifest(out / name, pool, np.asarray(mask, dtype=bool))
    dropped = [i for i, k in zip(pool.ids, kept, strict=True) if not k]
    atomic_write(out / DROPPED_FILE, lambda p: p.write_text("".join(f"{i}\n" for i in dropped), "utf-8"))
    for name, array in d.arrays.items():
        atomic_write(out / name, lambda p, a=array: _save_npy(p, a))
    written = {DECISIONS_FILE, DROPPED_FILE, *manifests, *d.arrays}
    for p in stale:
        if p.name not in written:
            p.unlink()
    summary = {
        "format": FORMAT,
        "step": step,
        "output": str(out),
        "rows": n,
        "kept": int(kept.sum()),
        "dropped": n - int(kept.sum()),
        "reasons": _reason_counts(d.reason),
        "manifests": manifests,
        **({"no_manifest": why} if why else {}),
        "settings": settings,
        "inputs": inputs,
        "cvfm_version": cvfm.__version__,
    }
    write_json(out / CONFIG_FILE, summary)
    return summary


def in_memory(pool: EmbeddingPool) -> bool:
    """Whether the pool's images are not files (built-in or hf: data): no manifest can point at them."""
    return str(pool.config.get("data", "")).startswith(IN_MEMORY)


def write_manifest(path: Path, pool: EmbeddingPool, mask: np.ndarray) -> dict:
    """Write the rows of `pool` where `mask` holds as manifest lines; returns {"items", "missing_images"}
    (kept images that do not exist from here, named in the log)."""
    from cvfm.runtime.progress import log

    images, labels, captions = pool.column("image"), pool.column("label"), pool.column("caption")
    lines, missing = [], []
    for i in np.flatnonzero(mask):
        image = Path(images[i]).absolute()
        if not image.is_file():
            missing.append(str(image))
        record = {"id": pool.ids[i], "image": str(image), "label": labels[i]}
        if captions[i] is not None:
            record["caption"] = captions[i]
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    atomic_write(path, lambda p: p.write_text("".join(lines), encoding="utf-8"))
    if missing:
        log(
            f"curate: {len(missing)} images of {path.name} do not exist (first: {missing[0]}); relative "
            "paths are relative to the directory cvfm embed ran in: run curate from there"
        )
    return {"items": len(lines), "missing_images": len(missing)}


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would add ".npy" to the temporary name
        np.save(f, array, allow_pickle=False)


def _arrow(values):
    import pyarrow as pa

    if isinstance(values, np.ndarray) and values.dtype.kind == "f":
        return pa.array(values, from_pandas=True)  # NaN: null (no similarity where there is no match)
    return pa.array(values)


def _reason_counts(reasons: list[str]) -> dict[str, int]:
    """How many rows each kind of reason has ("near-duplicate-of a.png" counts as "near-duplicate-of")."""
    counts: dict[str, int] = {}
    for r in reasons:
        kind = r.split(" ", 1)[0]
        counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items()))
