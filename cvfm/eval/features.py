"""Extract pooled features of a whole source with an encoder's own preprocessing."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from cvfm.data.loader import ImageDataset, SkipLog, collate
from cvfm.data.sources import ImageSource
from cvfm.models.encoder import Encoder
from cvfm.runtime.progress import progress


@torch.no_grad()
def extract_features(
    encoder: Encoder,
    source: ImageSource,
    *,
    batch_size: int = 256,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    skips: SkipLog | None = None,
    autocast_dtype: torch.dtype | None = None,
    transform: Callable | None = None,
    desc: str = "features",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns (outputs (N, D) float32, labels (N,), source indices (N,)) for the readable images: an
    encoder's pooled features, or a classifier's logits. `transform` defaults to `encoder.preprocess`'s."""
    skips = skips or SkipLog()
    loader = DataLoader(
        ImageDataset(source, transform or encoder.preprocess.transform()),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate,
    )
    was_training = encoder.training
    encoder.eval().to(device)
    feats, labels, index = [], [], []
    device = torch.device(device)
    with progress(desc, total=len(loader)) as advance:
        for batch in loader:
            skips.add(batch["skipped"])
            if batch["image"] is not None:
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    f = encoder(batch["image"].to(device, non_blocking=True))
                feats.append(f.float().cpu())
                labels.append(batch["label"])
                index.append(batch["index"])
            advance()
    encoder.train(was_training)
    if not feats:
        width = getattr(encoder, "num_features", 0)  # a classifier's logits have no fixed width here
        return np.zeros((0, width), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return torch.cat(feats).numpy(), torch.cat(labels).numpy(), torch.cat(index).numpy()
