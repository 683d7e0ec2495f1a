"""Embed images with any registry encoder into the clip-retrieval layout, or JSON lines.

Layout: `img_emb/img_emb_0.npy` (float32, N x D, L2-normalised unless asked not to) and
`metadata/metadata_0.parquet` (id, image, label) in the same row order.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from cvfm.data.loader import SkipLog
from cvfm.data.sources import open_source
from cvfm.errors import UsageError
from cvfm.eval.features import extract_features
from cvfm.registry import create_encoder
from cvfm.runtime.files import atomic_write
from cvfm.runtime.threads import share_cores_with_workers


def embed_images(
    model: str,
    data: str,
    output: str,
    *,
    split: str | None = None,
    batch_size: int = 256,
    num_workers: int = 2,
    normalize: bool = True,
    overwrite: bool = False,
    strict: bool = False,
    image_column: str = "image",
    label_column: str | None = None,
    pretrained: bool = True,
    trust_remote_code: bool = False,
    device: str | None = None,
) -> dict:
    """Write embeddings of `data` to `output` (a folder, or "-" for JSON lines on stdout).

    Returns a summary: rows, dimension, skipped items."""
    out = None if output == "-" else Path(output)
    if out is not None and out.exists() and not out.is_dir():
        raise UsageError(f"output '{out}' is a file: embeddings go to a folder (or - for stdout)")
    if out is not None and out.exists() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"output folder '{out}' exists and is not empty: pass --overwrite to replace it")
    source = open_source(
        data, split=split, image_column=image_column, label_column=label_column, strict=strict
    )
    encoder = create_encoder(model, pretrained=pretrained, trust_remote_code=trust_remote_code)
    skips = SkipLog(strict, source.skipped)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        share_cores_with_workers(num_workers)
    feats, labels, index = extract_features(
        encoder,
        source,
        batch_size=batch_size,
        num_workers=num_workers,
        skips=skips,
        device=device,
        desc="embed",
    )
    if normalize and len(feats):
        feats = feats / np.linalg.norm(feats, axis=1, keepdims=True).clip(1e-12)
    items = [source.items[i] for i in index]
    if out is None:
        for it, vec in zip(items, feats, strict=True):
            sys.stdout.write(json.dumps({"id": it.id, "label": it.label, "embedding": vec.tolist()}) + "\n")
        sys.stdout.flush()
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        atomic_write(out / "img_emb" / "img_emb_0.npy", lambda p: _save_npy(p, feats.astype(np.float32)))
        table = pa.table(
            {
                "id": [it.id for it in items],
                "image": [it.ref if isinstance(it.ref, str) else it.id for it in items],
                "label": [it.label for it in items],
            }
        )
        atomic_write(out / "metadata" / "metadata_0.parquet", lambda p: pq.write_table(table, p))
    return {
        "model": model,
        "data": data,
        "rows": len(feats),
        "dim": int(feats.shape[1]) if feats.ndim == 2 else 0,
        "output": output,
        "skipped": skips.as_list(),
    }


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)
